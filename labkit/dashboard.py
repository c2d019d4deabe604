"""A live cluster dashboard in the notebook, fed by Celery events.

Celery workers started with ``-E`` (``LocalCluster(events=True)``) publish an
event for every step of every task (``task-received``, ``task-started``,
``task-succeeded``...), and, with heartbeats on, a ``worker-heartbeat`` every
few seconds. On Redis these are ``PUBLISH`` messages (pub/sub): only a
monitor that is subscribed *now* sees them; nothing is kept for later.

Two pieces, each a daemon thread of this (the notebook's) process:

:class:`EventMonitor`
    an ``app.events.Receiver`` feeding Celery's own ``app.events.State`` (and
    any callbacks), reconnecting if the broker goes away. ``start()`` returns
    only once the subscription is live — it publishes probe events until one
    comes back — so "the monitor was listening before the burst" is a fact,
    not a hope. ``stop()`` joins the thread.
:class:`Dashboard`
    a monitor plus running tallies (per worker: heartbeat status, active,
    processed, failed, pool size; per task name: count, runtime p50/p95; a
    rolling timeline of task starts/ends per worker) and the depth of the
    queues (Redis ``LLEN``; on RabbitMQ, a passive ``queue.declare``). Displayed in Jupyter it is an ipywidgets ``HTML`` view that a
    render thread refreshes while your cells run; a front end without widget
    support (nbval, nbconvert, GitHub) shows the static HTML summary that
    travels in the same display bundle. ``snapshot()`` returns the numbers;
    ``tables()`` and ``print(dashboard)`` show them as text.

``cluster.dashboard()`` (:meth:`labkit.client.ClusterClient.dashboard`)
builds one for a local or an attached cluster and stops it when the cluster
closes. Timestamps shown are this process's clock at receipt
(``local_received``): a worker with a skewed clock cannot scramble the
timeline.
"""

from __future__ import annotations

import contextlib
import html
import statistics
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .measure import percentile
from .table import Table, fmt

if TYPE_CHECKING:  # pragma: no cover
    from celery import Celery

PROBE = "labkit-probe"  # the monitor's own event type: proves the subscription is live
Callback = Callable[[dict], None]


def short(hostname: str) -> str:
    return hostname.split("@", 1)[0]


