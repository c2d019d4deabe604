"""Lesson 15's claims on a real prefork worker, with a negative control for each.

One module-scoped run of every experiment; the negative controls reuse the
"before" runs (the guard switched off, the parents that wait, the lock taken
twice) and expect the claim to fail.
"""

from __future__ import annotations

import pytest

from labkit import LocalCluster
from labkit.lessons import deadlock
from labkit.measure import Comparison

pytestmark = pytest.mark.cluster

SUB, TIMEOUT, LOCK = 0.3, 2.0, 1.0


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(**deadlock.CLUSTER, reuse=False) as c:
        yield c


@pytest.fixture(scope="module")
def runs(cluster):
    guarded = deadlock.guarded(cluster, subtask_s=SUB, timeout_s=TIMEOUT)
    unguarded = deadlock.guarded(cluster, subtask_s=SUB, timeout_s=TIMEOUT, guard=False)
    sweep = deadlock.sweep(cluster, parents=[deadlock.POOL, deadlock.POOL + 1], subtask_s=SUB, timeout_s=TIMEOUT)
    fixed = {f: deadlock.after(cluster, subtask_s=SUB, timeout_s=TIMEOUT, form=f) for f in deadlock.FORMS}
    locks = deadlock.compare_locks(cluster, lock_timeout_s=LOCK, subtask_s=SUB)
    return {"guarded": guarded, "unguarded": unguarded, "sweep": sweep, "fixed": fixed, "locks": locks}


def test_deadlock_guard_raises_runtime_error(runs):
    deadlock.guard_refuses(runs["guarded"])
    assert runs["unguarded"].meta["outcomes"] == ["ok"]  # one parent, a free slot: it "works"


def test_deadlock_claim_fails_without_the_fix_guard_off(runs):
    with pytest.raises(AssertionError, match="guard RuntimeError"):
        deadlock.guard_refuses(runs["unguarded"])


def test_deadlock_every_slot_holds_a_waiting_parent(runs):
    stuck, more = runs["sweep"]
    assert stuck.meta["completed"] == 0 and set(stuck.meta["outcomes"]) == {"TimeoutError"}
    assert stuck.meta["active"] == {"w1": ["deadlock.report"] * deadlock.POOL}
    assert more.meta["completed"] <= more.n - deadlock.POOL


@pytest.mark.parametrize("form", deadlock.FORMS)
def test_deadlock_chain_callback_chord_complete(runs, form):
    deadlock.fix_completes(Comparison(runs["sweep"][0], runs["fixed"][form]))


def test_deadlock_claim_fails_without_the_fix(runs):
    stuck = runs["sweep"][0]
    with pytest.raises(AssertionError, match="the fix completes every run"):
        deadlock.fix_completes(Comparison(stuck, stuck))


@pytest.mark.parametrize("which", ["reentry", "wait"])
def test_deadlock_locks_fixed(runs, which):
    comparison = runs["locks"][which]
    deadlock.fix_completes(comparison)
    assert set(comparison.before.meta["outcomes"]) == {"LockTimeout"}


@pytest.mark.parametrize("which", ["reentry", "wait"])
def test_deadlock_claim_fails_without_the_fix_locks(runs, which):
    before = runs["locks"][which].before
    with pytest.raises(AssertionError, match="the fix completes every run"):
        deadlock.fix_completes(Comparison(before, before))
