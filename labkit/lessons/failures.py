"""Lesson 10: what failures do to a task — and what each setting buys.

The talk's slides 88–93 start with *identify your single points of failure*.
Before eliminating any (that is :mod:`labkit.lessons.single_points`, the
lesson's second notebook), this module measures what each failure does to the
tasks in flight, on real processes, with the waits scaled down so that the
notebook runs in well under a minute:

* **killed mid-task** — SIGKILL a whole worker, or the pool children running
  the tasks, under early ack, ``acks_late`` and ``acks_late`` +
  ``reject_on_worker_lost``;
* **visibility timeout** — kombu's Redis transport redelivers any message
  not acknowledged within it: long ``acks_late`` tasks and countdowns beyond
  it run twice; a timeout above the longest task and countdown (on a Redis
  whose consumers all use it), plus an idempotency key, fixes it;
* **partition** — a worker cut off from Redis (a relay, no root) while it
  runs a task;
* **the broker goes away** — publishes during an outage under the default
  publish retry policy and one sized to the outage; the backlog across a
  restart without and with the append-only file.

Every count comes from Redis (``HINCRBY`` by the tasks, ``LLEN`` of queues),
from Celery's result states or from the kernel's own clock.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from celery import shared_task

from labkit.app import make_app, redis_client
from labkit.measure import Comparison, Measurement, claim, verify
from labkit.poll import poll_until

if TYPE_CHECKING:  # pragma: no cover - workers import this module and need neither
    from labkit.cluster import LocalCluster

NOTEBOOK = "10_failures.ipynb"

VT = 2.5  # seconds: the clusters' visibility timeout, scaled down from kombu's default of 3600
TRANSPORT = {
    "visibility_timeout": VT,
    "unacked_restore_interval": 0.5,  # sweep for expired unacked messages every 0.5 s (default 10 s)...
    "unacked_restore_throttle": 1,  # ...on every sweep (default: every 10th): redelivery shows within VT + 0.5 s
    "unacked_mutex_expire": 2,  # a worker SIGKILLed while sweeping must not block sweeps for 300 s
}
LOST_WAIT = 0.3  # seconds the pool waits for a dead child's result before WorkerLostError (default 10)
VICTIMS = 3  # tasks of each ack mode per kill (one per pool child)
MODES = ("early", "late", "reject")
MODE_LABELS = {"early": "early ack (default)", "late": "acks_late",
               "reject": "acks_late + reject_on_worker_lost"}


def cluster_config(victims: int = VICTIMS) -> dict[str, Any]:
    """The everyday cluster: one standalone Redis (no persistence), three workers.

    ``w1`` and ``w2`` run the kill experiments (one pool child per task:
    ``3 * victims``); ``w3`` reaches Redis through a relay so it can be
    partitioned, and serves the default queue.
    """
    pool = len(MODES) * victims
    return {
        "workers": [
            {"name": "w1", "queues": ["victim1"], "concurrency": pool, "prefetch_multiplier": 1},
            {"name": "w2", "queues": ["victim2"], "concurrency": pool, "prefetch_multiplier": 1},
            {"name": "w3", "queues": ["celery", "remote"], "concurrency": 4, "relay": True},
        ],
        "zookeeper": 0,
        "settings": {"broker_transport_options": TRANSPORT, "worker_lost_wait": LOST_WAIT},
    }


CLUSTER = cluster_config()
LONG_VT_S = 60.0  # seconds: the fixed cluster's visibility timeout, above every task and countdown here
#: The visibility timeout's fix, on a Redis of its own: kombu's Redis transport keeps one unacked set
#: per Redis, and *every* consumer's sweep restores from it what is older than *its own* timeout, so a
#: single worker with a short timeout would redeliver the long-timeout workers' tasks too.
LONG_VT: dict[str, Any] = {
    "workers": [{"name": "v1", "concurrency": 3}],
    "zookeeper": 0,
    "settings": {"broker_transport_options": {**TRANSPORT, "visibility_timeout": LONG_VT_S},
                 "worker_lost_wait": LOST_WAIT},
}
#: A Redis with the append-only file and nothing else: the backlog experiment's "after".
DURABLE: dict[str, Any] = {"workers": 0, "zookeeper": 0, "appendonly": True}
WORKSHOP = {"VICTIMS": 4, "BACKLOG": 1000, "OUTAGE_S": 1.5, "TASK_S": 1.2}


# ----------------------------------------------------------------------------- tasks
def _work(run: str, key: str, seconds: float) -> str:
    """Count a start, work ``seconds``, count a finish (both in Redis)."""
    r = redis_client()
    r.hincrby(f"{run}:starts", key, 1)
    r.rpush(f"{run}:pids", f"{key} {os.getpid()}")
    time.sleep(seconds)
    r.hincrby(f"{run}:done", key, 1)
    return key


@shared_task(name="failures.work_early")
def work_early(run: str, key: str, seconds: float) -> str:
    """Default: the message is acknowledged when the task *starts*."""
    return _work(run, key, seconds)


@shared_task(name="failures.work_late", acks_late=True)
def work_late(run: str, key: str, seconds: float) -> str:
    """``acks_late``: acknowledged when the task *ends* (also when it fails)."""
    return _work(run, key, seconds)


@shared_task(name="failures.work_reject", acks_late=True, reject_on_worker_lost=True)
def work_reject(run: str, key: str, seconds: float) -> str:
    """``acks_late`` + ``reject_on_worker_lost``: a lost child puts the message back."""
    return _work(run, key, seconds)


WORK = {"early": work_early, "late": work_late, "reject": work_reject}


@shared_task(name="failures.effect", acks_late=True)
def effect(run: str, key: str, seconds: float) -> str:
    """A late-acked task with a side effect (``effects`` += 1) each time it runs."""
    r = redis_client()
    r.hincrby(f"{run}:starts", key, 1)
    time.sleep(seconds)
    r.hincrby(f"{run}:effects", key, 1)
    r.hincrby(f"{run}:done", key, 1)
    return key


@shared_task(name="failures.effect_once", acks_late=True)
def effect_once(run: str, key: str, seconds: float) -> str:
    """The same task made idempotent: the effect happens only for the first run that claims ``key``."""
    r = redis_client()
    r.hincrby(f"{run}:starts", key, 1)
    time.sleep(seconds)
    if r.set(f"{run}:claimed:{key}", 1, nx=True, ex=3600):  # the idempotency key
        r.hincrby(f"{run}:effects", key, 1)
    r.hincrby(f"{run}:done", key, 1)
    return key


@shared_task(name="failures.sink")
def sink(i: int) -> int:
    """A message nobody is meant to run: it stays in its queue, so the queue's length counts it."""
    return i


