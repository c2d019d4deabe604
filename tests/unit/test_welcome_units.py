"""Lesson 00 without processes: its cluster shape, its local-call measurement and its claims' arithmetic."""

from __future__ import annotations

import pytest

from labkit.lessons import welcome
from labkit.measure import Comparison, Measurement


def test_cluster_config_is_the_notebooks_shape():
    assert welcome.cluster_config() == welcome.CLUSTER == {"workers": 2, "worker_options": {"concurrency": 2}}
    assert welcome.cluster_config(workers=3, concurrency=1)["workers"] == 3
    for bad in ({"workers": 0}, {"concurrency": 0}, {"workers": 1.5}, {"workers": True}):
        with pytest.raises(ValueError, match="whole number"):
            welcome.cluster_config(**bad)
    with pytest.raises(ValueError, match="at least 2 pool children"):
        welcome.cluster_config(workers=1, concurrency=1)


def test_local_calls_are_measured_n_times():
    m = welcome.local_calls(n=7, calls=1000)
    assert m.n == 7 and len(set(m.values)) > 1, "n real samples, not one timing copied"
    assert all(v > 0 for v in m.values)


def _fan(counts, sent):
    return Measurement("fan-out", "tasks run per pool process", "tasks", counts, stat="sum",
                       meta={"tasks": sent, "processes": len(counts)})


def test_fan_out_claim():
    welcome.fan_out_spreads_over_processes(_fan([10, 10, 11, 9], 40))
    with pytest.raises(AssertionError, match="more than one OS process"):
        welcome.fan_out_spreads_over_processes(_fan([40], 40))
    with pytest.raises(AssertionError, match="every fan-out task completed"):
        welcome.fan_out_spreads_over_processes(_fan([10, 10], 40))


def test_latency_claim():
    remote = Measurement("task round trip", "latency", "s", [2e-3, 3e-3])
    local = Measurement("local call", "latency", "s", [1e-7, 1.1e-7])
    welcome.a_round_trip_costs_many_calls(Comparison(remote, local))
    with pytest.raises(AssertionError, match="improvement factor"):
        welcome.a_round_trip_costs_many_calls(Comparison(local, local))


def _killed(outcome="TimeoutError", state="STARTED", queue=0, unacked=0):
    return Measurement("default (early ack)", "copies of the message left in Redis", "messages", [queue + unacked],
                       stat="sum", meta={"outcome": outcome, "state": state,
                                         "after_kill": {"queue": queue, "unacked": unacked}})


def test_kill_claim():
    welcome.a_killed_workers_task_is_lost(_killed())
    with pytest.raises(AssertionError, match="no copy of the message"):
        welcome.a_killed_workers_task_is_lost(_killed(unacked=1))
    with pytest.raises(AssertionError, match="timed out"):
        welcome.a_killed_workers_task_is_lost(_killed(outcome="finished", state="SUCCESS"))


def test_batch_claim():
    def batch(by_worker):
        return Measurement("8 x slow(0.25)", "makespan", "s", [1.0], meta={"by_worker": by_worker})

    welcome.more_workers_share_the_batch(batch({"w1": 5, "w2": 3}), batch({"w1": 3, "w2": 3, "w3": 2}))
    with pytest.raises(AssertionError, match="more workers ran the batch"):
        welcome.more_workers_share_the_batch(batch({"w1": 5, "w2": 3}), batch({"w1": 4, "w2": 4}))
