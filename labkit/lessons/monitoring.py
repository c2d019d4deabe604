"""Lesson 05: monitoring — Celery events, what they cost, what they miss, and alerts built on them.

A Celery worker started with ``-E`` publishes an event at every step of
every task, and (unless ``--without-heartbeat``) a ``worker-heartbeat`` every
``freq`` seconds. Monitors — ``celery events``, Flower, the kit's
:class:`~labkit.dashboard.Dashboard` — subscribe to them and fold them into
``app.events.State``. What this module measures on real workers:

* **cost**: throughput of a burst of no-op tasks on a worker without events
  (``plain``) and one with them (``quiet``), same queue preload, same pool;
* **pub/sub**: events of a burst counted by a monitor that was listening and
  by one started afterwards; and "what is running now" according to each
  monitor's ``State`` next to the workers' own answer (``inspect().active()``);
* **alerts**: two rules evaluated on the events — *a worker missed its
  heartbeats* (Celery's rule: silent for 2 × ``freq``) and *a queue is deeper
  than a threshold* (task-sent minus task-received events per queue) —
  triggered for real by pausing workers (SIGSTOP) and flooding their queues.
  "After" is a worker with heartbeats and a producer that sends
  ``task-sent`` events; "before" is the kit's default worker (no
  heartbeats) and a producer with Celery's default (no ``task-sent``).

* **the broker's own view** (:data:`RABBIT`, a second cluster whose broker
  is RabbitMQ with its management plugin — the talk's "pre-baked monitoring
  tool" for its broker): a hung worker's queue as the management HTTP API
  counts it (ready + unacknowledged messages, consumers), next to the kit's
  dashboard (a passive ``queue.declare``: ready messages only) and to
  events without ``task-sent`` (nothing).

Tasks count their own completions in Redis (``INCR``), so throughput does
not depend on the result backend or on the events being measured.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

from celery import shared_task

from labkit.app import redis_client
from labkit.measure import Measurement, claim, verify
from labkit.poll import poll_until
from labkit.table import Table

if TYPE_CHECKING:  # pragma: no cover
    from labkit.client import ClusterLike
    from labkit.cluster import LocalCluster

NOTEBOOK = "05_monitoring.ipynb"
HEARTBEAT = 2  # seconds between worker heartbeats (Celery's default) for the workers that send them
PLAIN_Q, QUIET_Q, BEATING_Q = "monitoring.plain", "monitoring.quiet", "monitoring.beating"
CLUSTER = {
    "workers": [
        {"name": "w1", "queues": ["celery", BEATING_Q], "heartbeat": HEARTBEAT},  # paused by the alert demo
        {"name": "w2", "heartbeat": HEARTBEAT},                                   # stays healthy
        {"name": "plain", "queues": [PLAIN_Q], "events": False},                  # no -E: the cost baseline
        {"name": "quiet", "queues": [QUIET_Q]},                                   # -E, no heartbeats (kit default)
    ],
    "zookeeper": 0,
    "events": True,
}
WORKSHOP = {"N": 500, "BURST": 400, "FLOOD": 400, "THRESHOLD": 200, "WORKLOAD": 300}
HUNG_Q = "monitoring.hung"
#: The broker's view: RabbitMQ with its management plugin, one worker with task events.
RABBIT = {
    "workers": [{"name": "r1", "queues": ["celery", HUNG_Q]}],
    "zookeeper": 0,
    "events": True,
    "broker": "rabbitmq",
    "management": True,
}


# ----------------------------------------------------------------------------- tasks
@shared_task(name="monitoring.noop", ignore_result=True)
def noop(counter: str) -> None:
    """The cheapest task that still leaves a trace: count itself in Redis."""
    redis_client().incr(counter)


@shared_task(name="monitoring.hold", ignore_result=True)
def hold(gate: str, timeout: float = 60.0) -> None:
    """Run until the kernel opens ``gate`` (an item pushed to a Redis list), or ``timeout``."""
    redis_client().blpop(gate, timeout=timeout)


@shared_task(name="monitoring.work")
def work(seconds: float = 0.0, fail: bool = False, customer: str = "") -> float:
    """A task of the mixed workload: sleeps, sometimes fails (its arguments are what Flower shows)."""
    time.sleep(seconds)
    if fail:
        raise ValueError(f"invoice for customer {customer!r} has no lines")
    return seconds


# ----------------------------------------------------------------------------- cost of events
def _drain_time(cluster: LocalCluster, worker: str, queue: str, n: int, timeout: float) -> float:
    """Preload ``n`` no-op tasks while ``worker`` is paused, resume it, time until all ran."""
    r = cluster.redis_client()
    counter = f"monitoring:drain:{uuid.uuid4().hex[:8]}"
    cluster.pause(worker)
    try:
        task = cluster.task(noop)
        for _ in range(n):
            task.apply_async((counter,), queue=queue)
    finally:
        t0 = time.perf_counter()
        cluster.resume(worker)
    done = poll_until(lambda: int(r.get(counter) or 0) >= n, timeout, 0.005)
    elapsed = time.perf_counter() - t0
    r.delete(counter)
    r.close()
    if not done:
        raise TimeoutError(f"{worker}: {n} no-op tasks did not finish within {timeout:g} s")
    return elapsed


def throughput(cluster: LocalCluster, worker: str = "plain", *, n: int = 400, repeats: int = 3,
               label: str | None = None, timeout: float = 60.0) -> Measurement:
    """Tasks/s of ``n`` no-op tasks preloaded on ``worker``'s first queue, ``repeats`` times."""
    queue = cluster.workers[worker].spec.queues[0]
    rates = [n / _drain_time(cluster, worker, queue, n, timeout) for _ in range(repeats)]
    return Measurement(label or worker, "throughput", "tasks/s", rates, meta={"n": n, "worker": worker})


