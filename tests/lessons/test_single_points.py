"""Lesson 10 (single points of failure): its claims on real processes, with a negative control for each.

The clusters of the notebook, each started once: the single points (one
Redis, one ZooKeeper), the hardened one (Sentinel, a 3-node ensemble) and
two RabbitMQ clusters (three quorum nodes, and one node for its negative
control). All but the first boot in the background from the start, while the
first's experiments (mostly waiting) run. The negative controls reuse the
"before" runs.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest

from labkit import LocalCluster, testing
from labkit.lessons import failures, single_points
from labkit.measure import Comparison

pytestmark = pytest.mark.cluster

WINDOW_S, FAILOVER_S, DB_TASKS, OUTAGE_S = 2.0, 10.0, 6, 1.0


@pytest.fixture(autouse=True, scope="module")
def soon():
    """The hardened cluster and both RabbitMQ clusters boot from the start, as notebook 10's second
    part boots its own: three quorum nodes, and the single node of the negative control (no
    worker: what it measures is whether the broker accepts publishes)."""
    with testing.booting(**single_points.HA) as ha, testing.booting(**single_points.RABBIT) as three, \
            testing.booting(**{**single_points.RABBIT, "rabbitmq_nodes": 1, "workers": 0}) as single:
        yield {"ha": ha, "three": three, "single": single}


@pytest.fixture(scope="module")
def alone():
    """The single points: the only ZooKeeper and the only Redis, each SIGKILLed under load."""
    with LocalCluster(**single_points.CLUSTER, reuse=False) as c:
        out = single_points.kill_single_points(c, window_s=WINDOW_S)
    return {"zk": out["zookeeper"], "redis": out["redis"]}


@pytest.fixture(scope="module")
def hardened(soon):
    """The ensemble losing its leader, then another node; the visibility workload on the Sentinel
    cluster and the three-node RabbitMQ cluster at once, as in the notebook; then the failover."""
    ha = soon["ha"].start()
    out = {"one_down": single_points.lock_service(ha, kill=1, window_s=WINDOW_S),
           "two_down": single_points.lock_service(ha, kill=1, window_s=WINDOW_S)}
    out["vt"], soon["vt"] = failures.visibility_each(ha, soon["three"].start())
    out["failover"] = single_points.failover(ha, window_s=FAILOVER_S)
    return out


@pytest.fixture(scope="module")
def rabbit(soon, hardened):
    """The three-node RabbitMQ cluster (quorum queues), after its visibility run next to the hardened
    cluster's: a node's death, then the database outage on the two nodes left; meanwhile, on the
    single node, the negative control's death (another broker: the two runs share nothing)."""
    r, single = soon["three"].start(), soon["single"].start()
    with ThreadPoolExecutor(1, thread_name_prefix="labkit-single") as pool:
        single_death = pool.submit(single_points.node_death, single, window_s=WINDOW_S)
        nodes = r.rabbitmq_nodes
        out = {
            "broker_url": r.broker_url,
            "members": {n.node: sorted(n.running_nodes()) for n in nodes},
            "types": nodes[0].queue_types(),
            "vt": soon["vt"],
            "death": single_points.node_death(r, window_s=WINDOW_S),
        }
        out["mitigation"] = single_points.compare_mitigation(r, n=DB_TASKS, outage_s=OUTAGE_S)
        out["single_death"] = single_death.result()
    return out


# ----------------------------------------------------------------------------- eliminate: ZooKeeper
def test_single_points_zookeeper_ensemble(alone, hardened):
    single_points.ensemble_survives(Comparison(hardened["two_down"], hardened["one_down"]))
    single_points.ensemble_survives(Comparison(alone["zk"], hardened["one_down"]))


def test_single_points_claim_fails_without_the_fix_no_quorum(hardened):
    two = hardened["two_down"]
    with pytest.raises(AssertionError, match="locks are served again"):
        single_points.ensemble_survives(Comparison(two, two))


def test_single_points_claim_fails_when_the_ensemble_came_back_past_its_bound(hardened):
    """Served again, but later than the ensemble's own bound allows: the claim is about the bound."""
    one = hardened["one_down"]
    late = dataclasses.replace(one, meta={**one.meta, "first_after_s": one.meta["patience_s"] + 0.5})
    with pytest.raises(AssertionError, match="bound for losing its leader"):
        single_points.ensemble_survives(Comparison(hardened["two_down"], late))


def test_single_points_claim_fails_without_the_fix_standalone_zookeeper(alone):
    zk = alone["zk"]
    assert zk.meta["nodes"] == 1 and zk.meta["ok_before"] > 0 and zk.meta["ok_after"] == 0, zk.meta
    with pytest.raises(AssertionError, match="locks are served again"):
        single_points.ensemble_survives(Comparison(zk, zk))


# ----------------------------------------------------------------------------- eliminate: Sentinel
def test_single_points_sentinel_failover(alone, hardened):
    single_points.publishing_resumes(Comparison(alone["redis"], hardened["failover"]))


def test_single_points_claim_fails_without_the_fix_standalone_redis(alone):
    redis = alone["redis"]
    with pytest.raises(AssertionError, match="accepted publishes again"):
        single_points.publishing_resumes(Comparison(redis, redis))


# ----------------------------------------------------------------------------- the talk's broker: RabbitMQ
def test_single_points_three_rabbitmq_nodes_form_one_cluster(rabbit):
    """Every node sees all three running (the suite's only three-node cluster: the service is tested here)."""
    names = sorted(rabbit["members"])
    assert len(names) == 3 and all(seen == names for seen in rabbit["members"].values()), rabbit["members"]
    assert rabbit["broker_url"].count(";") == 2  # Celery fails over along the three nodes' URLs


def test_single_points_rabbitmq_has_no_visibility_timeout(hardened, rabbit):
    vt = rabbit["vt"]
    assert {m.meta["broker"] for m in vt.values()} == {"rabbitmq"} and rabbit["types"]["celery"] == "quorum"
    single_points.rabbitmq_runs_once(vt["long"], vt["countdown"])
    failures.effects_once(vt["long"])  # once, so no idempotency key was needed


def test_single_points_claim_fails_without_the_fix_visibility_timeout_on_redis(hardened):
    """The same check on the Sentinel cluster's run of the same workload: Redis ran both tasks again."""
    assert {m.meta["broker"] for m in hardened["vt"].values()} == {"redis"}
    with pytest.raises(AssertionError, match="one execution"):
        single_points.rabbitmq_runs_once(hardened["vt"]["long"], hardened["vt"]["countdown"])


def test_single_points_quorum_cluster_survives_a_node(rabbit):
    m = rabbit["death"]
    single_points.quorum_survives_a_node(m)
    assert m.meta["killed"] == "rabbit1" and m.meta["ok_before"] > 0


def test_single_points_claim_fails_without_the_fix_single_rabbitmq_node(rabbit):
    """One RabbitMQ node is a single point of failure like one Redis: after its death nothing is accepted."""
    m = rabbit["single_death"]
    assert m.meta["nodes"] == 1 and m.meta["ok_before"] > 0 and m.meta["ok_after"] == 0
    with pytest.raises(AssertionError, match="accepted again"):
        single_points.quorum_survives_a_node(m)


# ----------------------------------------------------------------------------- mitigate
def test_single_points_mitigation(rabbit):
    single_points.outage_becomes_delay(rabbit["mitigation"])


def test_single_points_claim_fails_without_the_fix_mitigation(rabbit):
    before = rabbit["mitigation"].before
    with pytest.raises(AssertionError, match="with the mitigation every task wrote"):
        single_points.outage_becomes_delay(Comparison(before, before, better="higher"))