# ----------------------------------------------------------------------------- helpers
def _counts(cluster: Any, run: str, field: str) -> dict[str, int]:
    r = cluster.redis_client()
    try:
        return {k.decode(): int(v) for k, v in r.hgetall(f"{run}:{field}").items()}
    finally:
        r.close()


def _settled(cluster: Any, run: str, grace: float, timeout: float) -> None:
    """Wait until every execution that started has finished and nothing new started for ``grace`` s."""
    last: dict[str, Any] = {"sig": None, "since": time.monotonic()}

    def quiet() -> bool:
        starts, done = _counts(cluster, run, "starts"), _counts(cluster, run, "done")
        sig = (sorted(starts.items()), sorted(done.items()))
        if sig != last["sig"]:
            last.update(sig=sig, since=time.monotonic())
        return sum(starts.values()) == sum(done.values()) and time.monotonic() - last["since"] >= grace

    poll_until(quiet, timeout, 0.1)


def _publish(app: Any, queue: str, i: int, policy: dict | None) -> None:
    """One ``delay()`` as a producer thread makes it: its own connection (kombu's are not thread-safe)."""
    kwargs = {"retry_policy": policy} if policy else {}
    with app.connection_for_write() as conn:
        app.send_task("failures.sink", (i,), queue=queue, connection=conn, ignore_result=True, **kwargs)


def _producer(cluster: LocalCluster):
    """A Celery app of its own for a producer thread (``restart("redis")`` resets the cluster's app)."""
    broker = cluster.broker_url if getattr(cluster, "rabbitmq", None) is not None else None
    return make_app(cluster.redis_url, settings=cluster.settings, include=[], broker_url=broker)


