"""Lesson 10 (what failures do to a task): its claims on real processes, with a negative control for each.

Three clusters, each started once: the everyday one (standalone Redis without
persistence, a partitionable worker), one whose workers all use a long
visibility timeout (booting in the background from the start, as the
notebook's does), and a Redis with the append-only file. The negative
controls reuse the "before" runs.
"""

from __future__ import annotations

import pytest

from labkit import LocalCluster, testing
from labkit.lessons import failures
from labkit.measure import Comparison

pytestmark = pytest.mark.cluster

VICTIMS, TASK_S, BACKLOG, OUTAGE_S = 2, 1.0, 100, 1.0


@pytest.fixture(scope="module")
def everyday():
    """The everyday cluster's runs; its visibility run and the long-timeout cluster's run at once, as in the notebook."""
    with testing.booting(**failures.LONG_VT) as fixed, \
            LocalCluster(**failures.cluster_config(victims=VICTIMS), reuse=False) as c:
        out = {"matrix": failures.kill_matrix(c, victims=VICTIMS, task_s=TASK_S)}
        out["vt"], out["vt_fixed"] = failures.visibility_each(c, fixed.start())
        out["cut"] = failures.partition(c)
        out["outage"] = failures.broker_outage(c, backlog=BACKLOG, outage_s=OUTAGE_S)
    with LocalCluster(**failures.DURABLE, reuse=False) as d:
        out["kept"] = failures.backlog_restart(d, backlog=BACKLOG)
    return out


# ----------------------------------------------------------------------------- killed mid-task
def test_failures_kill_matrix(everyday):
    m = everyday["matrix"]
    failures.late_ack_survives_worker_kill(m["worker/late"])
    failures.late_ack_survives_worker_kill(m["worker/reject"])
    failures.reject_survives_child_kill(m["child/reject"])
    assert m["worker/early"].value == 0 and set(m["worker/early"].meta["states"]) == {"STARTED"}
    assert m["child/early"].value == 0 and set(m["child/early"].meta["states"]) == {"FAILURE"}
    assert m["child/late"].value == 0 and set(m["child/late"].meta["states"]) == {"FAILURE"}
    assert m["worker/late"].meta["ran_twice"] == VICTIMS  # redelivered: the killed run had started


def test_failures_claim_fails_without_the_fix_early_ack(everyday):
    with pytest.raises(AssertionError, match="every task completed"):
        failures.late_ack_survives_worker_kill(everyday["matrix"]["worker/early"])


def test_failures_claim_fails_without_the_fix_acks_late_alone(everyday):
    with pytest.raises(AssertionError, match="every task completed"):
        failures.reject_survives_child_kill(everyday["matrix"]["child/late"])


# ----------------------------------------------------------------------------- visibility timeout, partition
def test_failures_visibility_timeout(everyday):
    before, after = everyday["vt"], everyday["vt_fixed"]
    assert {m.meta["vt"] for m in after.values()} == {failures.LONG_VT_S}
    for key in ("long", "countdown"):
        failures.runs_once(Comparison(before[key], after[key]))
    failures.effects_once(before["idempotent"])
    failures.effects_once(after["long"])


def test_failures_claim_fails_without_the_fix_short_visibility_timeout(everyday):
    before = everyday["vt"]["long"]
    with pytest.raises(AssertionError, match="one execution per task"):
        failures.runs_once(Comparison(before, before))
    with pytest.raises(AssertionError, match="one side effect per task"):
        failures.effects_once(before)


def test_failures_partition_runs_the_task_twice_after_healing(everyday):
    plain, once = everyday["cut"]["plain"], everyday["cut"]["idempotent"]
    assert plain.value >= 2 and plain.meta["effects"] >= 2, plain.meta
    assert plain.meta["done_seen_while_cut"] == 0 and plain.meta["state"] == "SUCCESS"
    failures.effects_once(once)


def test_failures_claim_fails_without_the_fix_partition(everyday):
    with pytest.raises(AssertionError, match="one side effect per task"):
        failures.effects_once(everyday["cut"]["plain"])


# ----------------------------------------------------------------------------- outage, persistence
def test_failures_publishing_during_an_outage(everyday):
    failures.sized_policy_delivers(everyday["outage"]["sized"])
    default = everyday["outage"]["default"]
    assert default.meta["raised"] >= 1 and default.meta["silently_lost"] == 0, default.meta


def test_failures_claim_fails_without_the_fix_default_policy(everyday):
    with pytest.raises(AssertionError, match="every publish made during the outage"):
        failures.sized_policy_delivers(everyday["outage"]["default"])


def test_failures_backlog(everyday):
    failures.backlog_survives(everyday["kept"])


def test_failures_claim_fails_without_the_fix_no_persistence(everyday):
    with pytest.raises(AssertionError, match="the backlog survived"):
        failures.backlog_survives(everyday["outage"]["backlog"])
