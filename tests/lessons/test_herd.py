"""Lesson 13's claims, asserted through the API on a real cluster, with their negative controls.

One run of each experiment per module (the ``runs`` fixture); every test
reads it. Retry arrivals are recorded by the flaky service itself; lock
wake-ups are counted in Redis by each fired ZooKeeper watch callback.
"""

from __future__ import annotations

import pytest

from labkit import LocalCluster
from labkit.lessons import herd
from labkit.measure import Comparison

pytestmark = pytest.mark.cluster  # every test here starts real processes

N = 60
TICK = 0.06
CONTENDERS = 15


@pytest.fixture(scope="module")
def runs():
    with LocalCluster(**herd.CLUSTER, reuse=False) as c:
        yield {
            "fixed": herd.before(c, n=N, tick=TICK),
            "talk": herd.after(c, n=N, tick=TICK),
            "celery": herd.celery_backoff(c, n=N, tick=TICK),
            "locks": herd.compare_locks(c, n=CONTENDERS),
        }


def test_every_task_failed_together_and_every_retry_arrived(runs):
    for key in ("fixed", "talk", "celery"):
        m = runs[key]
        assert m.meta["n"] == N and len(m.meta["arrivals"]) == N, (key, m.meta)


def test_delays_are_scaled_alike_and_keep_their_shape(runs):
    fixed, talk, celery = runs["fixed"].meta, runs["talk"].meta, runs["celery"].meta
    assert fixed["arrivals"][0] >= fixed["countdown"], fixed["arrivals"]  # never before its countdown
    assert talk["arrivals"][0] >= herd.FLOOR, talk["arrivals"]  # the talk's floor, scaled like the rest
    assert fixed["spread"] < talk["spread"] / 2 < celery["spread"], (fixed["spread"], talk["spread"],
                                                                     celery["spread"])


def test_herd_claims_hold(runs):
    herd.jitter_spreads_the_herd(runs["fixed"], runs["talk"])
    herd.jitter_spreads_the_herd(runs["fixed"], runs["celery"])
    herd.only_the_talk_keeps_a_floor(runs["talk"], runs["celery"])
    herd.recipe_wakes_one_waiter_per_release(runs["locks"])


def test_herd_claim_fails_without_the_fix_jitter(runs):
    """The fixed countdown in the jitter's place: the herd is in one window."""
    with pytest.raises(AssertionError, match="no more than that"):
        herd.jitter_spreads_the_herd(runs["fixed"], runs["fixed"])


def test_herd_claim_fails_without_the_fix_floor(runs):
    """The talk's retries in Celery's place: nothing comes back before the floor."""
    with pytest.raises(AssertionError, match="claim does not hold"):
        herd.only_the_talk_keeps_a_floor(runs["talk"], runs["talk"])


def test_herd_claim_fails_without_the_fix_lock(runs):
    """The naive lock in kazoo's place: a release wakes many."""
    naive = runs["locks"].before
    with pytest.raises(AssertionError, match="at most one waiter per release"):
        herd.recipe_wakes_one_waiter_per_release(Comparison(naive, naive, better="lower"))


def test_naive_lock_wakes_every_waiter_and_zookeeper_notifies_each_session_once(runs):
    naive, recipe = runs["locks"].before, runs["locks"].after
    n = CONTENDERS
    assert naive.value >= n * (n - 1) // 4, naive.values  # at least half of n(n-1)/2
    assert naive.values[0] > naive.values[-2], naive.values  # wake-ups shrink with the crowd
    assert max(naive.meta["sessions_notified"]) <= 2, naive.meta  # two worker processes, two sessions
    assert recipe.value == n - 1, recipe.values