def overhead(cluster: LocalCluster, *, n: int = 400, repeats: int = 3, timeout: float = 60.0
             ) -> dict[str, Measurement]:
    """Throughput of ``n`` no-op tasks on ``plain`` (no events) and ``quiet`` (``-E``).

    The two workers are identical but for ``-E``; runs alternate so a
    change in machine load hits both. Returns ``{"without": ..., "with": ...}``.
    """
    rates: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(repeats):
        for key, worker, queue in (("without", "plain", PLAIN_Q), ("with", "quiet", QUIET_Q)):
            rates[key].append(n / _drain_time(cluster, worker, queue, n, timeout))
    meta = {"n": n, "repeats": repeats}
    return {
        "without": Measurement("without events", "throughput", "tasks/s", rates["without"], meta=meta),
        "with": Measurement("with task events (-E)", "throughput", "tasks/s", rates["with"], meta=meta),
    }


def overhead_percent(measurements: dict[str, Measurement]) -> float:
    """What ``-E`` costs in percent of the throughput without it: the median over the paired runs.

    Runs alternate (without, with, without, ...), so each pair saw about the
    same machine load; the median of the pairs' ratios is less sensitive to a
    load spike than the ratio of the two medians.
    """
    pairs = zip(measurements["with"].values, measurements["without"].values, strict=True)
    return 100.0 * (1 - statistics.median(w / wo for w, wo in pairs))


