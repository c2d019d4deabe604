"""Lesson 14's claims, asserted on a real cluster (Redis, ZooKeeper, prefork workers), with negative controls.

One cluster and one run of every experiment per module (the ``runs``
fixture): w1 and w2 contend for the lock, w3 (short ZooKeeper session) is
the holder we SIGKILL and SIGSTOP.
"""

from __future__ import annotations

import pytest

from labkit import LocalCluster
from labkit.lessons import mutex
from labkit.measure import Comparison

pytestmark = pytest.mark.cluster  # every test here starts real processes

SESSION_TIMEOUT = 1.0
TRIALS, CONTENDERS, WORK_S = 6, 12, 0.2


@pytest.fixture(scope="module")
def runs():
    with LocalCluster(**mutex.cluster_config(session_timeout=SESSION_TIMEOUT), reuse=False) as c:
        mutex.warm_up(c)
        params = {"trials": TRIALS, "contenders": CONTENDERS, "seconds": WORK_S}
        crash_fix = mutex.crash_fixed(c)
        yield {
            "cluster": c,
            "slide": mutex.resubmit(c),
            "slide_repaired": mutex.resubmit(c, repaired=True),
            "placement": mutex.slide_placement(c, trials=3, contenders=CONTENDERS, seconds=WORK_S),
            "lock": mutex.compare(c, **params),
            "crash_fix": crash_fix,
            "crash_slide": mutex.crash_talk(c, placement="submit", wait=crash_fix.value + 0.5),
            "crash_run": mutex.crash_talk(c, placement="run"),
            "fence": mutex.compare_fencing(c),
            "keyed": mutex.keyed(c, keys=("a", "b"), per_key=3, seconds=WORK_S),
            "unkeyed": mutex.keyed(c, keys=("a", "b"), per_key=3, seconds=WORK_S, keyed=False),
        }


# --------------------------------------------------------------------------- the claims
def test_mutex_claims_hold(runs):
    mutex.slide_locks_itself_out(runs["slide"])
    mutex.slide_placement_keeps_one_holder(runs["placement"])
    mutex.fix_keeps_one_holder(runs["lock"])
    mutex.ephemeral_lock_frees_itself(runs["crash_fix"], runs["crash_slide"])
    mutex.fencing_rejects_the_stale_write(runs["fence"])
    mutex.keyed_lock_serialises_each_key_only(runs["keyed"])


def test_mutex_claim_fails_without_the_fix_after_return(runs):
    """The slide's placement with after_return repaired runs every time: no lockout to find."""
    assert [a["outcome"] for a in runs["slide_repaired"].meta["attempts"]] == ["ran"] * 3
    with pytest.raises(AssertionError, match="every later submission is refused"):
        mutex.slide_locks_itself_out(runs["slide_repaired"])


def test_mutex_claim_fails_without_the_fix_placement(runs):
    """The same mutex moved to run time: its peaks are not 1."""
    with pytest.raises(AssertionError, match="keeps one holder"):
        mutex.slide_placement_keeps_one_holder(runs["lock"].before)


def test_mutex_claim_fails_without_the_fix_lock(runs):
    """The talk's mutex at run time in the fix's place."""
    before = runs["lock"].before
    with pytest.raises(AssertionError, match="never has more than one holder"):
        mutex.fix_keeps_one_holder(Comparison(before, before))


def test_mutex_claim_fails_without_the_fix_ephemeral(runs):
    """The talk's persistent node in the ephemeral lock's place: freed by hand, not by ZooKeeper."""
    with pytest.raises(AssertionError, match="freed by ZooKeeper"):
        mutex.ephemeral_lock_frees_itself(runs["crash_slide"], runs["crash_slide"])


def test_mutex_claim_fails_without_the_fix_fencing(runs):
    """Unfenced writes in the fenced run's place: the stale write wins."""
    unfenced = runs["fence"].before
    with pytest.raises(AssertionError, match="stale write is rejected"):
        mutex.fencing_rejects_the_stale_write(Comparison(unfenced, unfenced))


def test_mutex_claim_fails_without_the_fix_keys(runs):
    """One lock for every key: keys no longer run side by side."""
    with pytest.raises(AssertionError, match="different keys hold their locks at the same time"):
        mutex.keyed_lock_serialises_each_key_only(runs["unkeyed"])


# --------------------------------------------------------------------------- what the claims rest on
def test_the_slides_after_return_raises_in_the_worker_and_the_worker_logs_it(runs):
    first = runs["slide"].meta["attempts"][0]
    assert "after_return handler raised: TypeError" in first["after_return"], first


def test_the_slides_race_surfaces_in_the_producer(runs):
    totals = runs["placement"].meta["totals"]
    assert totals["loser_deletes"] == 0 and totals["ran"] == totals["sent"] >= 3, totals
    assert totals["sent"] + totals["raised"] + totals["refused"] == 3 * CONTENDERS, totals
    assert totals["raised"] >= 1, totals  # threads released together: most lose the race in create()


def test_run_time_losers_delete_the_winners_node(runs):
    assert runs["lock"].before.meta["totals"]["loser_deletes"] >= 1


def test_run_time_crash_heals_only_through_the_losers_cleanup(runs):
    attempts = runs["crash_run"].meta["attempts"]
    assert [a["outcome"] for a in attempts] == [mutex.SKIPPED, "ran"], attempts
    assert attempts[0]["node_persistent"], attempts


def test_ephemeral_lock_hands_out_a_higher_token(runs):
    meta = runs["crash_fix"].meta
    assert meta["session_timeout_s"] == pytest.approx(SESSION_TIMEOUT)
    assert meta["next_token"] > meta["victim_token"]


def test_keyed_tokens_grow_with_every_holder(runs):
    for info in runs["keyed"].meta["keys"].values():
        assert info["tokens"] == sorted(info["tokens"]) and len(set(info["tokens"])) == len(info["tokens"])


def test_fencing_script_rejects_lower_tokens_only(runs):
    r = runs["cluster"].redis_client()
    keys = ("lk:test:res", "lk:test:res:token")
    write = lambda value, token: r.eval(mutex._WRITE, 2, *keys, value, "" if token is None else str(token))  # noqa: E731
    assert write("x", 5) == 1
    assert write("old", 3) == 0
    assert r.get(keys[0]) == b"x"
    assert write("y", 5) == 1  # the same holder may write again
    assert write("z", 6) == 1
    assert write("unfenced", None) == 1  # without a token nothing is checked


def test_redis_py_lock_is_owner_released_but_has_no_fencing_token(runs):
    note = mutex.redis_lock_note(runs["cluster"].redis_client(), ttl=0.3)
    assert note["a_acquired"] and not note["b_while_a_holds"]
    assert note["b_after_expiry"] and not note["a_still_owns"]
    assert note["a_release"].startswith("LockNotOwnedError")
    assert all(not t.isdigit() for t in note["tokens"])  # random hex: nothing a resource could order
