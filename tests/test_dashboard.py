"""The live dashboard and Flower on real clusters: right numbers, keeps up, leaves no thread behind.

* After a workload, the dashboard's per-worker numbers equal what the workers
  say (``inspect()``) and its queue depths equal Redis ``LLEN``.
* It keeps up with a publisher sending 1 000 events/s (twice the 500/s the
  kit promises), in batches as workers send them, using a small share of one
  core for it (its threads' CPU time over the wall time); how much a loop in
  the kernel slows down meanwhile is printed.
* ``close()`` stops every thread it started; so does closing an attached cluster.
* Flower starts as a service: ready (API answers, subscribed to events),
  listed, torn down.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from labkit import attach, testing
from labkit.lessons import monitoring
from labkit.poll import poll_until

pytestmark = pytest.mark.cluster

PUBLISHER = textwrap.dedent("""
    import json, sys, time, uuid
    from labkit.app import make_app
    url, rate, total = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    app = make_app(url, include=[])
    with app.connection_for_write() as conn:
        # like a prefork worker: task events are buffered and published as lists
        d = app.events.Dispatcher(conn, hostname="bench@publisher", enabled=True,
                                  buffer_group=["task"], buffer_limit=12)
        print("go", flush=True)
        t0 = time.perf_counter()
        sent = 0
        while sent < total:
            uid = uuid.uuid4().hex
            d.send("task-received", uuid=uid, name="bench.noop")
            d.send("task-started", uuid=uid)
            d.send("task-succeeded", uuid=uid, runtime=0.001)
            sent += 3
            delay = t0 + sent / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        d.flush()
        print(json.dumps({"sent": sent, "seconds": time.perf_counter() - t0}))
""")


@pytest.fixture(scope="module")
def cluster():
    with testing.cluster(workers=2, zookeeper=0, events=True) as c:
        yield c


@pytest.fixture(scope="module")
def dashboard(cluster):
    return cluster.dashboard()


def test_numbers_match_inspect_after_a_workload(cluster, dashboard):
    n = 120
    results = [cluster.task(monitoring.work).delay(0.0, i % 7 == 0, f"C{i}") for i in range(n)]
    failed_by: dict[str, int] = {}
    for r in results:
        try:
            r.get(timeout=60)
        except ValueError:
            failed_by[r.worker] = failed_by.get(r.worker, 0) + 1
    assert sum(failed_by.values()) == len(range(0, n, 7))

    def seen_all():
        snap = dashboard.snapshot()
        return snap if sum(w["processed"] for w in snap["workers"].values()) >= n else None

    snap = poll_until(seen_all, 10, 0.05, what="the dashboard to hear of every task")
    stats = cluster.app.control.inspect(timeout=2).stats()
    assert set(snap["workers"]) == set(stats), (snap["workers"], stats)
    for host, w in snap["workers"].items():
        assert w["processed"] == sum(stats[host]["total"].values()), (host, w, stats[host]["total"])
        assert w["failed"] == failed_by.get(host, 0), (host, w, failed_by)
        assert w["pool"] == stats[host]["pool"]["max-concurrency"]
        assert w["active"] == 0
    task = snap["tasks"]["monitoring.work"]
    assert (task["count"], task["failed"]) == (n, sum(failed_by.values()))


def test_active_tasks_match_inspect_active(cluster, dashboard):
    running = [cluster.task(monitoring.work).delay(2.0) for _ in range(3)]
    poll_until(lambda: sum(w["active"] for w in dashboard.snapshot()["workers"].values()) == 3, 10, 0.05,
               what="three tasks to be seen started")
    active = cluster.app.control.inspect(timeout=1).active()
    snap = dashboard.snapshot()
    for host, w in snap["workers"].items():
        assert set(w["active_ids"]) == {t["id"] for t in active.get(host, [])}, (host, w, active)
    for r in running:
        r.get(timeout=30)


def test_queue_depths_are_redis_llen(cluster, dashboard):
    r = cluster.redis_client()
    for name in cluster.workers:
        cluster.pause(name)
    try:
        for i in range(40):
            cluster.task(monitoring.work).delay(0.0, False, f"Q{i}")
        depth = dashboard.snapshot()["queues"]["celery"]
        assert depth == r.llen("celery") >= 40 - len(cluster.workers)  # a paused BRPOP may hold one each
    finally:
        r.delete("celery")
        for name in cluster.workers:
            cluster.resume(name)
        r.close()


def _kernel_work(seconds: float) -> list[float]:
    """Time a fixed pure-Python loop again and again for ``seconds``: the kernel's own work."""
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        sum(i * i for i in range(20000))
        samples.append(time.perf_counter() - t0)
    return samples