# ----------------------------------------------------------------------------- killed mid-task
def kill_matrix(cluster: LocalCluster, *, victims: int = VICTIMS, task_s: float = 1.0) -> dict[str, Measurement]:
    """Kill the worker ``w1`` (SIGKILL, then restart it) and the busy pool children of ``w2``, mid-task.

    Each worker runs ``victims`` tasks of each ack mode at once, one per pool
    child; the kills happen when all of them have started. Returns one
    Measurement per ``"<how>/<mode>"``: tasks completed out of ``victims``,
    with how often each started and its final state.
    """
    run = f"kill:{uuid.uuid4().hex[:8]}"
    results: dict[tuple[str, str], list] = {}
    for how, queue in (("worker", "victim1"), ("child", "victim2")):
        for mode in MODES:
            results[(how, mode)] = [
                cluster.task(WORK[mode]).apply_async((f"{run}:{how}", f"{mode}{i}", task_s), queue=queue)
                for i in range(victims)]
    total = len(MODES) * victims
    poll_until(lambda: all(len(_counts(cluster, f"{run}:{how}", "starts")) == total for how in ("worker", "child")),
               30, 0.05, what=f"all {2 * total} victims to start")
    # the children to kill: every pool process of w2 that runs one of our tasks, highest index first
    r = cluster.redis_client()
    busy = {int(entry.split()[1]) for entry in (x.decode() for x in r.lrange(f"{run}:child:pids", 0, -1))}
    r.close()
    kids = cluster.children("w2")
    t_kill = time.monotonic()
    for index in sorted((kids.index(pid) for pid in busy if pid in kids), reverse=True):
        cluster.kill("w2", child=index)
    cluster.kill("w1")
    cluster.restart("w1")  # a new worker on the same queue, as a supervisor would start
    deadline = VT + 1.0 + 2 * task_s + 8.0  # redelivery after the visibility timeout, plus a run, plus slack

    def final() -> bool:
        states = [res.state for rs in results.values() for res in rs]
        pending = [s for s in states if s not in ("SUCCESS", "FAILURE")]
        lost_early = sum(1 for res in results[("worker", "early")] if res.state == "STARTED")
        return len(pending) == lost_early and time.monotonic() - t_kill > VT + 1.0 + task_s

    poll_until(final, deadline, 0.1)
    out = {}
    for (how, mode), rs in results.items():
        starts = _counts(cluster, f"{run}:{how}", "starts")
        done = _counts(cluster, f"{run}:{how}", "done")
        keys = [f"{mode}{i}" for i in range(victims)]
        completed = [1 if done.get(k, 0) >= 1 else 0 for k in keys]
        out[f"{how}/{mode}"] = Measurement(
            f"{how} killed, {MODE_LABELS[mode]}", "tasks completed", "tasks", completed, stat="sum",
            meta={"how": how, "mode": mode, "n": victims, "starts": [starts.get(k, 0) for k in keys],
                  "ran_twice": sum(1 for k in keys if starts.get(k, 0) >= 2),
                  "states": [res.state for res in rs], "task_s": task_s, "vt": VT,
                  "waited_s": time.monotonic() - t_kill})
    return out


def matrix_table(matrix: dict[str, Measurement]):
    """The kill matrix as a table: completed out of n, started twice, final Celery states."""
    from labkit.table import Table  # noqa: PLC0415

    rows = []
    for m in matrix.values():
        states = sorted(set(m.meta["states"]))
        rows.append([m.meta["how"], MODE_LABELS[m.meta["mode"]], f"{int(m.value)}/{m.n}", m.meta["ran_twice"],
                     ", ".join(f"{m.meta['states'].count(s)}× {s}" for s in states)])
    return Table(["SIGKILL", "ack mode", "completed", "started twice", "Celery says"], rows)


@claim("acks_late: every task of a SIGKILLed worker is delivered again and completes")
def late_ack_survives_worker_kill(m: Measurement) -> None:
    verify("every task completed after the worker was killed", m.value == m.n,
           completed=m.value, n=m.n, states=m.meta["states"], label=m.label)


@claim("acks_late + reject_on_worker_lost: every task whose pool child was SIGKILLed runs again and completes")
def reject_survives_child_kill(m: Measurement) -> None:
    verify("every task completed after its pool child was killed", m.value == m.n,
           completed=m.value, n=m.n, states=m.meta["states"], label=m.label)


# ----------------------------------------------------------------------------- the broker goes away
def _policy(outage_s: float) -> dict[str, float]:
    """A publish retry policy whose total wait covers ``outage_s`` three times over plus a restart."""
    step, cap = 0.2, 0.5
    budget = 3 * outage_s + 10
    return {"max_retries": math.ceil(budget / cap) + 3, "interval_start": 0, "interval_step": step,
            "interval_max": cap}