# ----------------------------------------------------------------------------- pub/sub
def pubsub(cluster: ClusterLike, *, n: int = 200, running: int = 2, timeout: float = 30.0
           ) -> dict[str, Measurement]:
    """Events of a burst seen by a monitor listening before it vs one started after it.

    1. An *early* monitor subscribes; ``n`` no-op tasks run on the default
       queue; we wait until every one has run.
    2. ``running`` tasks start and wait for a gate we open at the end.
    3. A *late* monitor subscribes. Both monitors are asked what is running
       now (``State``), and so are the workers (``inspect().active()``).

    Returns ``{"late": ..., "early": ...}``: events of the burst each saw
    (3 per task: received, started, succeeded), with what was running in meta.
    """
    from labkit.dashboard import EventMonitor  # noqa: PLC0415

    r = cluster.redis_client()
    counter = f"monitoring:burst:{uuid.uuid4().hex[:8]}"
    gate = f"monitoring:gate:{uuid.uuid4().hex[:8]}"
    per_task = {"early": Counter(), "late": Counter()}

    def counting(key: str):
        def count(event: dict) -> None:
            if event.get("type", "").startswith("task-"):
                per_task[key][event.get("uuid")] += 1
        return count

    early = EventMonitor(cluster.app, callbacks=[counting("early")], name="labkit-early-monitor").start()
    late = EventMonitor(cluster.app, callbacks=[counting("late")], name="labkit-late-monitor")
    try:
        burst = [cluster.task(noop).delay(counter).id for _ in range(n)]
        poll_until(lambda: int(r.get(counter) or 0) >= n, timeout, 0.01, what=f"{n} no-op tasks to run")

        def burst_events(monitor) -> int:
            key = "early" if monitor is early else "late"
            with monitor.lock:
                return sum(per_task[key][uid] for uid in burst)

        # the last events are still on their way when the counter says done
        poll_until(lambda: burst_events(early) >= 3 * n, 5.0, 0.02)
        sleeper_ids = {cluster.task(hold).delay(gate, timeout).id for _ in range(running)}

        def running_in(monitor) -> set[str]:
            with monitor.lock:
                return {uid for uid, t in monitor.state.tasks.items() if t.state == "STARTED"} & sleeper_ids

        poll_until(lambda: len(running_in(early)) >= running, timeout, 0.02, what=f"{running} tasks to start")
        late.start()

        def active() -> set[str]:  # a worker slow to answer one broadcast answers the next
            replies = cluster.app.control.inspect(timeout=0.5).active() or {}
            return {t["id"] for ts in replies.values() for t in ts} & sleeper_ids

        truth = poll_until(lambda: (found := active()) >= sleeper_ids and found, timeout, 0) or set()
        seen = {"early": running_in(early), "late": running_in(late)}
        counts = {"early": burst_events(early), "late": burst_events(late)}
    finally:
        r.rpush(gate, *[1] * running)  # let the waiting tasks finish
        early.stop()
        late.stop()
        r.delete(counter)
        r.close()
    out = {}
    for key, label in (("late", "monitor started after the burst"), ("early", "monitor listening before it")):
        out[key] = Measurement(label, "events of the burst seen", "events", [counts[key]], meta={
            "n": n, "expected": 3 * n, "running": running, "running_seen": len(seen[key]),
            "running_truth": len(truth)})
    return out


@claim("a monitor that was listening saw all 3 events of every task, and knows what is running now")
def monitor_saw_everything(m: Measurement) -> None:
    x = m.meta
    verify("every task of the burst was seen received, started and succeeded",
           m.value == x["expected"], seen=m.value, expected=x["expected"], n=x["n"])
    verify("State lists every task that inspect().active() says is running",
           x["running_seen"] == x["running_truth"] == x["running"],
           state=x["running_seen"], inspect=x["running_truth"], started=x["running"])


# ----------------------------------------------------------------------------- alerts
class _QueueDepth:
    """Queue depth from events alone: ``task-sent`` (with its queue) minus ``task-received``."""

    def __init__(self) -> None:
        self.sent: dict[str, str] = {}  # task id -> queue, until received
        self.depth: Counter[str] = Counter()

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "task-sent":
            self.sent[event["uuid"]] = event.get("queue") or event.get("routing_key") or "?"
            self.depth[self.sent[event["uuid"]]] += 1
        elif kind == "task-received":
            queue = self.sent.pop(event.get("uuid"), None)
            if queue is not None:
                self.depth[queue] -= 1