def _publish(cluster, rate: int, total: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PUBLISHER, cluster.redis_url, str(rate), str(total)],
                            stdout=subprocess.PIPE, text=True)


def test_keeps_up_with_1000_events_per_second_and_costs_the_kernel_little(cluster, dashboard):
    rate, total = 1000, 3000
    # the kernel's loop while events fly and nobody listens ...
    dashboard.stop()
    quiet = _publish(cluster, rate, total)
    assert quiet.stdout.readline().strip() == "go"  # events are flowing from now on
    alone = _kernel_work(2.0)
    quiet.communicate(timeout=60)
    # ... and while the dashboard receives them (rendering a view, as in a notebook)
    dash = cluster.dashboard()
    dash.widget()
    before = dash.monitor.events_seen
    cpu0, render0 = dash.monitor.cpu_seconds, dash.render_seconds
    pub = _publish(cluster, rate, total)
    assert pub.stdout.readline().strip() == "go"
    busy = _kernel_work(2.0)
    out, _ = pub.communicate(timeout=60)
    published = time.perf_counter()
    report = json.loads(out.strip().splitlines()[-1])
    achieved = report["sent"] / report["seconds"]
    poll_until(lambda: dash.monitor.events_seen - before >= total, 30, 0.01)
    lag = time.perf_counter() - published
    got = dash.monitor.events_seen - before
    dash.stop()  # the event thread records its final CPU time as it exits
    cpu = dash.monitor.cpu_seconds - cpu0
    render = dash.render_seconds - render0
    share = (cpu + render) / report["seconds"]
    slowdown = statistics.median(busy) / statistics.median(alone)
    print(f"\npublisher {achieved:.0f} events/s for {report['seconds']:.2f} s; the dashboard had all {got} "
          f"{lag:.2f} s after the publisher exited; event thread {1e6 * cpu / max(got, 1):.0f} µs CPU per event, render "
          f"thread {render:.2f} s CPU in {dash.renders} renders: {100 * share:.1f}% of one core; "
          f"a pure-Python loop in the kernel: median {1e3 * statistics.median(alone):.2f} ms alone, "
          f"{1e3 * statistics.median(busy):.2f} ms with the dashboard (x{slowdown:.2f})")
    assert achieved >= 500, f"the publisher reached only {achieved:.0f} events/s"
    assert got == total, f"the dashboard counted {got} of {total} events"
    assert cpu < got / 2000, f"{1e6 * cpu / got:.0f} µs of CPU per event: it could not sustain 2000 events/s"
    assert lag <= 0.5 * report["seconds"], f"it fell behind: the last events came in {lag:.2f} s after publishing"
    assert share < 0.25, f"the dashboard's threads used {100 * share:.0f}% of a core (GIL time the kernel lacks)"
    assert dash.render_error is None, repr(dash.render_error)


def test_the_widget_view_and_its_static_fallback_travel_together(cluster):
    dash = cluster.dashboard()
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "workers" in bundle["text/html"] and "workers" in bundle["text/plain"]
    poll_until(lambda: dash.renders >= 1, 5, 0.05)
    assert dash.render_error is None


def test_close_leaves_no_dashboard_thread():
    with testing.cluster(workers=1, zookeeper=0, events=True) as c:
        dash = c.dashboard()
        dash.widget()  # the render thread, as in a notebook
        threads = dash.threads()
        assert sorted(t.name for t in threads) == ["labkit-dashboard-events", "labkit-dashboard-render"]
        assert c.dashboard() is dash, "a second call returns the running dashboard"
        c.task(monitoring.work).delay(0.0).get(timeout=30)
        poll_until(lambda: dash.snapshot()["workers"], 10, 0.05, what="the task's events")
    assert not any(t.is_alive() for t in threads) and dash.threads() == [] and not dash.running
    assert not any(t in threading.enumerate() for t in threads)
    assert "stopped" in dash.html() and dash.snapshot()["workers"], "the last numbers outlive the cluster"


