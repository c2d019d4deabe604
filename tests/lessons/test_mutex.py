"""Lesson 14's claims, asserted on a real cluster (Redis, ZooKeeper, prefork workers).

One cluster for the module: w1 and w2 contend for the lock, w3 (short
ZooKeeper session) is the holder we SIGKILL and SIGSTOP.
"""

from __future__ import annotations

import pytest

from labkit import LocalCluster
from labkit.lessons import mutex

pytestmark = pytest.mark.cluster  # every test here starts real processes

SESSION_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def mcluster():
    with LocalCluster(workers=mutex.workers(session_timeout=SESSION_TIMEOUT), reuse=False) as c:
        mutex.warm_up(c)
        yield c


# --------------------------------------------------------------------------- no cluster needed
def test_fixed_lock_paths_are_keyed_escaped_and_never_collide():
    path = mutex.fixed_export.lock_path(("r", "a/b", 0.1), {})
    assert path == "/labkit/mutex/mutex.fixed_export/job=a%2Fb"
    assert mutex.fixed_export.lock_path(("r", "12", 0.1), {}) != mutex.fixed_export.lock_path(("r", "1", 0.1), {})
    assert mutex.fixed_export.lock_path(("r", 0, 0.1), {}).endswith("job=0")


def test_talk_paths_collide_and_drop_falsy_keys():
    talk = mutex.talk_export
    assert talk._get_node(("r", "", 0.1), {}) == f"{mutex.TALK_ROOT}/{talk.name}"
    assert talk._get_node(("r", "12", 0.1), {}).endswith("12")


def test_fencing_script_rejects_lower_tokens_only(mcluster):
    r = mcluster.redis_client()
    keys = ("lk:test:res", "lk:test:res:token")
    write = lambda value, token: r.eval(mutex._WRITE, 2, *keys, value, "" if token is None else str(token))  # noqa: E731
    assert write("x", 5) == 1
    assert write("old", 3) == 0
    assert r.get(keys[0]) == b"x"
    assert write("y", 5) == 1  # the same holder may write again
    assert write("z", 6) == 1
    assert write("unfenced", None) == 1  # without a token nothing is checked


# --------------------------------------------------------------------------- the claims
def test_talk_recipe_overlaps_and_fixed_lock_never_does(mcluster):
    before = mutex.before(mcluster)
    after = mutex.after(mcluster)
    assert before.value >= 2, before.meta["trials"]
    assert sum(p >= 2 for p in before.values) >= len(before.values) // 2, before.values
    assert before.meta["totals"]["loser_deletes"] >= 1  # losers deleted the winner's node
    assert all(p == 1 for p in after.values), after.meta["trials"]
    totals = after.meta["totals"]
    assert totals["failed"] == 0
    assert totals["ran"] + totals["skipped"] == totals["submitted"]
    assert mutex.compare(before, after).factor >= 2


def test_crash_talk_recipe_blocks_until_the_node_is_deleted_by_hand(mcluster):
    crash = mutex.crash_talk(mcluster, wait=3 * SESSION_TIMEOUT)
    slide = crash["submit"]["attempts"]
    assert [a["outcome"] for a in slide] == ["refused", "refused", "ran"], slide
    assert slide[0]["node_persistent"] and slide[1]["node_persistent"]
    run = crash["run"]["attempts"]
    assert run[0]["outcome"] == mutex.SKIPPED and run[0]["node_persistent"], run


def test_crash_ephemeral_lock_is_free_again_after_the_session_timeout(mcluster):
    res = mutex.crash_fixed(mcluster)
    assert res["session_timeout_s"] == pytest.approx(SESSION_TIMEOUT)
    ratio = res["reacquired_after_s"] / res["session_timeout_s"]
    assert 0.3 < ratio <= 4, res  # ZooKeeper expired the session; not before, not much after
    assert res["next_token"] > res["victim_token"]


@pytest.mark.parametrize("fenced", [False, True], ids=["unfenced", "fenced"])
def test_fencing_rejects_the_stale_write_only_with_tokens(mcluster, fenced):
    res = mutex.fencing(mcluster, fenced=fenced)
    t = {(e["who"], e["what"]): e["t"] for e in res["events"]}
    assert t[("A", "paused")] < t[("B", "acquired")] < t[("B", "write")] < t[("A", "resumed")] < t[("A", "write")]
    assert res["tokens"]["B"] > res["tokens"]["A"]
    assert res["b_write_accepted"]
    if fenced:
        assert not res["stale_write_accepted"] and res["final_value"] == "B"
    else:
        assert res["stale_write_accepted"] and res["final_value"] == "A"


def test_keyed_locks_serialise_one_key_and_overlap_two(mcluster):
    res = mutex.keyed(mcluster, keys=("a", "b"), per_key=3, seconds=0.2)
    assert all(v["peak"] == 1 for v in res["keys"].values()), res["keys"]
    assert res["peak_all_keys"] >= 2
    for info in res["keys"].values():  # tokens grow with every new holder of a key
        assert info["tokens"] == sorted(info["tokens"]) and len(set(info["tokens"])) == len(info["tokens"])
    assert sum(v["span_s"] for v in res["keys"].values()) / res["span_all_s"] >= 1.3


def test_redis_py_lock_is_owner_released_but_has_no_fencing_token(mcluster):
    note = mutex.redis_lock_note(mcluster, ttl=0.3)
    assert note["a_acquired"] and not note["b_while_a_holds"]
    assert note["b_after_expiry"] and not note["a_still_owns"]
    assert note["a_release"].startswith("LockNotOwnedError")
    assert all(not t.isdigit() for t in note["tokens"])  # random hex: nothing a resource could order
