"""Lesson 04's claims on a real cluster, through labkit's pytest plugin (``labkit_cluster``).

Connections are counted by Redis itself (``INFO stats``, ``CLIENT LIST``),
wrong answers and handler calls by the tasks and handlers in Redis.
"""

from __future__ import annotations

import pytest

from labkit.lessons import task_classes
from labkit.measure import Comparison

pytestmark = [pytest.mark.cluster, pytest.mark.labkit(**task_classes.CLUSTER)]

N = 50  # tasks per measurement: per call opens N, the lazy db at most 2 — the notebook's 200 add nothing
FORK_N, ROUNDS = 50, 10  # 500 ECHOs on one shared socket: dozens to hundreds go to the wrong child


@pytest.fixture(scope="module")
def runs(labkit_cluster) -> dict:
    """The notebook's order: per call; then the slide's property on fresh children; then DBTask on the same."""
    per_call = task_classes.connections(labkit_cluster, "per_call", n=N, fresh=False)
    slide = task_classes.connections(labkit_cluster, "slide", n=N)
    return {"per_call": per_call, "slide": slide,
            "lazy": task_classes.connections(labkit_cluster, "lazy", n=N, fresh=False)}


@pytest.fixture(scope="module")
def connections(runs) -> Comparison:
    return Comparison(runs["per_call"], runs["lazy"], better="lower")


@pytest.fixture(scope="module")
def per_type(runs) -> Comparison:
    return Comparison(runs["slide"], runs["lazy"], better="lower")


@pytest.fixture(scope="module")
def fork(labkit_cluster) -> Comparison:
    return task_classes.compare_fork(labkit_cluster, n=FORK_N, rounds=ROUNDS)


@pytest.fixture(scope="module")
def calls(labkit_cluster) -> dict:
    return task_classes.handlers(labkit_cluster, time_limit=1.0)


def test_task_classes_lazy_connection_opens_one_per_child(connections):
    task_classes.lazy_connection_per_child(connections)
    assert connections.before.meta["control"] == 0, connections.before.meta  # Celery's own: none


def test_task_classes_claim_fails_without_the_fix(connections):
    with pytest.raises(AssertionError, match="claim does not hold"):
        task_classes.lazy_connection_per_child(Comparison(connections.before, connections.before))


def test_task_classes_one_connection_per_process_not_per_task_type(per_type):
    task_classes.one_connection_per_process(per_type)
    assert per_type.before.meta["live_db_connections"] <= 2 * per_type.before.meta["concurrency"]


def test_task_classes_claim_fails_without_the_fix_per_type(per_type):
    with pytest.raises(AssertionError, match="claim does not hold"):
        task_classes.one_connection_per_process(Comparison(per_type.before, per_type.before))


def test_task_classes_connection_made_before_the_fork_is_shared(fork):
    task_classes.connect_after_the_fork(fork)
    before = fork.before.meta
    assert before["opened_by_main_process"] == 1 < before["children_used"]  # made in the main process, used by all
    # a child whose read failed on the garbled stream drops its copy and reconnects on its own: one per error at most
    assert before["db_connections_of_worker"] - 1 <= before["errors"], before
    after = fork.after.meta  # one connection per child that ever ran a DBTask (some may not have run one here)
    assert after["children_used"] <= after["db_connections_of_worker"] <= after["concurrency"], after
    assert fork.after.meta["opened_by_main_process"] == 0


def test_task_classes_claim_fails_without_the_fix_fork(fork):
    with pytest.raises(AssertionError, match="claim does not hold"):
        task_classes.connect_after_the_fork(Comparison(fork.before, fork.before))


def test_task_classes_handlers_per_fate(calls):
    def row(case: str) -> dict[str, int]:
        i = task_classes.CASES.index(case)
        return {h: int(calls[h].values[i]) for h in task_classes.HANDLERS if calls[h].values[i]}

    assert row("success") == {"on_success": 1, "after_return": 1}
    assert row("failure") == {"on_failure": 1, "after_return": 1, "task_failure": 1}
    assert row("retry") == {"on_retry": 1, "on_success": 1, "after_return": 1}  # after_return: final attempt only
    assert row("sigkill") == {"task_failure": 1}
    assert row("time_limit")["on_failure"] == 1 and row("time_limit")["after_return"] == 1
    # billiard's on_hard_timeout sets the job's error (Request.on_failure: task_failure) and then calls
    # Request.on_timeout (task_failure again), in one callback of the main process: twice, every time
    assert row("time_limit")["task_failure"] == 2 and calls["task_failure"].meta["where"]["time_limit"] == ["main"]
    assert calls["on_failure"].meta["where"]["time_limit"] == ["main"]  # run by the worker's main process
    assert sum(calls["after_failure"].values) == 0


def test_task_classes_on_failure_hears_failures(calls):
    task_classes.on_failure_is_the_handler(task_classes.alerts(calls))


def test_task_classes_claim_fails_without_the_fix_handler(calls):
    alerts = task_classes.alerts(calls)
    with pytest.raises(AssertionError, match="claim does not hold"):
        task_classes.on_failure_is_the_handler(Comparison(alerts.before, alerts.before))


def test_task_classes_only_the_signal_hears_a_killed_child(calls):
    task_classes.only_the_signal_hears_a_kill(task_classes.killed_child_alerts(calls))


def test_task_classes_claim_fails_without_the_fix_signal(calls):
    killed = task_classes.killed_child_alerts(calls)
    with pytest.raises(AssertionError, match="claim does not hold"):
        task_classes.only_the_signal_hears_a_kill(Comparison(killed.before, killed.before))


def test_task_classes_the_slide_as_printed():
    assert isinstance(task_classes.run_the_slide(), NameError)
    assert task_classes.who_reads_abstract() == []