class EventMonitor:
    """Celery events -> ``app.events.State`` (+ callbacks) in a background thread.

    ``wakeup=True`` asks every worker for a heartbeat when the subscription
    starts (what ``celery events`` and Flower do); a worker running without
    heartbeats answers that once, with ``freq=5``, and then looks dead to
    ``State`` ten seconds later — so monitors that judge liveness use
    ``wakeup=False``. Read ``state`` under ``with monitor.lock:``.
    """

    def __init__(self, app: Celery, *, wakeup: bool = False, max_tasks: int = 20000,
                 callbacks: list[Callback] | None = None, name: str = "labkit-events") -> None:
        self.app = app
        self.wakeup = wakeup
        self.state = app.events.State(max_tasks_in_memory=max_tasks)
        self.callbacks: list[Callback] = list(callbacks or [])
        self.lock = threading.RLock()
        self.name = name
        self.events_seen = 0
        self.by_type: Counter[str] = Counter()
        self.started_at: float | None = None
        self.error: BaseException | None = None
        self.reconnects = 0
        self.cpu_seconds = 0.0  # CPU time the receiving thread has used (time.thread_time)
        self._token = uuid.uuid4().hex
        self._probe_seen = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._receiver: Any = None

    # -- life cycle ------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 15.0) -> EventMonitor:
        """Start the thread; return once one of our own probe events has come back."""
        if self.running:
            return self
        self._stop.clear()
        self._probe_seen.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        self.started_at = time.time()
        try:
            subscribed = self._wait_for_probe(timeout)
        except BaseException:  # no broker to publish the probe to: leave no thread behind
            self.stop()
            raise
        if not subscribed:
            self.stop()
            raise TimeoutError(
                f"event monitor: subscribed to no events within {timeout:g} s "
                f"(broker {self.app.conf.broker_url}); last error: {self.error!r}")
        return self

    def _wait_for_probe(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.app.connection_for_write() as conn:
            dispatcher = self.app.events.Dispatcher(conn, hostname=f"monitor@{self._token[:8]}", enabled=True)
            try:
                while time.monotonic() < deadline and self.running:
                    # pub/sub: a probe published before the SUBSCRIBE is lost, so repeat it
                    try:
                        dispatcher.send(PROBE, token=self._token)
                    except Exception as exc:  # the broker is not there (yet): try again until the deadline
                        self.error = exc
                    if self._probe_seen.wait(0.1):
                        return True
            finally:
                dispatcher.close()
        return self._probe_seen.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop receiving and join the thread (idempotent)."""
        self._stop.set()
        if self._receiver is not None:
            self._receiver.should_stop = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # pragma: no cover - a broker that hangs mid-read
                raise RuntimeError(f"{self.name}: the event thread did not stop within {timeout:g} s")
            self._thread = None

    def __enter__(self) -> EventMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    with self.app.connection_for_read() as conn:
                        receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
                        receiver.connect_max_retries = 1  # reconnect here, where stop() is seen
                        self._receiver = receiver
                        if self._stop.is_set():
                            break
                        for _ in receiver.consume(limit=None, timeout=None, safety_interval=0.2,
                                                  wakeup=self.wakeup):
                            if self._stop.is_set():
                                break
                except Exception as exc:  # the broker went away: wait a little, reconnect
                    if self._stop.is_set():
                        break
                    self.error = exc
                    self.reconnects += 1
                    self._stop.wait(0.5)
        finally:
            self.cpu_seconds = time.thread_time()
            self._receiver = None

    def _on_event(self, event: dict) -> None:
        kind = event.get("type", "")
        if kind == PROBE:
            if event.get("token") == self._token:
                self._probe_seen.set()
            return
        with self.lock:
            self.events_seen += 1
            self.by_type[kind] += 1
            self.state.event(event)
            for callback in self.callbacks:
                callback(event)
        if self.events_seen % 256 == 0:
            self.cpu_seconds = time.thread_time()


# ------------------------------------------------------------------------------ tallies
@dataclass
class WorkerTally:
    hostname: str
    processed: int = 0
    failed: int = 0
    active: set[str] = field(default_factory=set)
    last_event: float = 0.0
    last_heartbeat: float = 0.0
    freq: float = 0.0  # the heartbeat interval the worker announced
    periodic: bool = False  # sends heartbeats of its own (not just a reply to a wakeup)
    offline: bool = False  # said goodbye (worker-offline)
    pool: int | None = None

    def status(self, now: float) -> str:
        if self.offline:
            return "offline"
        if not self.periodic:
            return "no heartbeats"
        return "online" if now < self.last_heartbeat + 2 * self.freq else "missing"


@dataclass
class TaskTally:
    count: int = 0  # finished (succeeded + failed)
    succeeded: int = 0
    failed: int = 0
    runtimes: deque = field(default_factory=lambda: deque(maxlen=2000))


@dataclass
class Span:
    worker: str
    uuid: str
    name: str
    start: float
    end: float | None = None
    state: str = "STARTED"


class Dashboard:
    """Live per-worker, per-task and per-queue numbers for one cluster.

    ``queues``: queue names whose depth to show, or a function returning
    them (default: asked of the workers once, ``inspect().active_queues()``);
    ``pools``: worker hostname -> pool size, or a function returning that
    (default: asked with ``inspect().stats()``); ``depths``: a function
    from queue names to messages waiting (default: Redis ``LLEN``; a
    RabbitMQ cluster passes its own); ``interval``:
    seconds between refreshes of a displayed view; ``window``: seconds of
    timeline shown.
    """

    def __init__(self, app: Celery, redis_url: str, *, title: str = "",
                 queues: list[str] | Callable[[], list[str]] | None = None,
                 pools: dict[str, int] | Callable[[], dict[str, int]] | None = None, interval: float = 0.5, window: float = 30.0,
                 wakeup: bool = True, depths: Callable[[list[str]], dict[str, int]] | None = None) -> None:
        self.app = app
        self.redis_url = redis_url
        self.title = title
        self.interval = interval
        self.window = window
        self._queue_source = queues if callable(queues) else None
        self._queues = list(queues) if queues is not None and not callable(queues) else None
        self._pool_source = pools if callable(pools) else None
        self._pools = dict(pools) if pools is not None and not callable(pools) else {}
        self._pools_asked = 0.0
        self._depth_source = depths
        self.workers: dict[str, WorkerTally] = {}
        self.tasks: dict[str, TaskTally] = {}
        self.spans: deque[Span] = deque(maxlen=3000)
        self._open: dict[str, Span] = {}
        self._rates: deque[tuple[float, int]] = deque(maxlen=20)
        self.monitor = EventMonitor(app, wakeup=wakeup, callbacks=[self._on_event], name="labkit-dashboard-events")
        self._redis: Any = None
        self._widget: Any = None
        self._render_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.renders = 0
        self.render_seconds = 0.0
        self.render_error: BaseException | None = None
        self._final: dict[str, Any] | None = None

    # -- life cycle ------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.monitor.running

    def start(self, timeout: float = 15.0) -> Dashboard:
        self._stop.clear()
        self._final = None
        self.monitor.start(timeout)
        return self

    def stop(self) -> None:
        """Stop both threads; a displayed view keeps its last numbers, marked stopped. Idempotent."""
        self._stop.set()
        if self._render_thread is not None:
            self._render_thread.join(5)
            self._render_thread = None
        self.monitor.stop()
        if self._final is None:
            self._final = self.snapshot()  # the broker may go next (cluster.close): keep the last numbers
        if self._widget is not None:
            with contextlib.suppress(Exception):
                self._widget.value = self.html(self._final)
        if self._redis is not None:
            with contextlib.suppress(Exception):
                self._redis.close()
            self._redis = None
        if self._depth_source is not None and hasattr(self._depth_source, "close"):
            with contextlib.suppress(Exception):
                self._depth_source.close()

    def threads(self) -> list[threading.Thread]:
        """The live threads this dashboard runs (empty once stopped)."""
        return [t for t in (self.monitor._thread, self._render_thread) if t is not None and t.is_alive()]

    # -- events -> tallies (runs in the monitor's thread, under its lock) -----------------
    def _worker(self, hostname: str) -> WorkerTally:
        w = self.workers.get(hostname)
        if w is None:
            w = self.workers[hostname] = WorkerTally(hostname, pool=self._pools.get(hostname))
        return w

    def _on_event(self, event: dict) -> None:
        kind = event.get("type", "")
        hostname = event.get("hostname", "")
        now = event.get("local_received") or time.time()
        group, _, subject = kind.partition("-")
        if group == "worker":
            w = self._worker(hostname)
            w.last_event = now
            if subject == "offline":
                w.offline = True
                return
            w.offline = False
            if subject in ("online", "heartbeat"):
                # a worker's own heartbeats carry its counters; the one-off reply to a monitor's
                # wakeup (control command `heartbeat`) does not, and no more will follow it
                w.periodic = w.periodic or subject == "online" or "processed" in event
                w.last_heartbeat, w.freq = now, float(event.get("freq") or 0)
            return
        if group != "task" or subject == "sent":
            return
        w = self._worker(hostname)
        w.last_event = now
        uid = event.get("uuid", "")
        task = self.monitor.state.tasks.get(uid)
        name = (task.name if task is not None else None) or event.get("name") or "?"
        if subject == "started":
            w.active.add(uid)
            span = Span(hostname, uid, name, now)
            self._open[uid] = span
            self.spans.append(span)
        elif subject in ("succeeded", "failed", "retried", "revoked", "rejected"):
            w.active.discard(uid)
            span = self._open.pop(uid, None)
            if span is not None:
                span.end, span.state = now, subject.upper()
            if subject in ("succeeded", "failed"):
                w.processed += 1
                t = self.tasks.setdefault(name, TaskTally())
                t.count += 1
                if subject == "succeeded":
                    t.succeeded += 1
                    if event.get("runtime") is not None:
                        t.runtimes.append(float(event["runtime"]))
                else:
                    w.failed += 1
                    t.failed += 1

    # -- numbers ---------------------------------------------------------------------
    def queues(self) -> list[str]:
        """The queue names shown (asked of the workers once, when not given)."""
        if self._queue_source is not None:
            return list(self._queue_source())
        if self._queues is None:
            found: set[str] = set()
            with contextlib.suppress(Exception):
                replies = self.app.control.inspect(timeout=1.0).active_queues() or {}
                found = {q["name"] for qs in replies.values() for q in qs}
            self._queues = sorted(found or {self.app.conf.task_default_queue})
        return self._queues

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting in every shown queue, not yet taken by a worker (Redis ``LLEN`` by default)."""
        if self._depth_source is not None:
            return self._depth_source(self.queues())
        import redis  # noqa: PLC0415

        from .app import redis_from_url  # noqa: PLC0415

        if self._redis is None:  # redis:// or sentinel:// (then it follows the current primary)
            master = self.app.conf.broker_transport_options.get("master_name")
            self._redis = redis_from_url(self.redis_url, master, socket_timeout=2, socket_connect_timeout=2)
        try:
            pipe = self._redis.pipeline(transaction=False)
            names = self.queues()
            for q in names:
                pipe.llen(q)
            return dict(zip(names, (int(n) for n in pipe.execute()), strict=True))
        except (redis.RedisError, OSError):
            return {q: -1 for q in self.queues()}

    def _fill_pools(self, ask: bool = True) -> None:
        """Pool sizes: from the cluster when it knows them, else asked of the workers (``ask``)."""
        if self._pool_source is not None:
            known = self._pool_source()
            with self.monitor.lock:
                self._pools.update(known)
                for host, w in self.workers.items():
                    w.pool = self._pools.get(host, w.pool)
        missing = [h for h, w in self.workers.items() if w.pool is None]
        if not ask or not missing or time.monotonic() - self._pools_asked < 5.0:  # a paused worker never answers
            return
        self._pools_asked = time.monotonic()
        with contextlib.suppress(Exception):
            stats = self.app.control.inspect(destination=missing, timeout=0.5).stats() or {}
            with self.monitor.lock:
                for host, s in stats.items():
                    self._pools[host] = s.get("pool", {}).get("max-concurrency")
                    if host in self.workers:
                        self.workers[host].pool = self._pools[host]

    def rate(self) -> float:
        """Events per second over the last few seconds."""
        now = time.monotonic()
        self._rates.append((now, self.monitor.events_seen))
        while len(self._rates) > 2 and now - self._rates[0][0] > 3.0:
            self._rates.popleft()
        (t0, n0), (t1, n1) = self._rates[0], self._rates[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def snapshot(self, *, ask: bool = False) -> dict[str, Any]:
        """Every number the dashboard shows, now: workers, tasks, queues, events.

        ``ask=True`` asks workers whose pool size is unknown (``inspect stats``).
        Once stopped, it returns the numbers as they were when it stopped.
        """
        if self._final is not None:
            return self._final
        self._fill_pools(ask)
        now = time.time()
        with self.monitor.lock:
            workers = {
                h: {"status": w.status(now), "active": len(w.active), "active_ids": sorted(w.active),
                    "processed": w.processed, "failed": w.failed, "pool": w.pool,
                    "last_event_s": round(now - w.last_event, 2) if w.last_event else None}
                for h, w in sorted(self.workers.items())
            }
            tasks = {
                name: {"count": t.count, "succeeded": t.succeeded, "failed": t.failed,
                       "p50_s": statistics.median(t.runtimes) if t.runtimes else None,
                       "p95_s": percentile(list(t.runtimes), 95) if t.runtimes else None}
                for name, t in sorted(self.tasks.items())
            }
            events, by_type = self.monitor.events_seen, dict(self.monitor.by_type)
        return {"workers": workers, "tasks": tasks, "queues": self.queue_depths(), "events": events,
                "by_type": by_type, "since": self.monitor.started_at, "running": self.running}

    # -- text ------------------------------------------------------------------------
    def tables(self, snap: dict[str, Any] | None = None) -> list[Table]:
        """Workers, task names and queues as :class:`~labkit.table.Table`s."""
        snap = snap or self.snapshot()
        workers = Table(["worker", "status", "active", "processed", "failed", "pool", "last event s"],
                        [[short(h), w["status"], w["active"], w["processed"], w["failed"], w["pool"],
                          w["last_event_s"]] for h, w in snap["workers"].items()], title="workers")
        tasks = Table(["task", "done", "failed", "p50 s", "p95 s"],
                      [[n, t["count"], t["failed"], t["p50_s"], t["p95_s"]] for n, t in snap["tasks"].items()],
                      title="tasks")
        queues = Table(["queue", "waiting"], [[q, n] for q, n in snap["queues"].items()], title="queues")
        return [workers, tasks, queues]

    def _headline(self, snap: dict[str, Any], rate: float | None = None) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(snap["since"])) if snap["since"] else "-"
        state = "live" if snap["running"] else "stopped"
        text = f"{self.title or 'cluster'}: {snap['events']} events since {since} ({state}"
        text += f", {rate:.0f}/s)" if rate is not None else ")"
        if snap["running"] and not any(k.startswith("task-") for k in snap["by_type"]):
            text += (" — no task events yet: workers send them only with -E "
                     "(LocalCluster(events=True), or cluster.app.control.enable_events())")
        return text

    def __str__(self) -> str:
        snap = self.snapshot()
        return "\n\n".join([self._headline(snap), *(str(t) for t in self.tables(snap))])

    # -- HTML ------------------------------------------------------------------------
    def html(self, snap: dict[str, Any] | None = None, rate: float | None = None) -> str:
        """The whole view as one HTML fragment (tables side by side, the timeline below)."""
        snap = snap or self.snapshot()
        workers, tasks, queues = self.tables(snap)
        colours = {"online": "#2e7d32", "missing": "#c62828", "offline": "#c62828", "no heartbeats": "#757575"}
        for row in workers.rows:  # colour the status cell
            row[1] = _Raw(f"<b style='color:{colours.get(row[1], '#000')}'>{html.escape(row[1])}</b>")
        cells = "".join(f"<div style='margin-right:18px'>{_table_html(t)}</div>" for t in (workers, tasks, queues))
        return (f"<div style='font-size:12px'><b>{html.escape(self._headline(snap, rate))}</b>"
                f"<div style='display:flex;flex-wrap:wrap;align-items:flex-start'>{cells}</div>"
                f"{self.timeline_svg()}</div>")

    def timeline_svg(self, width: int = 760) -> str:
        """Task runs of the last ``window`` seconds, one lane per worker (receipt time)."""
        now = time.time()
        left = now - self.window
        with self.monitor.lock:
            lanes = sorted(self.workers)
            spans = [s for s in list(self.spans)[-600:] if (s.end or now) >= left]
        if not lanes:
            return ""
        lane_h, label_w = 16, 70
        height = lane_h * len(lanes) + 18
        scale = (width - label_w) / self.window
        fill = {"STARTED": "#1565c0", "SUCCEEDED": "#66a182", "FAILED": "#d1495b", "RETRIED": "#edae49"}
        parts = [f"<svg width='{width}' height='{height}' style='font:10px sans-serif'>"]
        for i, lane in enumerate(lanes):
            y = i * lane_h
            parts.append(f"<text x='0' y='{y + 11}'>{html.escape(short(lane))}</text>"
                         f"<line x1='{label_w}' y1='{y + lane_h - 1}' x2='{width}' y2='{y + lane_h - 1}' "
                         "stroke='#eee'/>")
        index = {lane: i for i, lane in enumerate(lanes)}
        for s in spans:
            x0 = label_w + max(0.0, s.start - left) * scale
            x1 = label_w + ((s.end or now) - left) * scale
            y = index.get(s.worker, 0) * lane_h + 2
            parts.append(f"<rect x='{x0:.1f}' y='{y}' width='{max(1.0, x1 - x0):.1f}' height='{lane_h - 5}' "
                         f"fill='{fill.get(s.state, '#8d96a3')}' opacity='0.8'/>")
        for k in range(0, int(self.window), 5):
            x = label_w + k * scale
            parts.append(f"<text x='{x:.0f}' y='{height - 3}' fill='#777'>{k - int(self.window)}s</text>")
        parts.append(f"<text x='{width}' y='{height - 3}' fill='#777' text-anchor='end'>now</text>")
        parts.append("</svg>")
        names = {"STARTED": "running"}
        legend = " ".join(f"<span style='color:{c}'>&#9632;</span> {names.get(state, state.lower())}"
                          for state, c in fill.items())
        parts.insert(0, f"<div style='color:#555'>task runs per worker, last {self.window:g} s: {legend}</div>")
        return "".join(parts)

    # -- Jupyter ---------------------------------------------------------------------
    def widget(self):
        """The ipywidgets view (created on first use; a render thread keeps it fresh)."""
        if self._widget is None:
            import ipywidgets  # noqa: PLC0415

            self._widget = ipywidgets.HTML(value=self.html())
            if self.running:
                self._render_thread = threading.Thread(target=self._render_loop, name="labkit-dashboard-render",
                                                       daemon=True)
                self._render_thread.start()
        return self._widget

    def _render_loop(self) -> None:
        last = None
        while not self._stop.wait(self.interval):
            t0 = time.thread_time()
            try:
                snap = self.snapshot(ask=True)
                key = (snap["events"], tuple(snap["queues"].values()), int(time.time()))
                if key != last:  # nothing new and the same second: do not resend
                    self._widget.value = self.html(snap, self.rate())
                    last = key
                    self.renders += 1
            except Exception as exc:  # never let a rendering bug kill the thread silently
                self.render_error = exc
            self.render_seconds += time.thread_time() - t0

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        static = self.html()
        bundle: dict[str, Any] = {"text/plain": str(self), "text/html": static}
        try:
            view = self.widget()._repr_mimebundle_()
        except Exception:  # no ipywidgets or no kernel: the static view is all there is
            return bundle
        key = "application/vnd.jupyter.widget-view+json"
        if isinstance(view, dict) and key in view:
            bundle[key] = view[key]
        return bundle

    def _repr_html_(self) -> str:
        return self.html()


class _Raw(str):
    """A table cell that is already HTML."""


def _table_html(table: Table) -> str:
    head = "".join(f"<th style='text-align:left;padding:0 6px'>{html.escape(c)}</th>" for c in table.columns)
    rows = []
    for r in table.rows:
        cells = []
        for v in r:
            if isinstance(v, _Raw):
                cells.append(f"<td style='padding:0 6px'>{v}</td>")
            elif isinstance(v, int | float) and not isinstance(v, bool):
                cells.append(f"<td style='text-align:right;padding:0 6px'>{fmt(v)}</td>")
            else:
                cells.append(f"<td style='padding:0 6px'>{html.escape('' if v is None else str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<b>{html.escape(table.title)}</b><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")
