"""The dashboard's tallies and views, fed synthetic events by hand: no broker, no thread."""

from __future__ import annotations

import time

from labkit.app import make_app
from labkit.dashboard import Dashboard


def feed(dash: Dashboard, event: dict) -> None:
    """What the monitor's thread does with one received event."""
    event.setdefault("local_received", time.time())
    event.setdefault("timestamp", event["local_received"])
    event.setdefault("clock", 1)
    with dash.monitor.lock:
        dash.monitor.state.event(event)
        dash._on_event(event)


def test_tallies_follow_the_events():
    dash = Dashboard(make_app("redis://127.0.0.1:1/0", include=[]), "redis://127.0.0.1:1/0", queues=[],
                     pools={"w1@x": 2})
    feed(dash, {"type": "worker-online", "hostname": "w1@x", "freq": 2.0})
    for i, outcome in enumerate(["succeeded", "failed", "succeeded"]):
        uid = f"t{i}"
        feed(dash, {"type": "task-received", "hostname": "w1@x", "uuid": uid, "name": "demo.task"})
        feed(dash, {"type": "task-started", "hostname": "w1@x", "uuid": uid})
        feed(dash, {"type": f"task-{outcome}", "hostname": "w1@x", "uuid": uid, "runtime": 0.1 * (i + 1)})
    feed(dash, {"type": "task-received", "hostname": "w2@x", "uuid": "t9", "name": "demo.task"})
    feed(dash, {"type": "task-started", "hostname": "w2@x", "uuid": "t9"})
    feed(dash, {"type": "worker-heartbeat", "hostname": "w2@x", "freq": 5.0})  # a reply to a wakeup only
    snap = dash.snapshot()
    w1, w2 = snap["workers"]["w1@x"], snap["workers"]["w2@x"]
    assert (w1["processed"], w1["failed"], w1["active"], w1["pool"], w1["status"]) == (3, 1, 0, 2, "online")
    assert (w2["processed"], w2["active"], w2["status"]) == (0, 1, "no heartbeats")
    task = snap["tasks"]["demo.task"]
    assert (task["count"], task["succeeded"], task["failed"]) == (3, 2, 1)
    assert abs(task["p50_s"] - 0.2) < 1e-9
    page = dash.html(snap)
    assert "w1" in page and "no heartbeats" in page and "<svg" in page and "<rect" in page
    assert "demo.task" in str(dash)


def test_a_worker_whose_heartbeats_stop_is_reported_missing():
    dash = Dashboard(make_app("redis://127.0.0.1:1/0", include=[]), "redis://127.0.0.1:1/0", queues=[])
    long_ago = time.time() - 30
    feed(dash, {"type": "worker-heartbeat", "hostname": "w1@x", "freq": 2.0, "processed": 0,
                "local_received": long_ago, "timestamp": long_ago})
    assert dash.snapshot()["workers"]["w1@x"]["status"] == "missing"
    feed(dash, {"type": "worker-offline", "hostname": "w1@x"})
    assert dash.snapshot()["workers"]["w1@x"]["status"] == "offline"