def alerts(cluster: LocalCluster, *, flood: int = 200, threshold: int = 100, window: float | None = None,
           every: float = 0.05) -> dict[str, Measurement]:
    """Pause two workers and flood their queues; time how long until each alert rule fires.

    * ``w1`` sends heartbeats; the producer flooding its queue sends
      ``task-sent`` events (``task_send_sent_event=True``): the fix.
    * ``quiet`` runs without heartbeats (the kit's default); its queue is
      flooded through ``cluster.app`` (Celery's default: no ``task-sent``).

    A fresh :class:`~labkit.dashboard.EventMonitor` (``wakeup=False``) feeds
    Celery's ``State``; the rules are evaluated every ``every`` seconds for
    ``window`` seconds (default 4 heartbeat intervals: Celery's 2, and as
    many again for a busy machine, where the monitor's thread may read the
    last heartbeat late): *offline* = a worker
    ``State`` had seen alive is no longer ``alive`` (no heartbeat for 2 ×
    ``freq``); *queue* = task-sent minus task-received for the queue above
    ``threshold``. Redis ``LLEN`` is sampled alongside, as the ground truth.
    Returns four measurements of "time to alert" keyed ``offline:before``,
    ``offline:after``, ``queue:before``, ``queue:after`` (no sample = the
    alert never fired).
    """
    from labkit.app import make_app  # noqa: PLC0415
    from labkit.dashboard import EventMonitor  # noqa: PLC0415

    beating, quiet, healthy = (cluster.workers[n].hostname for n in ("w1", "quiet", "w2"))
    freq = cluster.workers["w1"].spec.heartbeat
    window = window if window is not None else 4.0 * freq
    depth = _QueueDepth()
    heartbeats: dict[str, list[float]] = defaultdict(list)

    def note_heartbeat(event: dict) -> None:
        if event.get("type") == "worker-heartbeat":
            heartbeats[event["hostname"]].append(event["local_received"])

    monitor = EventMonitor(cluster.app, wakeup=False, callbacks=[depth, note_heartbeat],
                           name="labkit-alert-monitor").start()
    producer = make_app(cluster.redis_url, settings={**cluster.settings, "task_send_sent_event": True},
                        include=[])
    r = cluster.redis_client()
    fired: dict[str, float] = {}
    samples: list[tuple[float, int, int, int, int]] = []
    try:
        def alive(host: str) -> bool:
            with monitor.lock:
                w = monitor.state.workers.get(host)
                return bool(w is not None and w.alive)

        poll_until(lambda: alive(beating) and alive(healthy), 3.0 * freq, 0.05,
                   what="the heartbeat workers to be seen alive by the monitor")
        seen_alive = {h for h in (beating, quiet, healthy) if alive(h)}
        def evaluate() -> bool:
            now = time.time() - t0
            with monitor.lock:
                d_after, d_before = depth.depth[BEATING_Q], depth.depth[QUIET_Q]
            for host in seen_alive:
                if not alive(host):
                    fired.setdefault(f"offline:{host}", now)
            if d_after > threshold:
                fired.setdefault(f"queue:{BEATING_Q}", now)
            if d_before > threshold:
                fired.setdefault(f"queue:{QUIET_Q}", now)
            samples.append((now, d_after, d_before, r.llen(BEATING_Q), r.llen(QUIET_Q)))
            return time.time() - t0 >= window

        t0 = time.time()
        cluster.pause("w1")
        cluster.pause("quiet")
        last = t0
        for _ in range(flood):
            producer.send_task(noop.name, ("monitoring:flood",), queue=BEATING_Q)
            cluster.task(noop).apply_async(("monitoring:flood",), queue=QUIET_Q)
            if time.time() - last >= every:  # the rules keep being evaluated while we flood
                evaluate()
                last = time.time()
        flooded = time.time() - t0
        poll_until(evaluate, window + 5.0, every)
    finally:
        r.delete(BEATING_Q, QUIET_Q, "monitoring:flood")
        for name in ("w1", "quiet"):
            if cluster.workers[name].state == "paused":
                cluster.resume(name)
        monitor.stop()
        producer.close()
        r.close()

    def at(t: float | None, column: int) -> int | None:
        return None if t is None else next((s[column] for s in samples if s[0] >= t), samples[-1][column])

    common = {"window": window, "every": every, "flood": flood, "threshold": threshold, "flooded_in": flooded,
              "samples": samples,
              "heartbeats": {h: [t - t0 for t in ts if t - t0 <= window] for h, ts in heartbeats.items()},
              "false_alerts": sorted(k for k in fired if k == f"offline:{healthy}")}
    out = {}
    for key, host, label in (("offline:before", quiet, "no heartbeats (kit default)"),
                             ("offline:after", beating, f"heartbeats every {freq} s")):
        t = fired.get(f"offline:{host}")
        out[key] = Measurement(label, "time to alert", "s", [] if t is None else [t], meta={
            **common, "rule": "offline", "worker": host, "freq": freq if host == beating else None,
            "fired": t is not None, "seen_alive": host in seen_alive})
    for key, queue, column, label in (("queue:before", QUIET_Q, 4, "producer without task-sent events"),
                                      ("queue:after", BEATING_Q, 3, "producer with task-sent events")):
        t = fired.get(f"queue:{queue}")
        out[key] = Measurement(label, "time to alert", "s", [] if t is None else [t], meta={
            **common, "rule": "queue", "queue": queue, "fired": t is not None,
            "llen_at_alert": at(t, column), "llen_max": max(s[column] for s in samples),
            "event_depth_max": max(s[column - 2] for s in samples)})
    return out


