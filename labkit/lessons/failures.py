"""Lesson 10: single points of failure — every way the cluster breaks, and what each setting buys.

The talk's slides 88–93: *identify your single points of failure (database,
broker); eliminate the ones you can (a broker cluster, database replicas);
mitigate the ones you can't (pre-run checks, retries)*. This module measures
each failure on real processes, with the waits scaled down so the whole
lesson runs in a minute:

* **killed mid-task** — SIGKILL a whole worker, or the pool children running
  the tasks, under early ack, ``acks_late`` and ``acks_late`` +
  ``reject_on_worker_lost``;
* **the broker goes away** — publishes during an outage under the default
  publish retry policy and one sized to the outage; the backlog across a
  restart without and with the append-only file;
* **visibility timeout** — kombu's Redis transport redelivers any message
  not acknowledged within it: long ``acks_late`` tasks and countdowns beyond
  it run twice; a longer timeout or an idempotency key fixes it;
* **partition** — a worker cut off from Redis (a relay, no root) while it
  runs a task;
* **eliminate** — Redis Sentinel fails over to the replica; a 3-node
  ZooKeeper ensemble keeps serving a lock with its leader dead;
* **mitigate** — a pre-run check and retries with backoff turn a database
  outage into delay;
* **the talk's broker** — the same visibility workload on RabbitMQ, which
  has no visibility timeout (it redelivers when the consumer's channel or
  connection goes away), and a three-node RabbitMQ cluster with quorum
  queues that keeps accepting and running tasks with a node SIGKILLed.

Every count comes from Redis (``HINCRBY`` by the tasks, ``LLEN`` of queues),
from Celery's result states or from the kernel's own clock.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from celery import shared_task

from labkit.app import make_app, redis_client
from labkit.lessons._probe import ProbeServer
from labkit.measure import Comparison, Measurement, claim, verify
from labkit.poll import poll_until

if TYPE_CHECKING:  # pragma: no cover - workers import this module and need neither
    from labkit.client import ClusterLike
    from labkit.cluster import LocalCluster

NOTEBOOK = "10_failures.ipynb"

VT = 2.5  # seconds: the main cluster's visibility timeout, scaled down from kombu's default of 3600
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
    """The everyday cluster: one standalone Redis (no persistence), one ZooKeeper, three workers.

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
        "zookeeper": 1,
        "settings": {"broker_transport_options": TRANSPORT, "worker_lost_wait": LOST_WAIT},
    }


