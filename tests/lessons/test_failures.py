"""Lesson 10's claims on real processes, with a negative control for each.

Three clusters, each started once: the everyday one (standalone Redis without
persistence, one ZooKeeper, a partitionable worker), a Redis with the
append-only file, and the hardened one (Sentinel, a 3-node ensemble, a long
visibility timeout), plus two RabbitMQ clusters (three quorum nodes, and one
node for its negative control) that boot in the background from the start.
The negative controls reuse the "before" runs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from labkit import LocalCluster, testing
from labkit.lessons import failures
from labkit.measure import Comparison

pytestmark = pytest.mark.cluster

VICTIMS, TASK_S, BACKLOG, OUTAGE_S, WINDOW_S, FAILOVER_S = 2, 1.0, 100, 1.0, 2.0, 10.0


@pytest.fixture(autouse=True, scope="module")
def rabbit_soon():
    """Both RabbitMQ clusters boot from the start, while the Redis experiments (mostly waiting) run,
    as notebook 10 boots its own: three quorum nodes, and the single node of the negative control
    (no worker: what it measures is whether the broker accepts publishes)."""
    with testing.booting(**failures.RABBIT) as three, \
            testing.booting(**{**failures.RABBIT, "rabbitmq_nodes": 1, "workers": 0}) as single:
        yield {"three": three, "single": single}


@pytest.fixture(scope="module")
def everyday():
    with LocalCluster(**failures.cluster_config(victims=VICTIMS), reuse=False) as c:
        out = {
            "matrix": failures.kill_matrix(c, victims=VICTIMS, task_s=TASK_S),
            "vt": failures.visibility(c),
            "cut": failures.partition(c),
            "mitigation": failures.compare_mitigation(c, n=6, outage_s=OUTAGE_S),
            "outage": failures.broker_outage(c, backlog=BACKLOG, outage_s=OUTAGE_S),
            "zk_alone": failures.lock_service(c, kill=1, window_s=WINDOW_S),
            "redis_alone": failures.failover(c, window_s=WINDOW_S),
        }
    with LocalCluster(**failures.DURABLE, reuse=False) as d:
        out["kept"] = failures.backlog_restart(d, backlog=BACKLOG)
    return out


@pytest.fixture(scope="module")
def hardened(rabbit_soon):
    """The hardened cluster; its visibility run and the three-node RabbitMQ cluster's run at once, as in the notebook."""
    with LocalCluster(**failures.HA, reuse=False) as ha:
        vt, rabbit_soon["vt"] = failures.visibility_each(ha, rabbit_soon["three"].start())
        yield {
            "vt": vt,
            "failover": failures.failover(ha, window_s=FAILOVER_S),
            "one_down": failures.lock_service(ha, kill=1, window_s=WINDOW_S),
            "two_down": failures.lock_service(ha, kill=1, window_s=WINDOW_S),
        }


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
def test_failures_visibility_timeout(everyday, hardened):
    for key in ("long", "countdown"):
        failures.runs_once(Comparison(everyday["vt"][key], hardened["vt"][key]))
    failures.effects_once(everyday["vt"]["idempotent"])
    failures.effects_once(hardened["vt"]["long"])


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


# ----------------------------------------------------------------------------- mitigation, outage, persistence
def test_failures_mitigation(everyday):
    failures.outage_becomes_delay(everyday["mitigation"])


def test_failures_claim_fails_without_the_fix_mitigation(everyday):
    before = everyday["mitigation"].before
    with pytest.raises(AssertionError, match="with the mitigation every task wrote"):
        failures.outage_becomes_delay(Comparison(before, before, better="higher"))


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


# ----------------------------------------------------------------------------- eliminate
def test_failures_sentinel_failover(everyday, hardened):
    failures.publishing_resumes(Comparison(everyday["redis_alone"], hardened["failover"]))


def test_failures_claim_fails_without_the_fix_standalone_redis(everyday):
    alone = everyday["redis_alone"]
    with pytest.raises(AssertionError, match="accepted publishes again"):
        failures.publishing_resumes(Comparison(alone, alone))


def test_failures_zookeeper_ensemble(everyday, hardened):
    failures.ensemble_survives(Comparison(hardened["two_down"], hardened["one_down"]))
    failures.ensemble_survives(Comparison(everyday["zk_alone"], hardened["one_down"]))


def test_failures_claim_fails_without_the_fix_no_quorum(hardened):
    two = hardened["two_down"]
    with pytest.raises(AssertionError, match="locks are still served"):
        failures.ensemble_survives(Comparison(two, two))


# ----------------------------------------------------------------------------- the talk's broker: RabbitMQ
@pytest.fixture(scope="module")
def rabbit(rabbit_soon):
    """The three-node RabbitMQ cluster (quorum queues): visibility, then a node's death; meanwhile, on
    the single node, the negative control's death (another broker: the two runs share nothing)."""
    with rabbit_soon["three"].start() as r, rabbit_soon["single"].start() as single, \
            ThreadPoolExecutor(1, thread_name_prefix="labkit-single") as pool:
        single_death = pool.submit(failures.node_death, single, window_s=WINDOW_S)
        nodes = r.rabbitmq_nodes
        yield {
            "broker_url": r.broker_url,
            "members": {n.node: sorted(n.running_nodes()) for n in nodes},
            "types": nodes[0].queue_types(),
            "vt": rabbit_soon.get("vt") or failures.visibility(r),  # measured next to the hardened cluster's
            "death": failures.node_death(r, window_s=WINDOW_S),
            "single_death": single_death.result(),
        }


def test_failures_three_rabbitmq_nodes_form_one_cluster(rabbit):
    """Every node sees all three running (the suite's only three-node cluster: the service is tested here)."""
    names = sorted(rabbit["members"])
    assert len(names) == 3 and all(seen == names for seen in rabbit["members"].values()), rabbit["members"]
    assert rabbit["broker_url"].count(";") == 2  # Celery fails over along the three nodes' URLs


def test_failures_rabbitmq_has_no_visibility_timeout(rabbit):
    vt = rabbit["vt"]
    assert {m.meta["broker"] for m in vt.values()} == {"rabbitmq"} and rabbit["types"]["celery"] == "quorum"
    failures.rabbitmq_runs_once(vt["long"], vt["countdown"])
    failures.effects_once(vt["long"])  # once, so no idempotency key was needed


def test_failures_claim_fails_without_the_fix_visibility_timeout_on_redis(everyday):
    """The same check on the Redis run of the same workload: the visibility timeout ran both tasks again."""
    with pytest.raises(AssertionError, match="one execution"):
        failures.rabbitmq_runs_once(everyday["vt"]["long"], everyday["vt"]["countdown"])


def test_failures_quorum_cluster_survives_a_node(rabbit):
    m = rabbit["death"]
    failures.quorum_survives_a_node(m)
    assert m.meta["killed"] == "rabbit1" and m.meta["ok_before"] > 0


def test_failures_claim_fails_without_the_fix_single_rabbitmq_node(rabbit):
    """One RabbitMQ node is a single point of failure like one Redis: after its death nothing is accepted."""
    m = rabbit["single_death"]
    assert m.meta["nodes"] == 1 and m.meta["ok_before"] > 0 and m.meta["ok_after"] == 0
    with pytest.raises(AssertionError, match="accepted again"):
        failures.quorum_survives_a_node(m)