def test_an_attached_cluster_has_a_dashboard_too(cluster):
    attached = attach(cluster.redis_url)
    dash = attached.dashboard()
    cluster.task(monitoring.work).delay(0.0).get(timeout=30)
    poll_until(lambda: dash.snapshot()["events"] >= 3, 10, 0.05, what="events on the attached dashboard")
    assert "celery" in dash.snapshot()["queues"]  # asked of the workers: active_queues()
    attached.close()
    assert dash.threads() == []


def test_flower_is_a_service_of_the_cluster(cluster):
    flower = cluster.add_flower()
    assert flower.url.startswith("http://127.0.0.1:") and flower.subscribed()
    assert any(s["kind"] == "flower" and s["state"] == "running" for s in cluster.status())
    assert flower.url in cluster._repr_html_()
    workers = json.loads(flower.get("/api/workers?refresh=1"))
    assert {w.hostname for w in cluster.workers.values()} <= set(workers)
    result = cluster.task(monitoring.work).delay(0.0, False, "F1")
    result.get(timeout=30)
    tasks = monitoring.flower_tasks(flower, [result.id])
    assert tasks[result.id]["args"] == "(0.0, False, 'F1')"
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:  # no credentials, no API
        urllib.request.urlopen(flower.url + "/api/workers", timeout=5)
    assert refused.value.code == 401
    pid = flower.pid
    cluster.close()
    assert flower.state == "stopped" and not flower.alive()
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


KERNEL_CODE = textwrap.dedent("""
    import threading, time
    from IPython.display import display
    from labkit import LocalCluster
    from labkit.lessons import monitoring
    c = LocalCluster(workers=1, zookeeper=0, events=True, reuse=False)
    d = c.dashboard(interval=0.2)
    display(d)
    for i in range(20):
        c.task(monitoring.work).delay(0.0).get(timeout=30)
    time.sleep(1.0)
    print("renders", d.renders, "error", repr(d.render_error))
    c.close()
    print("threads", [t.name for t in threading.enumerate() if t.name.startswith("labkit-dashboard")])
""")


def test_the_widget_view_updates_itself_through_a_real_kernel():
    """What a front end receives: the widget's model, then updates sent by the render thread."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    messages = []
    try:
        msg_id = kc.execute(KERNEL_CODE)
        while True:
            msg = kc.get_iopub_msg(timeout=120)
            if msg["parent_header"].get("msg_id") != msg_id and msg["msg_type"] != "comm_msg":
                continue
            messages.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    kinds = [m["msg_type"] for m in messages]
    assert "error" not in kinds, [m["content"] for m in messages if m["msg_type"] == "error"]
    shown = [m["content"]["data"] for m in messages if m["msg_type"] == "display_data"]
    assert shown and {"application/vnd.jupyter.widget-view+json", "text/html"} <= set(shown[0])
    updates = [m["content"]["data"]["state"]["value"] for m in messages if m["msg_type"] == "comm_msg"
               and m["content"]["data"].get("method") == "update" and "value" in m["content"]["data"]["state"]]
    assert any("monitoring.work" in u for u in updates), f"{len(updates)} widget updates, none with the tasks"
    assert "stopped" in updates[-1], "the last update marks the view stopped"
    out = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
    assert "error None" in out and "threads []" in out, out
    assert "Traceback" not in out, out


def test_a_monitor_without_a_broker_fails_clearly_and_leaves_no_thread():
    from labkit.app import make_app
    from labkit.dashboard import EventMonitor
    from labkit.services.base import free_port

    app = make_app(f"redis://127.0.0.1:{free_port()}/0", include=[])
    monitor = EventMonitor(app, name="labkit-orphan-monitor")
    with pytest.raises(TimeoutError, match=r"subscribed to no events within 2 s .*Connection refused"):
        monitor.start(timeout=2)
    assert not monitor.running
    assert not [t for t in threading.enumerate() if t.name == "labkit-orphan-monitor"]
