"""Lesson 06's claims, asserted through the API on a real cluster (w2's clock 1.5 s behind)."""

from __future__ import annotations

import pytest

from labkit import testing
from labkit.lessons import logs

pytestmark = pytest.mark.cluster

REQUESTS, PAUSE, BAD = 6, 0.04, 4


@pytest.fixture(scope="module")
def cluster():
    with testing.cluster(**logs.CLUSTER) as c:
        yield c


@pytest.fixture(scope="module")
def before(cluster):
    return logs.before(cluster, requests=REQUESTS, pause=PAUSE)


@pytest.fixture(scope="module")
def after(cluster, before):
    return logs.after(cluster, requests=REQUESTS, pause=PAUSE)


@pytest.fixture(scope="module")
def errors(cluster, after):
    return logs.error_reports(cluster, bad=BAD, crashes=1)


def test_out_of_order_counts_lines_listed_before_an_earlier_one():
    assert logs.out_of_order(["a", "b", "c"], ["a", "b", "c"]) == 0
    assert logs.out_of_order(["d", "e", "a", "b", "c"], ["a", "b", "c", "d", "e"]) == 2
    assert logs.out_of_order(["c", "b", "a"], ["a", "b", "c"]) == 2


def test_trace_by_root_id_is_exact(after):
    logs.trace_by_id_is_exact(after["find"])
    assert after["find"].meta["records"] >= REQUESTS * 9
    assert all(r["task_id"] and r["worker"] and r["host"] and r["dealer"] for r in after["find"].meta["example"])


def test_logs_claim_fails_without_the_fix_time_window(before):
    x = before["find"].meta
    assert x["missed"] > 0, "w2's lines should fall outside every window: its clock is behind"
    with pytest.raises(AssertionError, match="exactly its own lines"):
        logs.trace_by_id_is_exact(before["find"])


def test_causal_order_puts_no_line_out_of_order(after):
    logs.trace_is_in_order(after["order"])
    assert after["find"].meta["timestamp_out_of_order"] > 0, "central records keep the skewed clock"


def test_logs_claim_fails_without_the_fix_timestamp_merge(before):
    with pytest.raises(AssertionError, match="listed before a line that happened earlier"):
        logs.trace_is_in_order(before["order"])


def test_task_failure_signal_hears_every_failure_with_context(errors):
    logs.every_failure_reported(errors["task_failure"])
    assert errors["task_failure"].meta["failures"] == BAD + 1
    assert errors["task_failure"].meta["error_files"] == ["w1.log", "w2.log"]


def test_logs_claim_fails_without_the_fix_after_failure(errors):
    assert errors["after_failure"].meta["reported"] == 0
    with pytest.raises(AssertionError, match="all failures reported"):
        logs.every_failure_reported(errors["after_failure"])


def test_logs_claim_fails_without_the_fix_on_failure(errors):
    assert errors["on_failure"].meta["missed"] == ["crash"]
    with pytest.raises(AssertionError, match="all failures reported"):
        logs.every_failure_reported(errors["on_failure"])
