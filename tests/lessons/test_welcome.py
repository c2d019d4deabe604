"""Lesson 00's claims on a real cluster, each with a run where the effect is switched off.

One cluster (the notebook's shape) serves the whole module; each experiment
runs once (module-scoped fixtures) and both a claim and its negative control
read it.
"""

from __future__ import annotations

import pytest

from labkit import testing
from labkit.lessons import welcome
from labkit.measure import Comparison

pytestmark = pytest.mark.cluster  # every test here starts real processes


@pytest.fixture(scope="module")
def cluster():
    with testing.cluster(**welcome.CLUSTER) as c:
        yield c


@pytest.fixture(scope="module")
def killed(cluster):
    """The default task (early ack) and the same task with acks_late, each killed mid-run."""
    out = {}
    for late in (False, True):
        m = welcome.kill_mid_task(cluster, seconds=1.0, acks_late=late)
        cluster.restart(m.meta["victim"])
        out[late] = m
    return out


def test_fan_out_spreads_over_processes(cluster):
    welcome.fan_out_spreads_over_processes(welcome.fan_out(cluster, n=40))


def test_welcome_claim_fails_without_the_fix_one_pool_child(cluster):
    """Fan out to a queue that one single-child worker consumes: one process runs everything."""
    cluster.add_worker("single", queues=["welcome-single"], concurrency=1)
    try:
        m = welcome.fan_out(cluster, n=20, queue="welcome-single")
    finally:
        cluster.remove_worker("single")
    assert m.meta["processes"] == 1 and m.value == 20, m.meta
    with pytest.raises(AssertionError, match="more than one OS process"):
        welcome.fan_out_spreads_over_processes(m)


def test_a_round_trip_costs_many_calls(cluster):
    latency = welcome.compare_latency(cluster, n=30)
    assert latency.before.n == latency.after.n == 30
    assert len(set(latency.after.values)) > 1, "the local call must be measured n times, not copied"
    welcome.a_round_trip_costs_many_calls(latency)


def test_welcome_claim_fails_without_the_fix_no_hop():
    """With no broker in between (a local call on both sides) the factor is about 1."""
    local = Comparison(welcome.local_calls(n=10), welcome.local_calls(n=10), title="local vs local")
    with pytest.raises(AssertionError, match="improvement factor"):
        welcome.a_round_trip_costs_many_calls(local)


def test_a_killed_workers_task_is_lost(killed):
    m = killed[False]
    assert m.meta["acked_while_running"], m.meta
    welcome.a_killed_workers_task_is_lost(m)


def test_welcome_claim_fails_without_the_fix_acks_late(killed):
    """acks_late keeps the message in Redis's unacked hash: the work is not lost, so the claim fails."""
    m = killed[True]
    assert m.meta["while_running"]["unacked"] == 1 and m.meta["after_kill"]["unacked"] == 1, m.meta
    with pytest.raises(AssertionError, match="no copy of the message is left"):
        welcome.a_killed_workers_task_is_lost(m)


@pytest.fixture(scope="module")
def batches(cluster):
    """The exercise: two batches on the notebook's workers, then one after add_worker(concurrency=4)."""
    before = welcome.makespan(cluster, n=8, seconds=0.25)
    again = welcome.makespan(cluster, n=8, seconds=0.25)
    cluster.add_worker("extra", concurrency=4)
    try:
        after = welcome.makespan(cluster, n=8, seconds=0.25)
    finally:
        cluster.remove_worker("extra")
    return {"before": before, "again": again, "after": after}


def test_more_workers_share_the_batch(batches):
    welcome.more_workers_share_the_batch(batches["before"], batches["after"])
    lanes = {"before": 4, "again": 4, "after": 8}
    for name, m in batches.items():  # no batch beats its pool children
        assert m.value >= 0.9 * 8 * 0.25 / lanes[name], (name, m.value)


def test_welcome_claim_fails_without_the_fix_no_new_worker(batches):
    """Two batches with no worker added in between: the same workers share them."""
    with pytest.raises(AssertionError, match="more workers ran the batch"):
        welcome.more_workers_share_the_batch(batches["before"], batches["again"])