@claim("a paused worker that sends heartbeats is reported offline within 4 heartbeat intervals, "
       "and no healthy worker is")
def offline_alert_fires(m: Measurement) -> None:
    x = m.meta
    verify(f"the offline alert fired for {x['worker']} within the {x['window']:g} s window", x["fired"],
           worker=x["worker"], seen_alive=x["seen_alive"], heartbeats=bool(x["freq"]))
    verify("it fired within 4 heartbeat intervals of the pause", m.value <= 4 * x["freq"],
           time_to_alert=m.value, freq=x["freq"])
    verify("no healthy worker was reported offline", not x["false_alerts"], false_alerts=x["false_alerts"])


@claim("a flooded queue raises the depth alert, and Redis confirms the depth when it does")
def queue_alert_fires(m: Measurement) -> None:
    x = m.meta
    verify(f"the depth alert fired for {x['queue']} (threshold {x['threshold']})", x["fired"],
           event_depth_max=x["event_depth_max"], llen_max=x["llen_max"], flood=x["flood"])
    verify("LLEN was above the threshold when the alert fired (no phantom alert)",
           x["llen_at_alert"] >= x["threshold"], llen_at_alert=x["llen_at_alert"], threshold=x["threshold"])


def alerts_table(results: dict[str, Measurement]) -> Table:
    """One row per rule and side: fired or not, time to alert, what Redis said."""
    rows = []
    for key, m in results.items():
        rule, side = key.split(":")
        x = m.meta
        what = x.get("worker") or x.get("queue")
        truth = ("paused" if rule == "offline" else f"LLEN max {x['llen_max']}")
        rows.append([rule, side, m.label, what.split("@")[0], truth, "yes" if x["fired"] else "no",
                     m.value if x["fired"] else None])
    return Table(["rule", "side", "setup", "target", "truth", "alert fired", "time to alert s"], rows,
                 title=f"alerts within a {next(iter(results.values())).meta['window']:g} s window")


# ----------------------------------------------------------------------------- the broker's view (RabbitMQ)
def hung_queue(cluster: LocalCluster, *, flood: int = 200, worker: str = "r1", settle: float = 15.0
               ) -> dict[str, Measurement]:
    """Pause (SIGSTOP) ``worker``, send ``flood`` tasks to its queue, and count them three ways.

    ``"events"``: task-sent minus task-received, from an event monitor that
    listened throughout (the producer is ``cluster.app``: Celery's default,
    no ``task-sent``); ``"dashboard"``: the kit's dashboard's depth column
    (a passive ``queue.declare``: messages *ready*); ``"management"``: the
    management plugin's ``/api/queues`` (ready + unacknowledged). The
    management plugin's numbers are statistics refreshed every 0.5 s here
    (``collect_statistics_interval``; 5 s by default); all three are read
    once they have stopped changing. Then the queue is purged and the worker resumed.
    """
    from labkit.dashboard import EventMonitor  # noqa: PLC0415

    depth = _QueueDepth()
    monitor = EventMonitor(cluster.app, wakeup=False, callbacks=[depth], name="labkit-hung-monitor").start()
    dashboard = cluster.dashboard()
    path = "/api/queues/%2F/" + HUNG_Q.replace(".", "%2E")
    last: dict[str, Any] = {"key": None, "since": 0.0}
    t0 = time.monotonic()

    def read() -> dict[str, Any]:
        q = cluster.management_api(path)
        with monitor.lock:
            events = depth.depth[HUNG_Q]
        return {"ready": q.get("messages_ready", 0), "unacked": q.get("messages_unacknowledged", 0),
                "consumers": q.get("consumers", 0), "dashboard": dashboard.queue_depths().get(HUNG_Q, -1),
                "events": events}

    def stable() -> dict[str, Any] | None:
        now = read()
        key = tuple(sorted(now.items()))
        if key != last["key"]:
            last.update(key=key, since=time.monotonic())
        # unchanged across more than two statistics refreshes (every 0.5 s): the numbers have caught up
        return now if time.monotonic() - last["since"] >= 1.2 and now["ready"] + now["unacked"] > 0 else None

    try:
        cluster.pause(worker)
        for _ in range(flood):
            cluster.task(noop).apply_async(("monitoring:hung",), queue=HUNG_Q)
        sent_in = time.monotonic() - t0
        seen = poll_until(stable, settle, 0.2) or read()
    finally:
        with cluster.app.connection_for_write() as conn:
            conn.default_channel.queue_purge(HUNG_Q)
        cluster.resume(worker)
        monitor.stop()
    common = {"flood": flood, "worker": worker, "sent_in": sent_in, "read_after": time.monotonic() - t0, **seen}
    return {
        "events": Measurement("events, producer without task-sent", "messages counted", "messages",
                              [seen["events"]], meta={**common, "view": "events"}),
        "dashboard": Measurement("kit dashboard: ready (queue.declare)", "messages counted", "messages",
                                 [seen["dashboard"]], meta={**common, "view": "dashboard"}),
        "management": Measurement("management plugin: ready + unacknowledged", "messages counted", "messages",
                                  [seen["ready"] + seen["unacked"]], meta={**common, "view": "management"}),
    }


