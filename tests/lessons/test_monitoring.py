"""Lesson 05's claims, asserted through the API on a real cluster (events on, heartbeats where asked)."""

from __future__ import annotations

import json

import pytest

from labkit import testing
from labkit.lessons import monitoring
from labkit.poll import poll_until

pytestmark = pytest.mark.cluster

N, REPEATS, BURST, FLOOD, THRESHOLD, WORKLOAD = 200, 2, 150, 120, 60, 80


@pytest.fixture(scope="module")
def cluster():
    with testing.cluster(**monitoring.CLUSTER) as c:
        yield c


@pytest.fixture(scope="module")
def dashboard(cluster):
    return cluster.dashboard()


@pytest.fixture(scope="module")
def cost(cluster, dashboard):
    return monitoring.overhead(cluster, n=N, repeats=REPEATS)


@pytest.fixture(scope="module")
def seen(cluster):
    return monitoring.pubsub(cluster, n=BURST)


@pytest.fixture(scope="module")
def rabbit_soon():
    """The RabbitMQ cluster of the last section, booting from the alerts on (they mostly wait)."""
    with testing.booting(**monitoring.RABBIT) as r:
        yield r


@pytest.fixture(scope="module")
def fired(cluster, rabbit_soon):
    return monitoring.alerts(cluster, flood=FLOOD, threshold=THRESHOLD)


def test_only_the_worker_with_events_shows_up_in_the_events(cost, dashboard, cluster):
    quiet, plain = cluster.workers["quiet"].hostname, cluster.workers["plain"].hostname

    def heard_all():  # the tasks count themselves before their last event is sent: wait for it
        snap = dashboard.snapshot()
        done = snap["workers"].get(quiet, {}).get("processed", 0) >= N * REPEATS
        return snap if done else None

    snap = poll_until(heard_all, 10, 0.05) or dashboard.snapshot()
    assert snap["workers"][quiet]["processed"] >= N * REPEATS, snap["workers"]
    assert plain not in snap["workers"], "plain runs without -E: the dashboard cannot have heard of it"
    ratios = sorted(w / wo for w, wo in zip(cost["with"].values, cost["without"].values, strict=True))
    assert monitoring.overhead_percent(cost) == pytest.approx(100 * (1 - (ratios[0] + ratios[1]) / 2))


def test_a_listening_monitor_saw_the_burst_and_what_runs_now(seen):
    monitoring.monitor_saw_everything(seen["early"])


def test_monitoring_claim_fails_without_the_fix_late_monitor(seen):
    assert seen["late"].value == 0
    with pytest.raises(AssertionError, match="received, started and succeeded"):
        monitoring.monitor_saw_everything(seen["late"])


def test_heartbeats_make_a_paused_worker_alert(fired):
    monitoring.offline_alert_fires(fired["offline:after"])


def test_monitoring_claim_fails_without_the_fix_no_heartbeats(fired):
    assert not fired["offline:before"].meta["seen_alive"]
    with pytest.raises(AssertionError, match="offline alert fired"):
        monitoring.offline_alert_fires(fired["offline:before"])


def test_sent_events_make_a_flooded_queue_alert(fired):
    monitoring.queue_alert_fires(fired["queue:after"])


def test_monitoring_claim_fails_without_the_fix_no_sent_events(fired):
    before = fired["queue:before"].meta
    assert before["llen_max"] >= THRESHOLD, "the queue really was flooded: only the events did not say so"
    with pytest.raises(AssertionError, match="depth alert fired"):
        monitoring.queue_alert_fires(fired["queue:before"])


def test_paused_workers_are_resumed_and_the_flood_is_gone(fired, cluster):
    assert cluster.workers["w1"].state == "running" and cluster.workers["quiet"].state == "running"
    r = cluster.redis_client()
    assert r.llen(monitoring.BEATING_Q) == 0 and r.llen(monitoring.QUIET_Q) == 0
    r.close()


def test_flower_dashboard_and_inspect_agree_on_a_workload(cluster, dashboard, fired):
    flower = cluster.add_flower()
    load = monitoring.workload(cluster, n=WORKLOAD, slow=0.05)
    tasks = monitoring.flower_tasks(flower, load.meta["ids"])
    assert len(tasks) == WORKLOAD
    failures = sum(t["state"] == "FAILURE" for t in tasks.values())
    assert failures == load.meta["failed"] == WORKLOAD // 10
    stats = cluster.app.control.inspect(timeout=2).stats()
    workers = json.loads(flower.get("/api/workers?refresh=1"))
    table = monitoring.side_by_side(dashboard.snapshot(), workers, tasks, stats)
    for row in table.rows:
        name, _status, processed, _failed, flower_total, *_rest, inspect_total = row
        if name in ("w1", "w2"):
            assert processed == inspect_total == flower_total, table


# ----------------------------------------------------------------------------- the broker's own view (RabbitMQ)
@pytest.fixture(scope="module")
def hung(rabbit_soon):
    with rabbit_soon.start() as r:
        assert r.management_url.startswith("http://127.0.0.1:")
        yield monitoring.hung_queue(r, flood=120)


def test_the_management_plugin_counts_a_hung_workers_backlog(hung):
    monitoring.broker_counts_the_backlog(hung["management"])
    m = hung["management"].meta
    assert hung["dashboard"].value == m["ready"] < m["flood"]  # the dashboard's depth is the ready part


@pytest.mark.parametrize("view", ["events", "dashboard"])
def test_monitoring_claim_fails_without_the_fix_other_views(hung, view):
    """The same check on the events' count (nothing) and on the ready count alone (not the prefetch)."""
    with pytest.raises(AssertionError, match="every message sent"):
        monitoring.broker_counts_the_backlog(hung[view])