CLUSTER = cluster_config()
#: The hardened cluster: Sentinel (primary + replica + 3 sentinels), a 3-node ZooKeeper ensemble,
#: the append-only file, and a visibility timeout above the longest task and countdown.
HA: dict[str, Any] = {
    "workers": [{"name": "h1", "concurrency": 4}],
    "zookeeper": 3,
    "redis": "sentinel",
    "appendonly": True,
    "settings": {"broker_transport_options": {**TRANSPORT, "visibility_timeout": 60}, "worker_lost_wait": LOST_WAIT},
}
#: The talk's broker: a three-node RabbitMQ cluster (quorum queues, publisher confirms), one
#: worker, Redis as the result backend and counter store. The main cluster's transport options
#: travel along; RabbitMQ's transport ignores the Redis-only ones (visibility_timeout...).
RABBIT: dict[str, Any] = {
    "workers": [{"name": "r1", "concurrency": 4}],
    "zookeeper": 0,
    "broker": "rabbitmq",
    "rabbitmq_nodes": 3,
    "settings": {"broker_transport_options": TRANSPORT, "worker_lost_wait": LOST_WAIT},
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


@shared_task(name="failures.tally")
def tally(run: str, i: int) -> int:
    """Count one execution of message ``i`` (a broker-failover stream: did it run, how often?)."""
    redis_client().hincrby(f"{run}:runs", str(i), 1)
    return i


@shared_task(name="failures.sink")
def sink(i: int) -> int:
    """A message nobody is meant to run: it stays in its queue, so the queue's length counts it."""
    return i


class DatabaseDown(Exception):
    """The database answered "unavailable"."""


def _query(url: str, what: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/call?tag={what}&hold=0.05", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        raise DatabaseDown(f"database answered {exc.code} to {what}") from None


@shared_task(name="failures.sync_plain")
def sync_plain(run: str, url: str) -> str:
    """Write to the database; an outage fails the task, and the work is gone."""
    redis_client().hincrby(f"{run}:attempts", "all", 1)
    _query(url, "write")
    return "written"


@shared_task(bind=True, name="failures.sync_checked", max_retries=30)
def sync_checked(self, run: str, url: str) -> str:
    """Pre-run check, then write; either failing retries with exponential backoff and jitter."""
    redis_client().hincrby(f"{run}:attempts", "all", 1)
    try:
        _query(url, "ping")  # the pre-run check: is the database there before we start?
        _query(url, "write")
    except DatabaseDown as exc:
        backoff = min(0.8, 0.2 * 2 ** self.request.retries)  # exponential, capped below the visibility timeout
        countdown = random.uniform(backoff / 2, backoff)  # jitter: retries of many tasks do not arrive together
        raise self.retry(exc=exc, countdown=countdown) from None
    return "written"


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


def _stream_through_kill(cluster: LocalCluster, victim: str, send: Callable[[Any, int, dict], None], *,
                         window_s: float, rate_hz: float, lead_s: float,
                         tail_s: float | None = None) -> list[dict]:
    """Publish ``rate_hz`` messages a second, SIGKILL ``victim`` ``lead_s`` in, go on for ``window_s``.

    Each message is ``send(app, i, retry_policy)`` in a thread of its own,
    retrying until the window closes. With ``tail_s`` the stream stops once
    publishes have been accepted again for that long. Returns one record per
    message: ``sent`` and ``acked`` (seconds relative to the kill) and ``ok``.
    """
    app = _producer(cluster)
    records: list[dict] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    t_kill = t0 + lead_s

    def publish(i: int) -> None:
        sent = time.monotonic()
        left = max(0.0, t_kill + window_s - sent)  # retry only until the window closes
        policy = {"max_retries": math.ceil(left / 0.1), "interval_start": 0, "interval_step": 0.05,
                  "interval_max": 0.1}
        try:
            send(app, i, policy)
            ok = True
        except Exception:
            ok = False
        with lock:
            records.append({"i": i, "sent": sent - t_kill, "acked": time.monotonic() - t_kill, "ok": ok})

    def resumed_for(seconds: float) -> bool:
        with lock:
            after = [x["acked"] for x in records if x["ok"] and x["acked"] >= 0]
        return bool(after) and time.monotonic() - t_kill >= min(after) + seconds

    n = round((lead_s + window_s) * rate_hz)
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="labkit-stream")
    killed = False
    try:
        for i in range(n):
            if killed and tail_s is not None and resumed_for(tail_s):
                break
            poll_until(lambda i=i: time.monotonic() >= t0 + i / rate_hz, 10, 0.002)
            if not killed and time.monotonic() >= t_kill:
                cluster.kill(victim)
                killed = True
            pool.submit(publish, i)
    finally:
        pool.shutdown(wait=True)
        app.close()
    return records


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


@claim("RabbitMQ has no visibility timeout: a task longer than it, and a countdown longer than it, each run once")
def rabbitmq_runs_once(long: Measurement, countdown: Measurement) -> None:
    """A measured comparison of brokers, not a fix: the same tasks, the same ``visibility_timeout`` setting.

    RabbitMQ tracks each delivery on the consumer's channel and redelivers it
    only when that channel or its connection closes; kombu's ``pyamqp``
    transport ignores ``visibility_timeout``. (RabbitMQ's own
    ``consumer_timeout``, 30 min by default, closes the channel of a consumer
    that holds a delivery longer: the same trap, an order of magnitude later.)
    """
    for m in (long, countdown):
        verify(f"{m.label}: it outlived the visibility_timeout setting",
               max(m.meta["task_s"], m.meta["countdown_s"]) > m.meta["vt"], task_s=m.meta["task_s"],
               countdown_s=m.meta["countdown_s"], vt=m.meta["vt"])
        verify(f"{m.label}: one execution", m.value == m.meta["n"], executions=m.value, broker=m.meta["broker"])


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


# ----------------------------------------------------------------------------- eliminate: Sentinel
def failover(cluster: LocalCluster, *, window_s: float = 10.0, rate_hz: float = 10.0,
             lead_s: float = 0.5, tail_s: float = 1.0) -> Measurement:
    """Publish a steady stream, SIGKILL the Redis primary, keep publishing for up to ``window_s``.

    Every publish retries for up to ``window_s``; once publishes have been
    accepted again for ``tail_s`` the stream stops early. Measured: seconds
    from the kill to the first publish Redis accepted again (``window_s`` if
    none did), publishes accepted before and after, and acknowledged
    publishes missing from the queue afterwards — lost because replication
    is asynchronous. On a Sentinel cluster ``window_s`` must cover one failed
    election and its retry (``SentinelGroup.failover_bound_s``): a split vote
    is ordinary, and the claim is about the failover, not about luck.
    """
    group = getattr(cluster, "sentinel", None)
    if group is not None and window_s < group.failover_bound_s():
        raise ValueError(f"window_s={window_s:g} is shorter than this Sentinel group's failover bound "
                         f"({group.failover_bound_s():g} s: detection, one failed election and its retry); "
                         f"use window_s >= {group.failover_bound_s():g}")
    q = f"stream.{uuid.uuid4().hex[:6]}"
    records = _stream_through_kill(cluster, "redis", lambda app, i, policy: _publish(app, q, i, policy),
                                   window_s=window_s, rate_hz=rate_hz, lead_s=lead_s, tail_s=tail_s)
    ha = getattr(cluster, "sentinel", None) is not None
    present = None
    if ha:
        r = cluster.redis_client()
        present = r.llen(q)
        r.delete(q)
        r.close()
    ok_before = [x for x in records if x["ok"] and x["acked"] < 0]
    ok_after = sorted(x["acked"] for x in records if x["ok"] and x["acked"] >= 0)
    acked = sum(x["ok"] for x in records)
    gap = ok_after[0] if ok_after else window_s
    label = "Sentinel: primary killed" if ha else "standalone Redis killed"
    return Measurement(label, "time until publishing resumed", "s", [gap], stat="max",
                       meta={"n": len(records), "acked": acked, "ok_before": len(ok_before),
                             "ok_after": len(ok_after), "resumed": bool(ok_after), "window_s": window_s,
                             "present": present, "lost": None if present is None else acked - present,
                             "timeline": [(x["sent"], x["acked"], x["ok"]) for x in records]})


@claim("with Sentinel, publishing resumes by itself within the window after the primary dies; "
       "with one Redis nothing is accepted until someone restarts it")
def publishing_resumes(comparison: Comparison) -> None:
    b, a = comparison.before, comparison.after
    verify("after the primary was killed, the HA cluster accepted publishes again",
           a.meta["resumed"] and a.meta["ok_after"] > 0, ok_after=a.meta["ok_after"], gap_s=a.value)
    verify("it resumed within the window", a.value < a.meta["window_s"], gap_s=a.value, window_s=a.meta["window_s"])
    verify("the standalone broker accepted nothing after its kill", b.meta["ok_after"] == 0,
           ok_after=b.meta["ok_after"])


# ----------------------------------------------------------------------------- eliminate: RabbitMQ cluster
def node_death(cluster: LocalCluster, *, window_s: float = 3.0, rate_hz: float = 10.0, lead_s: float = 0.5,
               node: str | None = None) -> Measurement:
    """Publish a stream of tasks the workers run; SIGKILL one RabbitMQ node mid-stream.

    ``node``: which one (default: the first, every client's first URL — in
    practice also where the queue's leader lives). Each publish retries
    until the window closes and, on a quorum cluster, returns only once the
    broker confirms it. Measured: seconds from the kill to the first
    accepted publish (``window_s`` if none was), publishes accepted before
    and after, and — counted by the tasks in Redis — acknowledged publishes
    that never ran (``lost``) and messages that ran twice.
    """
    victim = node or cluster.rabbitmq_nodes[0].name
    names = {n.node: n.name for n in cluster.rabbitmq_nodes}
    leaders = cluster.rabbitmq_nodes[0].queue_leaders() if len(names) > 1 else {}
    run = f"node:{uuid.uuid4().hex[:8]}"

    def tally(app: Any, i: int, policy: dict) -> None:
        with app.connection_for_write() as conn:
            app.send_task("failures.tally", (run, i), connection=conn, ignore_result=True, retry_policy=policy)

    records = _stream_through_kill(cluster, victim, tally, window_s=window_s, rate_hz=rate_hz, lead_s=lead_s)
    acked = {x["i"] for x in records if x["ok"]}
    poll_until(lambda: acked <= {int(k) for k in _counts(cluster, run, "runs")}, window_s + 20, 0.1,
               alive=lambda: any(n.alive() for n in cluster.rabbitmq_nodes))  # no broker left: nothing will run
    time.sleep(0.5)  # a redelivered duplicate arrives within moments of the failover
    runs = {int(k): v for k, v in _counts(cluster, run, "runs").items()}
    ok_after = sorted(x["acked"] for x in records if x["ok"] and x["acked"] >= 0)
    nodes = len(cluster.rabbitmq_nodes)
    return Measurement(f"RabbitMQ, {nodes} node{'s' if nodes > 1 else ''}: {victim} killed",
                       "time until publishing resumed", "s", [ok_after[0] if ok_after else window_s], stat="max",
                       meta={"n": len(records), "acked": len(acked), "ok_before": len(acked) - len(ok_after),
                             "ok_after": len(ok_after), "resumed": bool(ok_after), "window_s": window_s,
                             "lost": len(acked - set(runs)), "twice": sum(1 for v in runs.values() if v > 1),
                             "ran_unacked": len(set(runs) - acked), "killed": victim, "nodes": nodes,
                             "leader": names.get(leaders.get("celery", ""), "-"),
                             "timeline": [(x["sent"], x["acked"], x["ok"]) for x in records]})


@claim("a three-node RabbitMQ cluster with quorum queues keeps accepting and running tasks with a node "
       "SIGKILLed; no acknowledged publish is lost")
def quorum_survives_a_node(m: Measurement) -> None:
    x = m.meta
    verify(f"{m.label}: publishes were accepted again after the kill", x["resumed"] and x["ok_after"] > 0,
           ok_after=x["ok_after"], gap_s=m.value)
    verify("within the window", m.value < x["window_s"], gap_s=m.value, window_s=x["window_s"])
    verify("every acknowledged publish ran", x["lost"] == 0, lost=x["lost"], acked=x["acked"])


# ----------------------------------------------------------------------------- eliminate: ZooKeeper
def lock_service(cluster: LocalCluster, *, kill: int = 1, window_s: float = 3.0, lead_s: float = 0.5) -> Measurement:
    """Take and release a kazoo ``Lock`` in a loop; SIGKILL ``kill`` ZooKeeper nodes (the leader first).

    Measured: the longest gap between two successful lock round trips after
    the kill (ms; the rest of the window when service never came back), and
    how many round trips succeeded before and after it.
    """
    from kazoo.client import KazooClient  # noqa: PLC0415
    from kazoo.retry import KazooRetry  # noqa: PLC0415

    live = [zk for zk in cluster.zookeepers if zk.alive()]
    if len(live) < kill:
        raise ValueError(f"asked to kill {kill} ZooKeeper node(s) but only {len(live)} run")
    order = sorted(live, key=lambda zk: zk.mode() != "leader")  # the leader first
    victims = [zk.name for zk in order[:kill]]
    modes = {zk.name: zk.mode() for zk in live}
    quiet = KazooRetry(max_tries=0)
    client = KazooClient(hosts=cluster.zk_hosts, timeout=6.0, connection_retry={"max_tries": -1, "delay": 0.05,
                         "max_delay": 0.2}, command_retry=quiet)
    client.start(timeout=15)
    path = f"/labkit/failures/{uuid.uuid4().hex[:8]}"
    ok_times: list[float] = []
    state = {"t0": time.monotonic(), "killed": None}

    def lock_round() -> bool:
        lock = client.Lock(path)
        if lock.acquire(timeout=0.5):
            lock.release()
            return True
        return False

    rounds = ThreadPoolExecutor(max_workers=64, thread_name_prefix="labkit-lock")

    def one_round() -> bool:
        now = time.monotonic() - state["t0"]
        if state["killed"] is None and now >= lead_s:
            for name in victims:
                cluster.kill(name)
            state["killed"] = time.monotonic() - state["t0"]
        try:  # a request on a connection that is re-establishing waits without a timeout: bound it here
            if rounds.submit(lock_round).result(timeout=1.0):
                ok_times.append(time.monotonic() - state["t0"])
        except Exception:  # ConnectionLoss, SessionExpired, LockTimeout, no answer in 1 s: no service this round
            pass
        return state["killed"] is not None and time.monotonic() - state["t0"] >= state["killed"] + window_s

    try:
        poll_until(one_round, lead_s + window_s + 30, 0.01)
    finally:
        client.stop()  # fails the requests still queued on a dead connection, so their threads end
        client.close()
        rounds.shutdown(wait=True)
    killed_at = state["killed"]
    end = killed_at + window_s
    after = [t for t in ok_times if t >= killed_at]
    marks = [killed_at, *after, end] if after else [killed_at, end]
    last_before = max([t for t in ok_times if t < killed_at], default=killed_at)
    marks[0] = last_before
    gap = max(b - a for a, b in zip(marks, marks[1:], strict=False)) * 1000
    nodes = len(cluster.zookeepers)
    label = (f"{nodes}-node ensemble, {kill} killed" if nodes > 1 else "standalone ZooKeeper killed")
    return Measurement(label, "longest gap in lock service", "ms", [gap], stat="max",
                       meta={"nodes": nodes, "killed": victims, "modes": modes, "ok_before": len(ok_times) - len(after),
                             "ok_after": len(after), "window_s": window_s, "served_after": bool(after),
                             "times": [t - killed_at for t in ok_times]})


@claim("a 3-node ensemble keeps serving locks with one node (its leader) dead; "
       "without a quorum (or with its only node dead) the service stops")
def ensemble_survives(comparison: Comparison) -> None:
    b, a = comparison.before, comparison.after
    verify("with one node down, locks are still served", a.meta["ok_after"] > 0, ok_after=a.meta["ok_after"],
           gap_ms=a.value)
    verify("the gap is shorter than the window", a.value < 1000 * a.meta["window_s"], gap_ms=a.value)
    verify("without a quorum no lock is served", b.meta["ok_after"] == 0, ok_after=b.meta["ok_after"],
           label=b.label)


# ----------------------------------------------------------------------------- mitigate
class _Database(ProbeServer):
    """The stand-in database: answers 503 while ``down`` (an emulated outage), 200 otherwise."""

    down = False

    def respond(self, params: dict[str, str]) -> int:
        return 503 if self.down else 200


def db_outage(cluster: ClusterLike, *, n: int = 8, outage_s: float = 1.0,
              mitigated: bool = False) -> Measurement:
    """``n`` tasks write to a database that is down for the first ``outage_s`` seconds.

    Without mitigation they fail; with a pre-run check and retries with
    backoff they wait it out. Values: 1 per task that wrote; meta: outcomes,
    attempts, and seconds from the first send to the last result.
    """
    run = f"db:{uuid.uuid4().hex[:8]}"
    task = sync_checked if mitigated else sync_plain
    with _Database() as db:
        db.down = True
        t0 = time.monotonic()
        results = [cluster.task(task).delay(run, db.url) for _ in range(n)]
        poll_until(lambda: time.monotonic() - t0 >= outage_s, outage_s + 1, 0.01)
        db.down = False
        poll_until(lambda: all(r.ready() for r in results), 60, 0.05)
        elapsed = time.monotonic() - t0
        writes = sum(1 for c in db.snapshot() if c.tag == "write" and c.status == 200)
    states = [r.state for r in results]
    attempts = _counts(cluster, run, "attempts").get("all", 0)
    label = "after: pre-run check + retry with backoff" if mitigated else "before: no mitigation"
    return Measurement(label, "tasks that wrote", "tasks", [1 if s == "SUCCESS" else 0 for s in states],
                       stat="sum", meta={"n": n, "outage_s": outage_s, "states": states, "attempts": attempts,
                                         "writes": writes, "elapsed_s": elapsed})


def compare_mitigation(cluster: ClusterLike, *, n: int = 8, outage_s: float = 1.0) -> Comparison:
    """The same outage, without and with the mitigation."""
    return Comparison(db_outage(cluster, n=n, outage_s=outage_s),
                      db_outage(cluster, n=n, outage_s=outage_s, mitigated=True),
                      better="higher", title="tasks that wrote despite a database outage")


@claim("a pre-run check and retries with backoff turn the outage into delay: every task writes, "
       "where without them the outage loses work")
def outage_becomes_delay(comparison: Comparison) -> None:
    b, a = comparison.before, comparison.after
    verify("with the mitigation every task wrote", a.value == a.meta["n"] and a.meta["writes"] == a.meta["n"],
           wrote=a.value, writes=a.meta["writes"], n=a.meta["n"], states=sorted(set(a.meta["states"])))
    verify("without it the outage lost work", b.value < b.meta["n"], wrote=b.value, n=b.meta["n"])
    verify("the cost is delay: it finished after the outage ended", a.meta["elapsed_s"] >= a.meta["outage_s"],
           elapsed_s=a.meta["elapsed_s"], outage_s=a.meta["outage_s"])


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


def plot_failover(measurements: list[Measurement]):
    """Each publish as a line from sent to acknowledged, around the kill (t = 0)."""
    from labkit.plots import colour_for, panels, style  # noqa: PLC0415

    fig, axes = panels(len(measurements), width=5.0)
    for i, (ax, m) in enumerate(zip(axes, measurements, strict=True)):
        for k, (sent, acked, ok) in enumerate(m.meta["timeline"]):
            ax.plot([sent, acked], [k, k], color=colour_for(m.label, i) if ok else "black", lw=1.2,
                    alpha=0.9 if ok else 0.4)
        ax.axvline(0, color="black", lw=1)
        ax.annotate(" killed", (0, len(m.meta["timeline"]) * 0.95), fontsize=8)
        style(ax, f"{m.label}: resumed after {m.value:.2f} s" if m.meta["resumed"]
              else f"{m.label}: nothing accepted", "publish #", "seconds since the kill (line: sent → accepted)")
    return fig


def plot_lock_service(measurements: list[Measurement]):
    """Successful lock round trips over time, the kill at t = 0."""
    from labkit.plots import colour_for, panels, style  # noqa: PLC0415

    fig, (ax,) = panels(1, width=9, height=2.6)
    for i, m in enumerate(measurements):
        ax.plot(m.meta["times"], [i] * len(m.meta["times"]), "|", ms=14, color=colour_for(m.label, i))
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(range(len(measurements)), [f"{m.label}\n(longest gap {m.value:.0f} ms)" for m in measurements],
                  fontsize=8)
    style(ax, "lock acquired and released (one tick each)", "", "seconds since the kill")
    return fig