def broker_outage(cluster: LocalCluster, *, backlog: int = 200, outage_s: float = 1.0,
                  rate_hz: float = 10.0) -> dict[str, Measurement]:
    """Kill Redis for ``outage_s`` while two producers publish, then restart it (no persistence).

    Before the kill, ``backlog`` messages wait in a queue nobody consumes.
    During the outage one producer publishes with Celery's default retry
    policy, the other with :func:`_policy`. Afterwards the queues' lengths
    say what Redis really holds. Returns ``"default"``, ``"sized"`` (per
    attempt: 1 if the message is in Redis afterwards) and ``"backlog"``.
    """
    tag = uuid.uuid4().hex[:6]
    backlog_q = f"backlog.{tag}"
    for i in range(backlog):
        cluster.task(sink).apply_async((i,), queue=backlog_q)
    r = cluster.redis_client()
    queued = r.llen(backlog_q)
    r.close()
    attempts = max(1, round(outage_s * rate_hz))
    apps = {"default": _producer(cluster), "sized": _producer(cluster)}
    policies = {"default": None, "sized": _policy(outage_s)}
    records: dict[str, list[dict]] = {"default": [], "sized": []}
    lock = threading.Lock()

    def publish(form: str, i: int) -> None:
        t0 = time.monotonic()
        rec = {"i": i, "ok": False, "error": ""}
        try:
            _publish(apps[form], f"outage.{form}.{tag}", i, policies[form])
            rec["ok"] = True
        except Exception as exc:  # what the producer learns
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
        rec["blocked_s"] = time.monotonic() - t0
        with lock:
            records[form].append(rec)

    pool = ThreadPoolExecutor(max_workers=2 * attempts, thread_name_prefix="labkit-producer")
    try:
        cluster.kill("redis")
        t_kill = time.monotonic()
        futures = []
        for i in range(attempts):
            poll_until(lambda i=i: time.monotonic() >= t_kill + i / rate_hz, 10, 0.005)
            futures += [pool.submit(publish, form, i) for form in ("default", "sized")]
        poll_until(lambda: time.monotonic() >= t_kill + outage_s, outage_s + 1, 0.01)
        cluster.restart("redis")
        t_back = time.monotonic() - t_kill
        for f in futures:
            f.result(timeout=3 * outage_s + 30)
    finally:
        pool.shutdown(wait=True)
        for app in apps.values():
            app.close()
    r = cluster.redis_client()
    lengths = {form: r.llen(f"outage.{form}.{tag}") for form in records}
    survived = r.llen(backlog_q)
    r.delete(backlog_q, *[f"outage.{form}.{tag}" for form in records])
    r.close()
    out = {}
    for form, recs in records.items():
        ok = sum(rec["ok"] for rec in recs)
        raised = len(recs) - ok
        present = lengths[form]
        label = "default publish retry" if form == "default" else "retry policy sized to the outage"
        out[form] = Measurement(label, "publishes in Redis after the outage", "messages",
                                [1] * present + [0] * (len(recs) - present), stat="sum",
                                meta={"n": len(recs), "ok": ok, "raised": raised, "present": present,
                                      "silently_lost": max(0, ok - present), "outage_s": outage_s,
                                      "back_after_s": t_back, "policy": policies[form] or "Celery's default",
                                      "errors": sorted({rec["error"] for rec in recs if rec["error"]}),
                                      "max_blocked_s": max(rec["blocked_s"] for rec in recs)})
    out["backlog"] = Measurement("restart without persistence", "backlog after a Redis restart", "messages",
                                 [survived], stat="sum", meta={"n": queued, "appendonly": False})
    return out


def backlog_restart(cluster: LocalCluster, *, backlog: int = 200) -> Measurement:
    """``backlog`` messages in a queue nobody consumes, a SIGKILL of Redis, a restart: how many are left?"""
    q = f"backlog.{uuid.uuid4().hex[:6]}"
    for i in range(backlog):
        cluster.task(sink).apply_async((i,), queue=q)
    r = cluster.redis_client()
    queued = r.llen(q)
    r.close()
    cluster.kill("redis")
    cluster.restart("redis")
    r = cluster.redis_client()
    survived = r.llen(q)
    r.delete(q)
    r.close()
    on = cluster.redis.appendonly
    return Measurement("restart with appendonly" if on else "restart without persistence",
                       "backlog after a Redis restart", "messages", [survived], stat="sum",
                       meta={"n": queued, "appendonly": on})