@claim("the broker's own view counts a hung worker's whole backlog — what waits and what the worker holds — "
       "and still lists the hung worker as a consumer")
def broker_counts_the_backlog(m: Measurement) -> None:
    """A measured comparison of views, not a fix: the same check fails on the dashboard's and the events' counts."""
    x = m.meta
    verify(f"{m.label}: every message sent to the hung worker's queue is counted", m.value == x["flood"],
           counted=m.value, flood=x["flood"], ready=x["ready"], unacked=x["unacked"])
    verify("the hung worker still holds a consumer and the messages prefetched to it",
           x["consumers"] >= 1 and x["unacked"] > 0, consumers=x["consumers"], unacked=x["unacked"])


def views_table(views: dict[str, Measurement]) -> Table:
    """One row per view of the hung worker's queue."""
    x = next(iter(views.values())).meta
    rows = [[m.label, m.value] for m in views.values()]
    return Table(["view", "messages counted"], rows,
                 title=f"{x['flood']} tasks sent to the paused {x['worker']}'s queue; the broker says "
                       f"{x['ready']} ready, {x['unacked']} unacknowledged, {x['consumers']} consumer(s)")


# ----------------------------------------------------------------------------- workload + Flower
def workload(cluster: ClusterLike, *, n: int = 200, slow: float = 0.2, fail_every: int = 10,
             timeout: float = 60.0) -> Measurement:
    """A mixed workload on the default queue: quick tasks, one slow in ten, one failing in ``fail_every``."""
    t0 = time.perf_counter()
    results = []
    for i in range(n):
        fail = fail_every > 0 and i % fail_every == fail_every - 1
        seconds = slow if i % 10 == 5 else 0.0
        results.append(cluster.task(work).delay(seconds, fail, f"C{i:04d}"))
    outcomes = Counter()
    for res in results:
        try:
            res.get(timeout=timeout)
            outcomes["ok"] += 1
        except ValueError:
            outcomes["failed"] += 1
    elapsed = time.perf_counter() - t0
    return Measurement("mixed workload", "makespan", "s", [elapsed], meta={
        "n": n, "ok": outcomes["ok"], "failed": outcomes["failed"], "ids": [r.id for r in results]})


def flower_tasks(flower: Any, ids: list[str], timeout: float = 10.0) -> dict[str, Any]:
    """Flower's ``/api/tasks`` for ``ids``, once it has heard every one of them finish (or ``timeout``)."""
    import json  # noqa: PLC0415

    wanted = set(ids)
    final = {"SUCCESS", "FAILURE"}
    found: dict[str, Any] = {}

    def complete() -> bool:
        nonlocal found
        tasks = json.loads(flower.get("/api/tasks"))
        found = {k: v for k, v in tasks.items() if k in wanted}
        return len(found) == len(wanted) and all(v.get("state") in final for v in found.values())

    poll_until(complete, timeout, 0.2)
    return found


