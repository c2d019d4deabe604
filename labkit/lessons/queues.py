"""Lesson 03: segregation of duties — queues, prefetch, ``-O fair``, autoscale.

The talk's advice (slides 39–44): use several queues to "keep 'em
separated", but "an idle queue is the devil's playground": find the balance
between fine-grained queues and resource utilisation, and use autoscaling.
This module measures each point on real workers. Every task records its own
timings (sent by the caller, started and ended in the pool child) in Redis,
and the worker's main process notes when it *received* each message
(Celery's ``task_received`` signal), so the figures below come from the
cluster, not from a model of it.

* **Segregation** (:func:`segregation`): long and short tasks share one
  queue and one worker (``"shared"``), or each class has its own queue and
  worker (``"split"``, same number of pool processes). Short-task latency
  falls to its own run time; the cost is capacity that a quiet queue's
  worker cannot lend to a busy one (:func:`stranded_capacity`).
* **``-O fair``** (layout ``"fair"``): the talk-era cure for short tasks
  stuck behind long ones inside one prefork worker. It has been the default
  since Celery 4.0 (``-O default`` and ``-O fair`` both select the fair
  strategy), so turning it on changes nothing measurable.
* **Prefetch** (:func:`prefetch`): with early acknowledgement a worker keeps
  asking Redis for messages while all its children are busy (running tasks
  no longer count against the prefetch limit once acknowledged), and Redis
  hands each message to the client that has waited longest. Tasks pile up
  in a busy worker's buffer while the other worker idles. Cures:
  ``--disable-prefetch`` (Celery 5.6+, Redis only) or ``acks_late`` with
  ``--prefetch-multiplier 1``.
* **Prefetch on RabbitMQ** (:data:`RABBIT`, the same :func:`prefetch` on a
  second cluster whose broker is RabbitMQ): there the prefetch limit is the
  broker's (AMQP ``basic.qos``: at most N unacknowledged messages per
  consumer) and messages go round-robin to consumers with room, where
  kombu's Redis transport emulates both in the client (it stops ``BRPOP``-ing
  at the limit; Redis serves the longest waiter). ``--disable-prefetch`` is
  implemented only for Redis: on RabbitMQ the worker logs a warning and
  hoards as before; ``acks_late`` + multiplier 1 works on both.
* **Autoscale** (:func:`burst`): ``--autoscale=4,1`` grows the pool on a
  burst and shrinks it again once no task has arrived for
  ``AUTOSCALE_KEEPALIVE`` seconds (an environment variable, 30 by default).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from celery import shared_task
from celery.signals import task_received

from labkit.app import redis_client, worker_name
from labkit.lessons._records import collect, kind, plot_gantt, record, summary
from labkit.measure import Comparison, Measurement, claim, verify

if TYPE_CHECKING:  # pragma: no cover - annotations only; workers import this module
    from labkit.client import ClusterLike
    from labkit.cluster import LocalCluster
    from labkit.table import Table

NOTEBOOK = "03_queues.ipynb"

#: How long the autoscaler waits after the last message before it shrinks the
#: pool (Celery reads ``AUTOSCALE_KEEPALIVE`` from the worker's environment;
#: the default, 30 s, would not fit a notebook).
KEEPALIVE = 1.5

#: Task routes for the "split" layout: Celery's own ``task_routes`` format.
ROUTES = {"queues.long": {"queue": "long"}, "queues.short": {"queue": "short"}}

#: The queue each layout sends to when it does not route (``None``: use ROUTES).
LAYOUT_QUEUE = {"shared": "celery", "fair": "fair", "split": None}
#: Which worker serves which prefetch mode, and the queue they share.
PREFETCH = {
    "default": {"workers": ("p1", "p2"), "queue": "pf_default", "late": False},
    "disabled": {"workers": ("d1", "d2"), "queue": "pf_disabled", "late": False},
    "late": {"workers": ("a1", "a2"), "queue": "pf_late", "late": True},
}
LABELS = {
    "shared": "before: one queue for all",
    "fair": "one queue, -O fair",
    "split": "after: a queue per class",
    "default": "before: default prefetch",
    "disabled": "fix: --disable-prefetch",
    "late": "fix: acks_late + multiplier 1",
}


def _workers() -> list[dict[str, Any]]:
    pair = {"concurrency": 2}
    return [
        {"name": "mixed", "queues": ["celery"], **pair},                       # one queue for everything
        {"name": "fair", "queues": ["fair"], "optimization": "fair", **pair},  # the same, with -O fair
        {"name": "long", "queues": ["long"], "concurrency": 1},                 # a queue per class,
        {"name": "short", "queues": ["short"], "concurrency": 1},               # same two processes
        {"name": "p1", "queues": ["pf_default"], **pair},                       # default prefetch (4 x 2)
        {"name": "p2", "queues": ["pf_default"], **pair},
        {"name": "d1", "queues": ["pf_disabled"], "disable_prefetch": True, **pair},
        {"name": "d2", "queues": ["pf_disabled"], "disable_prefetch": True, **pair},
        {"name": "a1", "queues": ["pf_late"], "prefetch_multiplier": 1, **pair},  # + acks_late tasks
        {"name": "a2", "queues": ["pf_late"], "prefetch_multiplier": 1, **pair},
        {"name": "auto", "queues": ["burst"], "autoscale": (1, 4), "env": {"AUTOSCALE_KEEPALIVE": str(KEEPALIVE)}},
    ]


CLUSTER: dict[str, Any] = {"workers": _workers(), "zookeeper": 0}
#: The RabbitMQ comparison: the two prefetch fixes' worker pairs, with RabbitMQ as the broker.
RABBIT: dict[str, Any] = {"workers": [w for w in _workers() if w["name"] in ("d1", "d2", "a1", "a2")],
                          "zookeeper": 0, "broker": "rabbitmq"}
#: What a worker on RabbitMQ logs when it is asked to --disable-prefetch (Celery 5.6+).
REDIS_ONLY_WARNING = "worker_disable_prefetch is only supported for Redis brokers"
WORKSHOP = {"LONGS": 5, "SHORTS": 30, "PAIRS": 8, "BURST": 12}  # every run sleep-bound: 45 s budget


# ============================================================================ tasks
def _run(run: str, tag: str, seconds: float, sent: float) -> dict[str, Any]:
    """Work for ``seconds`` (a sleep stands in for I/O-bound work) and record when, where."""
    start = time.time()
    time.sleep(seconds)
    return record(run, tag, sent, start)


@shared_task(name="queues.long")
def long_task(run: str, tag: str, seconds: float, sent: float) -> dict[str, Any]:
    """A long job (an import): minutes in production, about a second here."""
    return _run(run, tag, seconds, sent)


@shared_task(name="queues.short")
def short_task(run: str, tag: str, seconds: float, sent: float) -> dict[str, Any]:
    """A short job (a price refresh somebody is waiting for)."""
    return _run(run, tag, seconds, sent)


@shared_task(name="queues.work")
def work(run: str, tag: str, seconds: float, sent: float) -> dict[str, Any]:
    """Any job, acknowledged early (Celery's default: just before it runs)."""
    return _run(run, tag, seconds, sent)


@shared_task(name="queues.work_late", acks_late=True)
def work_late(run: str, tag: str, seconds: float, sent: float) -> dict[str, Any]:
    """The same job, acknowledged late (after it returns)."""
    return _run(run, tag, seconds, sent)


@task_received.connect
def _note_receipt(request: Any = None, **_: Any) -> None:
    """In the worker's main process: note which worker received a message of this lesson, and when."""
    if request is None or not str(getattr(request, "name", "")).startswith("queues."):
        return
    args = request.args or ()
    if len(args) >= 2:
        redis_client().hset(f"{args[0]}:received", args[1], json.dumps([worker_name(), time.time()]))


# ============================================================================ routing
def route(task_name: str, routes: dict[str, dict[str, str]] = ROUTES, default: str = "celery") -> str:
    """The queue Celery's router picks for ``task_name`` under ``task_routes=routes``."""
    from celery.app.routes import prepare  # noqa: PLC0415

    for router in prepare(routes):
        found = router(task_name, (), {}, {})
        if found:
            return found["queue"]
    return default


# ============================================================================ running a workload
def _send(cluster: Any, jobs: Sequence[tuple[Any, str, float, str]], run: str,
          spacing: Sequence[float] | float = 0.0) -> float:
    """Publish ``(task, tag, seconds, queue)`` jobs; a pause of ``spacing`` after each. Returns t0."""
    gaps = [spacing] * len(jobs) if isinstance(spacing, int | float) else list(spacing)
    t0 = time.time()
    for (task, tag, seconds, queue), gap in zip(jobs, gaps, strict=True):
        cluster.task(task).apply_async((run, tag, seconds, time.time()), queue=queue)
        if gap:
            time.sleep(gap)  # the arrival schedule is part of the workload
    return t0


def _slots(cluster: Any, names: Iterable[str]) -> dict[str, int]:
    """Pool size of each named worker (from the cluster's spec, else assume 1)."""
    workers = getattr(cluster, "workers", {})
    return {n: (workers[n].spec.concurrency if n in workers else 1) for n in names}


def _inspect(cluster: Any, names: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """Ask the workers which of this lesson's tasks they run (active) and hold (reserved), right now."""
    hosts = {f"{n}@{cluster.id}": n for n in names}
    ins = cluster.app.control.inspect(destination=list(hosts), timeout=1.0)
    active, reserved = ins.active() or {}, ins.reserved() or {}
    return {hosts[h]: {"active": sorted(t["args"][1] for t in active.get(h, []) if t.get("args")),
                       "reserved": sorted(t["args"][1] for t in reserved.get(h, []) if t.get("args"))}
            for h in hosts}


# ============================================================================ experiments
def segregation(cluster: ClusterLike, layout: str = "shared", *, longs: int = 4, shorts: int = 20,
                long_s: float = 1.0, short_s: float = 0.05, spacing: float = 0.05,
                label: str | None = None) -> Measurement:
    """A batch of ``longs`` long tasks, then ``shorts`` short ones arriving every ``spacing`` s.

    ``layout``: ``"shared"`` (one queue, worker ``mixed`` with 2 processes),
    ``"fair"`` (the same on worker ``fair``, started with ``-O fair``) or
    ``"split"`` (``task_routes`` sends each class to its own queue; workers
    ``long`` and ``short`` with one process each). Values: each short task's
    latency, submit -> done (stat p95). ``meta`` has waits, makespans, busy
    fractions, stranded capacity and every task's record.
    """
    if layout not in LAYOUT_QUEUE:
        raise ValueError(f"layout must be one of {sorted(LAYOUT_QUEUE)}, not {layout!r}")
    fixed = LAYOUT_QUEUE[layout]
    names = {"shared": ["mixed"], "fair": ["fair"], "split": ["long", "short"]}[layout]
    jobs = [(long_task, f"L{i}", long_s, fixed or route(long_task.name)) for i in range(longs)]
    jobs += [(short_task, f"s{i}", short_s, fixed or route(short_task.name)) for i in range(shorts)]
    run = f"q3:{uuid.uuid4().hex[:8]}"
    t0 = _send(cluster, jobs, run, [0.0] * longs + [spacing] * shorts)
    budget = 30 + 3 * (longs * long_s + shorts * (short_s + spacing))
    records = collect(cluster, run, len(jobs), budget)
    slots = _slots(cluster, sorted(set(names) | {r["worker"] for r in records}))
    meta = {"layout": layout, "longs": longs, "shorts": shorts, "long_s": long_s, "short_s": short_s,
            "spacing": spacing, "slots": slots, **summary(records, t0, slots)}
    if layout != "split":
        meta["strategy"] = _pool_strategy(cluster, names[0])
    return Measurement(label or LABELS[layout], "short-task latency (submit to done)", "s",
                       meta["short_done"], stat="p95", meta=meta)


def _pool_strategy(cluster: ClusterLike, name: str) -> str:
    """The prefork scheduling strategy a worker reports (``inspect().stats()``)."""
    host = f"{name}@{cluster.id}"
    stats = cluster.app.control.inspect(destination=[host], timeout=1.0).stats() or {}
    pool = stats.get(host, {}).get("pool", {})
    return str(pool.get("writes", {}).get("strategy", pool.get("strategy", "?")))


def before(cluster: ClusterLike, **params: Any) -> Measurement:
    """The pitfall: long and short tasks in one queue, on one worker."""
    return segregation(cluster, "shared", **params)


def after(cluster: ClusterLike, **params: Any) -> Measurement:
    """The fix: a queue per class (``task_routes``), a worker per queue; same two processes."""
    return segregation(cluster, "split", **params)


def compare(cluster: ClusterLike, **params: Any) -> Comparison:
    """Short-task latency p95, one shared queue vs a queue per class."""
    return Comparison(before(cluster, **params), after(cluster, **params), better="lower",
                      title="short-task latency p95")


def prefetch(cluster: ClusterLike, mode: str = "default", *, pairs: int = 6, long_s: float = 1.0,
             short_s: float = 0.1, spacing: float = 0.05, label: str | None = None) -> Measurement:
    """``pairs`` (long, short) jobs, one message every ``spacing`` s, to two workers with 2 processes each.

    ``mode``: ``"default"`` (prefetch multiplier 4, early ack), ``"disabled"``
    (``--disable-prefetch``) or ``"late"`` (``acks_late`` + multiplier 1).
    Value: the makespan. ``meta["snapshot"]`` is what each worker said it
    was running and holding (``inspect().active()/.reserved()``) one and a
    half long tasks into the run; ``meta["stranded"]`` the slot-seconds a
    process sat idle while a task waited.
    """
    if mode not in PREFETCH:
        raise ValueError(f"mode must be one of {sorted(PREFETCH)}, not {mode!r}")
    cfg = PREFETCH[mode]
    task = work_late if cfg["late"] else work
    jobs: list[tuple[Any, str, float, str]] = []
    for i in range(pairs):
        jobs += [(task, f"L{i}", long_s, cfg["queue"]), (task, f"s{i}", short_s, cfg["queue"])]
    run = f"q3p:{uuid.uuid4().hex[:8]}"
    t0 = _send(cluster, jobs, run, spacing)
    time.sleep(max(0.0, t0 + 1.5 * long_s - time.time()))  # the snapshot moment: a fixed point of the run
    snapshot = _inspect(cluster, cfg["workers"])
    snap_at = time.time() - t0
    records = collect(cluster, run, len(jobs), 30 + 3 * pairs * (long_s + short_s))
    slots = _slots(cluster, cfg["workers"])
    meta = {"mode": mode, "pairs": pairs, "long_s": long_s, "short_s": short_s, "spacing": spacing,
            "slots": slots, "snapshot": snapshot, "snapshot_at": snap_at, **summary(records, t0, slots),
            "broker": getattr(cluster, "broker", "redis"), "prefetch_count": _prefetch_counts(cluster, cfg["workers"]),
            "warned": _warned(cluster, cfg["workers"])}
    meta["longs_per_worker"] = {w: sum(1 for r in records if r["worker"] == w and kind(r["tag"]) == "long")
                                for w in slots}
    return Measurement(label or LABELS[mode], "makespan", "s", [meta["makespan"]], stat="max", meta=meta)


def _prefetch_counts(cluster: Any, names: Sequence[str]) -> dict[str, Any]:
    """The prefetch limit each worker applies (``inspect().stats()``: ``prefetch_count``)."""
    hosts = {f"{n}@{cluster.id}": n for n in names}
    stats = cluster.app.control.inspect(destination=list(hosts), timeout=1.0).stats() or {}
    return {hosts[h]: s.get("prefetch_count") for h, s in stats.items() if h in hosts}


def _warned(cluster: Any, names: Sequence[str]) -> list[str]:
    """The workers whose log says ``--disable-prefetch`` does not apply to their broker."""
    logs = getattr(cluster, "logs", None)
    if logs is None:  # an attached cluster: its logs are not ours to read
        return []
    return [n for n in names if REDIS_ONLY_WARNING in logs(n, 400)]


def compare_prefetch(cluster: ClusterLike, fix: str = "disabled", **params: Any) -> Comparison:
    """Makespan with the default prefetch vs one of the fixes, same workload."""
    return Comparison(prefetch(cluster, "default", **params), prefetch(cluster, fix, **params),
                      better="lower", title="makespan of a batch of uneven tasks")


def burst(cluster: LocalCluster, worker: str = "auto", *, tasks: int = 8, seconds: float = 0.5,
          interval: float = 0.05, label: str | None = None) -> Measurement:
    """Send ``tasks`` tasks of ``seconds`` at once to ``worker``; sample its pool size until it settles.

    The pool size is the number of the worker's child processes (psutil),
    every ``interval`` s. For an autoscaling worker the sampling goes on
    until the pool is back at its minimum (at most ``3 x keepalive`` after
    the burst); for a fixed pool, half a second after the burst. Value:
    pool size samples (stat max); timeline: pool size over time.
    """
    import threading  # noqa: PLC0415

    from labkit.poll import poll_until  # noqa: PLC0415

    spec = cluster.workers[worker].spec
    low, high = spec.autoscale or (spec.concurrency, spec.concurrency)
    keepalive = float(spec.env.get("AUTOSCALE_KEEPALIVE", 30)) if spec.autoscale else 0.0
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> bool:
        samples.append((time.time(), len(cluster.children(worker))))
        return stop.is_set()

    sampler = threading.Thread(target=poll_until, args=(sample, 600, interval), daemon=True)
    run = f"q3a:{uuid.uuid4().hex[:8]}"
    t_start = time.time()
    sampler.start()
    try:
        queue = spec.queues[0]
        t0 = _send(cluster, [(work, f"b{i}", seconds, queue) for i in range(tasks)], run)
        records = collect(cluster, run, tasks, 30 + 3 * tasks * seconds)
        done = max(r["end"] for r in records)
        if spec.autoscale:
            poll_until(lambda: len(cluster.children(worker)) <= low, 3 * keepalive + 10, interval)
            time.sleep(0.3)
        else:
            time.sleep(max(0.0, done + 0.5 - time.time()))
    finally:
        stop.set()
        sampler.join(5)
    timeline = [(t - t0, n) for t, n in samples]
    peak = max(n for _, n in samples)
    grown = next((t for t, n in timeline if n >= high and t >= 0), math.nan)
    back = next((t for t, n in timeline if t > done - t0 and n <= low), math.nan)
    grew = [t for (t, n), (_, prev) in zip(timeline[1:], timeline, strict=False) if n > prev]
    last_growth = max(grew) if grew else 0.0
    meta = {"worker": worker, "tasks": tasks, "seconds": seconds, "min": low, "max": high,
            "keepalive": keepalive, "autoscale": bool(spec.autoscale), "burst_done": done - t0,
            "peak": peak, "grow_s": grown, "last_growth": last_growth, "back_at": back,
            "shrink_s": back - (done - t0) if not math.isnan(back) else math.nan,
            "idle_before": t0 - t_start, "pids": sorted({r["pid"] for r in records})}
    default = f"autoscale {low}..{high}" if spec.autoscale else f"fixed pool of {high}"
    return Measurement(label or default, "pool processes", "processes", [n for _, n in samples], stat="max",
                       timeline=timeline, meta=meta)


# ============================================================================ claims
@claim("a queue per class keeps short tasks from waiting behind long ones")
def short_tasks_stop_waiting(comparison: Comparison) -> None:
    """Before, the p95 short task waited at least one long task; after, less than half of one."""
    b, a = comparison.before, comparison.after
    long_s = b.meta["long_s"]
    verify("in one shared queue, the p95 short task waits behind at least one long task",
           b.meta["short_wait_p95"] >= long_s, wait_p95=b.meta["short_wait_p95"], long_s=long_s)
    verify("with a queue per class, no short task (p95) waits even half a long task",
           a.meta["short_wait_p95"] <= long_s / 2, wait_p95=a.meta["short_wait_p95"], long_s=long_s)
    comparison.check(factor=2)


@claim("a dedicated queue's worker sits idle while the other queue is backlogged")
def idle_queue_strands_capacity(split: Measurement) -> None:
    """Capacity that could have run a waiting task sat idle for at least one long task's time."""
    m = split.meta
    verify("the short queue's worker idled while long tasks waited, for at least one long task's time",
           m["stranded"] >= m["long_s"], stranded_slot_s=m["stranded"], long_s=m["long_s"])


@claim("-O fair changes nothing today: it is already the default")
def fair_is_the_default(default: Measurement, fair: Measurement) -> None:
    """Both workers report the fair strategy, and their short-task latencies agree within noise."""
    verify("both workers report the same prefork strategy",
           default.meta.get("strategy") == fair.meta.get("strategy") == "fair",
           default=default.meta.get("strategy"), fair=fair.meta.get("strategy"))
    b, f = default.value, fair.value
    tolerance = max(0.3 * b, default.meta["long_s"] / 2)
    verify("the p95 short-task latency with -O fair is within noise of the default's",
           abs(f - b) <= tolerance, default_p95=b, fair_p95=f, tolerance=tolerance)


@claim("without prefetch hoarding the batch finishes sooner")
def prefetch_fix_shortens_makespan(comparison: Comparison) -> None:
    """Expected rounds of long tasks: ceil(pairs/2) on one worker vs ceil(pairs/4) shared; demand a quarter of that gain.

    The ideal assumes the hoarding worker took every long task; it usually
    takes most (the spacing lets the other grab one now and then), and a
    loaded machine stretches both runs' hand-offs: half the ideal gain
    failed once in CI (1.23x against 1.25x, 6 pairs, with a second suite
    worker busy). No hoarding at all gives 1.0x, which this still rejects.
    """
    m = comparison.before.meta
    rounds_before = math.ceil(m["pairs"] / 2)
    rounds_after = math.ceil(m["pairs"] / 4)
    gain = rounds_before / rounds_after
    comparison.check(factor=1 + (gain - 1) / 4)


@claim("no process idles while another worker holds tasks it cannot start")
def no_hoarding(comparison: Comparison) -> None:
    """Hoarded capacity (idle processes while another worker held unstarted tasks): large before, ~0 after.

    After, the only hold-ups left are hand-offs from a worker to its own
    pool process (milliseconds): under a tenth of a long task in all.
    """
    b, a = comparison.before.meta, comparison.after.meta
    long_s = b["long_s"]
    verify(f"{comparison.before.label}: processes idled while the other worker hoarded, for a long task's time or more",
           b["hoarded"] >= long_s, hoarded_slot_s=b["hoarded"], long_s=long_s)
    verify(f"{comparison.after.label}: no process idled while another worker held tasks (under a tenth of a long task)",
           a["hoarded"] <= long_s / 10, hoarded_slot_s=a["hoarded"], long_s=long_s)


@claim("--disable-prefetch is Redis-only: on RabbitMQ a busy worker still holds tasks another could run")
def disable_prefetch_is_redis_only(m: Measurement) -> None:
    """A measured comparison of brokers, not a fix: the same flag and batch that end hoarding on Redis.

    On RabbitMQ the workers warn that they ignore the flag, and processes
    sit idle while the other worker holds tasks for at least a long task's time.
    """
    x = m.meta
    verify("this is a --disable-prefetch run", x["mode"] == "disabled", mode=x["mode"])
    verify(f"{m.label}: processes idled while the other worker hoarded, for a long task's time or more",
           x["hoarded"] >= x["long_s"], hoarded_slot_s=x["hoarded"], long_s=x["long_s"], broker=x["broker"])
    verify("every worker warned that --disable-prefetch does not apply to its broker",
           sorted(x["warned"]) == sorted(x["slots"]), warned=x["warned"], workers=sorted(x["slots"]))


@claim("autoscale grows the pool for a burst and shrinks it back after the keepalive")
def autoscale_follows_the_load(m: Measurement) -> None:
    """The pool reached its maximum during the burst and returned to its minimum, not before the keepalive."""
    x = m.meta
    verify("the pool grew to its maximum during the burst", x["peak"] >= x["max"] > x["min"],
           peak=x["peak"], max=x["max"], min=x["min"])
    verify("it grew before the burst was over", x["grow_s"] < x["burst_done"],
           grow_s=x["grow_s"], burst_done=x["burst_done"])
    verify("it shrank back to its minimum after the burst", not math.isnan(x["shrink_s"]),
           shrink_s=x["shrink_s"])
    verify("it kept the processes for (about) the keepalive after it last grew",
           x["back_at"] - x["last_growth"] >= 0.8 * x["keepalive"],
           kept_s=x["back_at"] - x["last_growth"], keepalive=x["keepalive"])


# ============================================================================ tables and plots
def table(measurements: Sequence[Measurement]) -> Table:
    """Latency, makespan, busy fraction and stranded capacity of segregation / prefetch runs."""
    from labkit.table import Table  # noqa: PLC0415

    rows = []
    for m in measurements:
        x = m.meta
        busy_txt = ", ".join(f"{w} {100 * f:.0f}%" for w, f in x["busy_fraction"].items())
        rows.append([m.label, x["short_wait_p50"], x["short_wait_p95"], x["short_p95"], x["long_makespan"],
                     x["makespan"], busy_txt, x["stranded"], x["hoarded"]])
    return Table(["run", "short wait p50 [s]", "short wait p95 [s]", "short done p95 [s]",
                  "longs done [s]", "makespan [s]", "busy", "idle while tasks waited [slot-s]",
                  "... while another worker held them [slot-s]"], rows)


def broker_table(measurements: Sequence[Measurement]) -> Table:
    """Prefetch runs side by side: broker, the limit each worker applied, who warned, hoarding, makespan."""
    from labkit.table import Table  # noqa: PLC0415

    rows = []
    for m in measurements:
        x = m.meta
        limits = ", ".join(f"{w} {n}" for w, n in sorted(x["prefetch_count"].items()))
        longs = ", ".join(f"{w} {n}" for w, n in sorted(x["longs_per_worker"].items()))
        rows.append([m.label, x["broker"], limits, longs, ", ".join(x["warned"]) or "-", x["hoarded"], x["makespan"]])
    return Table(["run", "broker", "prefetch_count", "long tasks run by", "warned: Redis-only",
                  "idle while another worker held tasks [slot-s]", "makespan [s]"], rows)


def snapshot_table(m: Measurement) -> Table:
    """What each worker said it was running and holding at the snapshot moment."""
    from labkit.table import Table  # noqa: PLC0415

    snap = m.meta["snapshot"]
    rows = [[w, " ".join(s["active"]) or "-", " ".join(s["reserved"]) or "-"] for w, s in snap.items()]
    return Table(["worker", "active (running)", "reserved (held, not started)"], rows,
                 title=f"{m.label}: inspect() at {m.meta['snapshot_at']:.2f} s")


def plot_balance(measurements: Sequence[Measurement]):
    """Find the balance: short-task p95, makespan of the long tasks, and how busy each worker was."""
    from labkit.plots import bars, panels, style  # noqa: PLC0415

    fig, (ax1, ax2, ax3) = panels(3, width=4.2)
    p95 = [Measurement(m.label, "short-task latency p95", "s", [m.meta["short_p95"]]) for m in measurements]
    span = [Measurement(m.label, "long tasks done", "s", [m.meta["long_makespan"]]) for m in measurements]
    bars(p95, ax1, title="short tasks: p95 submit to done").set_ylabel("seconds")
    bars(span, ax2, title="long tasks: all done after").set_ylabel("seconds")
    labels, values = [], []
    for m in measurements:
        for w, f in m.meta["busy_fraction"].items():
            labels.append(f"{m.label.split(':')[0]}\n{w}")
            values.append(100 * f)
    ax3.bar(range(len(values)), values, color="#8d96a3")
    ax3.set_xticks(range(len(values)), labels, fontsize=8)
    for i, v in enumerate(values):
        ax3.annotate(f"{v:.0f}%", (i, v), ha="center", va="bottom", fontsize=9)
    style(ax3, "how busy each worker's processes were", "% of the run")
    return fig


def plot_autoscale(measurements: Sequence[Measurement]):
    """Pool size over time for each burst run; the burst's end and the keepalive marked."""
    from labkit.plots import axis, colour_for, style  # noqa: PLC0415

    ax = axis()
    for i, m in enumerate(measurements):
        ts, ns = zip(*m.timeline, strict=True)
        ax.step(ts, ns, where="post", lw=2, color=colour_for(m.label, i + 1), label=m.label)
        ax.axvline(m.meta["burst_done"], color=colour_for(m.label, i + 1), ls=":", lw=1)
    for m in (m for m in measurements if m.meta["autoscale"]):
        grew = m.meta["last_growth"]
        ax.axvspan(grew, grew + m.meta["keepalive"], color="grey", alpha=0.12,
                   label=f"keepalive ({m.meta['keepalive']:g} s) after the last scale-up")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(frameon=False, fontsize=9, loc="center right")
    return style(ax, "pool processes over time (dotted: last task done)", "processes",
                 "seconds since the burst was sent")


def plot_tasks(runs: Sequence[Measurement], *, mark: float | None = None):
    """Every task of each run as a bar on its pool process's lane (see :func:`~labkit.lessons._records.plot_gantt`)."""
    return plot_gantt(runs, mark=mark)