@claim("a retry policy sized to the outage delivers every publish; the producer is never left unsure")
def sized_policy_delivers(m: Measurement) -> None:
    x = m.meta
    verify("every publish made during the outage is in Redis afterwards", m.value == x["n"],
           present=m.value, n=x["n"], raised=x["raised"], errors=x["errors"])
    verify("no publish was reported sent and then missing", x["silently_lost"] == 0,
           silently_lost=x["silently_lost"])


@claim("with the append-only file, a restarted Redis still holds the whole backlog")
def backlog_survives(m: Measurement) -> None:
    verify("the backlog survived the restart", m.value == m.meta["n"], survived=m.value, n=m.meta["n"],
           appendonly=m.meta["appendonly"])


# ----------------------------------------------------------------------------- visibility timeout
def visibility(cluster: LocalCluster, *, task_s: float = 2 * VT, countdown_s: float = 1.6 * VT,
               label: str = "") -> dict[str, Measurement]:
    """A late-acked task that runs ``task_s``, the same task made idempotent, and a ``countdown_s`` task.

    Returns ``"long"``, ``"idempotent"`` and ``"countdown"``: executions per
    task (values) and side effects (meta) — on whatever visibility timeout
    the cluster's workers use (recorded as ``vt``).
    """
    run = f"vt:{uuid.uuid4().hex[:8]}"
    vt = cluster.settings.get("broker_transport_options", {}).get("visibility_timeout", 3600)
    broker = getattr(cluster, "broker", "redis")
    sent = {
        "long": cluster.task(effect).apply_async((run, "long", task_s)),
        "idempotent": cluster.task(effect_once).apply_async((run, "idempotent", task_s)),
        "countdown": cluster.task(effect).apply_async((run, "countdown", 0.1), countdown=countdown_s),
    }
    poll_until(lambda: all(r.ready() for r in sent.values()), task_s + countdown_s + 30, 0.1)
    _settled(cluster, run, grace=1.0, timeout=task_s + 3 * VT + 30)
    starts, effects = _counts(cluster, run, "starts"), _counts(cluster, run, "effects")
    prefix = label or (f"visibility_timeout={vt:g} s" if broker == "redis" else "RabbitMQ")
    what = {"long": f"task of {task_s:g} s", "idempotent": f"idempotent task of {task_s:g} s",
            "countdown": f"countdown={countdown_s:g} s"}
    return {key: Measurement(f"{prefix}: {what[key]}", "executions", "runs", [starts.get(key, 0)], stat="sum",
                             meta={"n": 1, "vt": vt, "effects": effects.get(key, 0), "task_s": task_s,
                                   "countdown_s": countdown_s, "broker": broker})
            for key in sent}


def visibility_each(cluster: LocalCluster, *others: LocalCluster, **params: Any) -> list[dict[str, Measurement]]:
    """:func:`visibility` on ``cluster`` and each of ``others`` at once (each has its own broker and workers)."""
    clusters = [cluster, *others]
    with ThreadPoolExecutor(max_workers=len(clusters), thread_name_prefix="labkit-vt") as pool:
        return list(pool.map(lambda c: visibility(c, **params), clusters))


@claim("with a visibility timeout above the longest task and countdown, each task runs exactly once")
def runs_once(comparison: Comparison) -> None:
    b, a = comparison.before, comparison.after
    verify("after the fix: one execution per task", a.value == a.meta["n"], executions=a.value, vt=a.meta["vt"])
    verify("before it: more executions than tasks (the redelivery the fix removes)", b.value > b.meta["n"],
           executions=b.value, vt=b.meta["vt"])


@claim("an idempotency key keeps the side effect at one per task, however often the task runs")
def effects_once(m: Measurement) -> None:
    verify("one side effect per task", m.meta["effects"] == m.meta["n"], effects=m.meta["effects"],
           executions=m.value, label=m.label)