def side_by_side(snapshot: dict[str, Any], flower_workers: dict[str, Any], flower_tasks: dict[str, Any],
                 inspect_stats: dict[str, Any]) -> Table:
    """Per worker: processed/failed according to the dashboard, to Flower, and to the worker itself."""
    per_worker: dict[str, Counter] = defaultdict(Counter)
    for t in flower_tasks.values():
        per_worker[t.get("worker") or "?"][t.get("state") or "?"] += 1
    rows = []
    for host, w in snapshot["workers"].items():
        total = sum((inspect_stats.get(host) or {}).get("total", {}).values())
        fw = flower_workers.get(host) or {}
        flower_total = sum((fw.get("stats") or {}).get("total", {}).values()) if fw else None
        rows.append([host.split("@")[0], w["status"], w["processed"], w["failed"], flower_total,
                     per_worker[host]["SUCCESS"] + per_worker[host]["FAILURE"], per_worker[host]["FAILURE"],
                     total])
    return Table(["worker", "dashboard status", "dashboard processed", "dashboard failed",
                  "Flower /api/workers total", "Flower /api/tasks done", "Flower /api/tasks failed",
                  "inspect() total"], rows, title="one workload, three views")


# ----------------------------------------------------------------------------- plots
def plot_overhead(measurements: dict[str, Measurement]):
    """Throughput with and without task events, each run dotted."""
    from labkit.plots import bars  # noqa: PLC0415

    ax = bars([measurements["without"], measurements["with"]],
              title=f"no-op throughput: -E costs {overhead_percent(measurements):.0f}% (median)")
    return ax.figure


def plot_pubsub(results: dict[str, Measurement]):
    """Events of the burst seen, late vs early monitor."""
    from labkit.plots import bars  # noqa: PLC0415

    ax = bars([results["late"], results["early"]], title="events are pub/sub: nobody keeps them for you")
    ax.axhline(results["early"].meta["expected"], ls="--", color="grey", lw=1)
    return ax.figure


def plot_alerts(results: dict[str, Measurement]):
    """Heartbeats and queue depth after the pause (t = 0), with the moments each alert fired."""
    from labkit.plots import AFTER, BEFORE, panels, style  # noqa: PLC0415

    meta = next(iter(results.values())).meta
    fig, (ax1, ax2) = panels(2, width=5.6)
    hosts = sorted(meta["heartbeats"])
    for i, host in enumerate(hosts):
        ts = meta["heartbeats"][host]
        ax1.plot(ts, [i] * len(ts), "|", ms=14, color=AFTER)
    ax1.set_yticks(range(len(hosts)), [h.split("@")[0] for h in hosts])
    for key, colour in (("offline:after", AFTER), ("offline:before", BEFORE)):
        m = results[key]
        if m.meta["fired"]:
            ax1.axvline(m.value, color=colour, ls="--", lw=1.2, label=f"alert: {m.meta['worker'].split('@')[0]}")
    ax1.axvline(0, color="black", lw=0.8)
    first = min((t for ts in meta["heartbeats"].values() for t in ts), default=0.0)
    ax1.set_xlim(min(first, 0.0) - 0.5, meta["window"])
    ax1.legend(frameon=False, fontsize=8, loc="lower right")
    style(ax1, "heartbeats seen (| ); pause at t = 0", "", "seconds since the pause")
    samples = meta["samples"]
    ts = [s[0] for s in samples]
    ax2.plot(ts, [s[1] for s in samples], color=AFTER, label="depth from events (task-sent)")
    ax2.plot(ts, [s[3] for s in samples], color=AFTER, ls=":", lw=2.5, label="LLEN, same queue")
    ax2.plot(ts, [s[2] for s in samples], color=BEFORE, label="depth from events (no task-sent)")
    ax2.plot(ts[::4], [s[4] for s in samples][::4], "x", color=BEFORE, ms=4, label="LLEN, same queue")
    ax2.axhline(meta["threshold"], color="grey", ls="--", lw=1, label="threshold")
    ax2.legend(frameon=False, fontsize=8)
    style(ax2, "queue depth: what the events say vs Redis", "messages waiting", "seconds since the pause")
    return fig