# ----------------------------------------------------------------------------- partition
def partition(cluster: LocalCluster, *, task_s: float = 0.5, cut_s: float = VT + 1.2,
              worker: str = "w3") -> dict[str, Measurement]:
    """Cut ``worker`` off from Redis while it runs a late-acked task (plain and idempotent); heal after ``cut_s``.

    Returns ``"plain"`` and ``"idempotent"``: executions (values), effects,
    whether the task finished while cut off, how many of its messages were
    back in the queue when the link healed, and the final result state.
    """
    run = f"cut:{uuid.uuid4().hex[:8]}"
    results = {"plain": cluster.task(effect).apply_async((run, "plain", task_s), queue="remote"),
               "idempotent": cluster.task(effect_once).apply_async((run, "idempotent", task_s), queue="remote")}
    poll_until(lambda: len(_counts(cluster, run, "starts")) == 2, 30, 0.02, what="both tasks to start")
    cluster.partition(worker)
    t_cut = time.monotonic()
    try:
        poll_until(lambda: time.monotonic() - t_cut >= cut_s, cut_s + 1, 0.02)
        # the kernel still reaches Redis: what does it see of the cut-off worker's tasks?
        done_while_cut = _counts(cluster, run, "done")
        r = cluster.redis_client()
        in_queue = r.llen("remote")
        r.close()
    finally:
        cluster.heal(worker)
    poll_until(lambda: all(x.ready() for x in results.values()), 30, 0.05)
    _settled(cluster, run, grace=task_s + 1.0, timeout=30)
    starts, effects = _counts(cluster, run, "starts"), _counts(cluster, run, "effects")
    return {key: Measurement(f"{'before' if key == 'plain' else 'after'}: {key} task, {worker} cut off {cut_s:g} s",
                             "executions", "runs", [starts.get(key, 0)], stat="sum",
                             meta={"n": 1, "effects": effects.get(key, 0), "cut_s": cut_s, "vt": VT,
                                   "in_queue_at_heal": in_queue,
                                   "done_seen_while_cut": done_while_cut.get(key, 0),
                                   "state": res.state})
            for key, res in results.items()}


# ----------------------------------------------------------------------------- tables and plots
def outcome_table(measurements: list[Measurement], columns: list[str]):
    """A table of chosen ``meta`` fields, one row per measurement."""
    from labkit.table import Table  # noqa: PLC0415

    def cell(v: Any) -> Any:
        if isinstance(v, list | dict | tuple):
            return str(v)
        return v

    return Table(["run", "value", *columns], [[m.label, m.value, *(cell(m.meta.get(c)) for c in columns)]
                                              for m in measurements])


def plot_matrix(matrix: dict[str, Measurement]):
    """Completed and started-twice counts per (kill, ack mode)."""
    from labkit.plots import AFTER, BEFORE, NEUTRAL, panels, style  # noqa: PLC0415

    fig, axes = panels(2, width=5.2)
    for ax, how in zip(axes, ("worker", "child"), strict=True):
        ms = [matrix[f"{how}/{mode}"] for mode in MODES]
        xs = range(len(ms))
        ax.bar([x - 0.2 for x in xs], [m.value for m in ms], 0.4, color=[BEFORE, NEUTRAL[0], AFTER],
               label="completed")
        ax.bar([x + 0.2 for x in xs], [m.meta["ran_twice"] for m in ms], 0.4, color="grey", alpha=0.5,
               label="started twice")
        ax.axhline(ms[0].n, ls="--", color="grey", lw=1)
        ax.set_xticks(list(xs), [MODE_LABELS[m].replace(" + ", "\n+ ") for m in MODES], fontsize=8)
        ax.legend(frameon=False, fontsize=8)
        style(ax, f"SIGKILL the {'whole worker' if how == 'worker' else 'busy pool children'}",
              f"tasks (of {ms[0].n})")
    return fig


def plot_visibility(before: dict[str, Measurement], after: dict[str, Measurement]):
    """Executions (wide, pale) and side effects (narrow) of each task, short vs long visibility timeout."""
    from labkit.plots import AFTER, BEFORE, panels, style  # noqa: PLC0415

    fig, (ax,) = panels(1, width=8, height=3.0)
    keys = list(before)
    for shift, runs, colour in ((-0.2, before, BEFORE), (0.2, after, AFTER)):
        xs = [x + shift for x in range(len(keys))]
        vt = runs[keys[0]].meta["vt"]
        ax.bar(xs, [runs[k].value for k in keys], 0.38, color=colour, alpha=0.35,
               label=f"executions, visibility_timeout={vt:g} s")
        ax.bar(xs, [runs[k].meta["effects"] for k in keys], 0.16, color=colour, label="side effects")
    ax.axhline(1, ls="--", color="grey", lw=1)
    ax.set_xticks(range(len(keys)), [before[k].label.split(": ", 1)[-1] for k in keys], fontsize=8)
    ax.legend(frameon=False, fontsize=7, ncol=2)
    style(ax, "each task should run once", "count")
    return fig
