"""Lesson 10, second notebook: single points of failure — eliminate what you can, mitigate the rest.

The talk's slides 88–93: *identify your single points of failure (database,
broker); eliminate the ones you can (a broker cluster, database replicas);
mitigate the ones you can't (pre-run checks, retries)*. The first notebook
(:mod:`labkit.lessons.failures`) measured what failures do to a task; this
one measures the single points themselves, on real processes, with the waits
scaled down:

* **identify** — SIGKILL the only ZooKeeper while a client takes a lock, and
  the only Redis while a producer publishes: both services stop for good;
* **eliminate, ZooKeeper** — a three-node ensemble keeps serving a kazoo
  ``Lock`` with its leader dead, and stops with a second node dead;
* **eliminate, Redis** — Sentinel fails over to the replica: the time until
  publishing resumes, and acknowledged publishes the replica never got;
* **eliminate, the talk's way** — a three-node RabbitMQ cluster with quorum
  queues keeps accepting and running tasks with a node SIGKILLed, and has no
  visibility timeout: the Sentinel cluster's long task and countdown run
  again, RabbitMQ's once;
* **mitigate** — what is left (here a database) gets a pre-run check and
  retries with backoff, which turn its outage into delay.

Helpers shared with the first notebook (counting in Redis, publishing from
producer threads, the visibility workload) are imported from
:mod:`labkit.lessons.failures`.
"""

from __future__ import annotations

import math
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

from labkit.app import redis_client
from labkit.lessons._probe import ProbeServer
from labkit.lessons.failures import LOST_WAIT, TRANSPORT, _counts, _producer, _publish
from labkit.measure import Comparison, Measurement, claim, verify
from labkit.poll import poll_until

if TYPE_CHECKING:  # pragma: no cover - workers import this module and need neither
    from labkit.client import ClusterLike
    from labkit.cluster import LocalCluster

NOTEBOOK = "10_single_points.ipynb"

#: The single points: one Redis (no persistence) and one ZooKeeper. No worker: what is measured is
#: whether the services answer (a lock round trip, a publish).
CLUSTER: dict[str, Any] = {"workers": 0, "zookeeper": 1}
#: Eliminated where Redis and ZooKeeper can: Sentinel (a primary, a replica, three sentinels) and a
#: three-node ZooKeeper ensemble. The worker keeps the first notebook's scaled-down transport options:
#: Sentinel changes who the primary is, not what kombu's Redis transport does (its visibility timeout).
HA: dict[str, Any] = {
    "workers": [{"name": "h1", "concurrency": 4}],
    "zookeeper": 3,
    "redis": "sentinel",
    "settings": {"broker_transport_options": TRANSPORT, "worker_lost_wait": LOST_WAIT},
}
#: The talk's broker: a three-node RabbitMQ cluster (quorum queues, publisher confirms), one
#: worker, Redis as the result backend and counter store. The same transport options travel
#: along; RabbitMQ's transport ignores the Redis-only ones (visibility_timeout...).
RABBIT: dict[str, Any] = {
    "workers": [{"name": "r1", "concurrency": 4}],
    "zookeeper": 0,
    "broker": "rabbitmq",
    "rabbitmq_nodes": 3,
    "settings": {"broker_transport_options": TRANSPORT, "worker_lost_wait": LOST_WAIT},
}
WORKSHOP = {"DB_TASKS": 16, "OUTAGE_S": 1.5, "RATE_HZ": 20.0}


# ----------------------------------------------------------------------------- tasks
@shared_task(name="single_points.tally")
def tally(run: str, i: int) -> int:
    """Count one execution of message ``i`` (a broker-failover stream: did it run, how often?)."""
    redis_client().hincrby(f"{run}:runs", str(i), 1)
    return i


class DatabaseDown(Exception):
    """The database answered "unavailable"."""


def _query(url: str, what: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/call?tag={what}&hold=0.05", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        raise DatabaseDown(f"database answered {exc.code} to {what}") from None


@shared_task(name="single_points.sync_plain")
def sync_plain(run: str, url: str) -> str:
    """Write to the database; an outage fails the task, and the work is gone."""
    redis_client().hincrby(f"{run}:attempts", "all", 1)
    _query(url, "write")
    return "written"


@shared_task(bind=True, name="single_points.sync_checked", max_retries=30)
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


# ----------------------------------------------------------------------------- a stream through a kill
def _stream_through_kill(cluster: LocalCluster, victim: str, send: Callable[[Any, int, dict], None], *,
                         window_s: float, rate_hz: float, lead_s: float,
                         tail_s: float | None = None) -> list[dict]:
    """Publish ``rate_hz`` messages a second, SIGKILL ``victim`` ``lead_s`` in, go on for ``window_s``.

    Each message is ``send(app, i, retry_policy)`` in a thread of its own,
    retrying until the window closes. With ``tail_s`` the stream stops once
    publishes have been accepted again for that long. Returns one record per
    message: ``sent`` and ``acked`` (seconds relative to the kill) and ``ok``.

    Times count from the moment the victim is known dead (``kill`` returns
    once it has exited), not from when the kill was due: under load the loop
    reaches the kill late, and publishes acknowledged in between would read
    as "accepted after the kill". Use ``sent >= 0`` for "published to a dead
    broker".
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
            records.append({"i": i, "sent": sent, "acked": time.monotonic(), "ok": ok})

    def resumed_for(seconds: float) -> bool:
        with lock:
            after = [x["acked"] for x in records if x["ok"] and x["sent"] >= killed_at]
        return bool(after) and time.monotonic() >= min(after) + seconds

    n = round((lead_s + window_s) * rate_hz)
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="labkit-stream")
    killed_at = math.inf
    try:
        for i in range(n):
            if killed_at < math.inf and tail_s is not None and resumed_for(tail_s):
                break
            poll_until(lambda i=i: time.monotonic() >= t0 + i / rate_hz, 10, 0.002)
            if killed_at == math.inf and time.monotonic() >= t_kill:
                cluster.kill(victim)  # returns once the process has exited
                killed_at = time.monotonic()
            pool.submit(publish, i)
    finally:
        pool.shutdown(wait=True)
        app.close()
    return [{**x, "sent": x["sent"] - killed_at, "acked": x["acked"] - killed_at} for x in records]


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
    ok_before = [x for x in records if x["ok"] and x["sent"] < 0]
    ok_after = sorted(x["acked"] for x in records if x["ok"] and x["sent"] >= 0)  # published to a dead broker
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

    def send(app: Any, i: int, policy: dict) -> None:
        with app.connection_for_write() as conn:
            app.send_task("single_points.tally", (run, i), connection=conn, ignore_result=True, retry_policy=policy)

    records = _stream_through_kill(cluster, victim, send, window_s=window_s, rate_hz=rate_hz, lead_s=lead_s)
    acked = {x["i"] for x in records if x["ok"]}
    poll_until(lambda: acked <= {int(k) for k in _counts(cluster, run, "runs")}, window_s + 20, 0.1,
               alive=lambda: any(n.alive() for n in cluster.rabbitmq_nodes))  # no broker left: nothing will run
    time.sleep(0.5)  # a redelivered duplicate arrives within moments of the failover
    runs = {int(k): v for k, v in _counts(cluster, run, "runs").items()}
    ok_after = sorted(x["acked"] for x in records if x["ok"] and x["sent"] >= 0)  # published to a dead node
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
def lock_service(cluster: LocalCluster, *, kill: int = 1, window_s: float = 3.0, lead_s: float = 0.5,
                 patience_s: float | None = None) -> Measurement:
    """Take and release a kazoo ``Lock`` in a loop; SIGKILL ``kill`` ZooKeeper nodes (the leader first).

    Watches ``window_s`` after the kill. If the service has not come back by
    then, it keeps watching up to ``patience_s`` after the kill — by default
    the ensemble's own bound when the survivors still hold a quorum
    (``ZooKeeperService.leader_loss_bound_s``; a loaded laptop
    can need more than a short window for the election), and no longer
    when they do not (nothing is coming back). Measured: the longest gap
    between two successful lock round trips around the kill (ms; up to the
    end of the watch when service never came back), how many round trips
    succeeded before and after it, and when the first one after it did.
    """
    from kazoo.client import KazooClient  # noqa: PLC0415
    from kazoo.retry import KazooRetry  # noqa: PLC0415

    live = [zk for zk in cluster.zookeepers if zk.alive()]
    if len(live) < kill:
        raise ValueError(f"asked to kill {kill} ZooKeeper node(s) but only {len(live)} run")
    order = sorted(live, key=lambda zk: zk.mode() != "leader")  # the leader first
    victims = [zk.name for zk in order[:kill]]
    if patience_s is None:  # wait for a comeback only where one can come: the survivors hold a quorum
        keeps_quorum = len(live) - kill >= len(cluster.zookeepers) // 2 + 1
        patience_s = max(window_s, cluster.zookeepers[0].leader_loss_bound_s()) if keeps_quorum else window_s
    modes = {zk.name: zk.mode() for zk in live}
    quiet = KazooRetry(max_tries=0)
    client = KazooClient(hosts=cluster.zk_hosts, timeout=6.0, connection_retry={"max_tries": -1, "delay": 0.05,
                         "max_delay": 0.2}, command_retry=quiet)
    client.start(timeout=15)
    path = f"/labkit/single_points/{uuid.uuid4().hex[:8]}"
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
        if state["killed"] is None:
            return False
        since = time.monotonic() - state["t0"] - state["killed"]
        served = bool(ok_times) and ok_times[-1] >= state["killed"]
        return since >= window_s and (served or since >= patience_s)

    try:
        poll_until(one_round, lead_s + max(window_s, patience_s) + 30, 0.01)
    finally:
        client.stop()  # fails the requests still queued on a dead connection, so their threads end
        client.close()
        rounds.shutdown(wait=True)
    killed_at = state["killed"]
    after = [t for t in ok_times if t >= killed_at]
    end = max(killed_at + window_s, *after) if after else killed_at + patience_s
    marks = [killed_at, *after, end] if after else [killed_at, end]
    last_before = max([t for t in ok_times if t < killed_at], default=killed_at)
    marks[0] = last_before
    gap = max(b - a for a, b in zip(marks, marks[1:], strict=False)) * 1000
    nodes = len(cluster.zookeepers)
    label = (f"{nodes}-node ensemble, {kill} killed" if nodes > 1 else "standalone ZooKeeper killed")
    return Measurement(label, "longest gap in lock service", "ms", [gap], stat="max",
                       meta={"nodes": nodes, "killed": victims, "modes": modes, "ok_before": len(ok_times) - len(after),
                             "ok_after": len(after), "window_s": window_s, "patience_s": patience_s,
                             "served_after": bool(after), "first_after_s": after[0] - killed_at if after else None,
                             "times": [t - killed_at for t in ok_times]})


@claim("a 3-node ensemble keeps serving locks with one node (its leader) dead; "
       "without a quorum (or with its only node dead) the service stops")
def ensemble_survives(comparison: Comparison) -> None:
    b, a = comparison.before, comparison.after
    verify("with one node down, locks are served again", a.meta["ok_after"] > 0, ok_after=a.meta["ok_after"],
           gap_ms=a.value, watched_s=a.meta["patience_s"])
    verify("within the ensemble's bound for losing its leader", a.meta["first_after_s"] <= a.meta["patience_s"],
           first_after_s=a.meta["first_after_s"], bound_s=a.meta["patience_s"])
    verify("without a quorum no lock is served", b.meta["ok_after"] == 0, ok_after=b.meta["ok_after"],
           label=b.label)


# ----------------------------------------------------------------------------- identify
def kill_single_points(cluster: LocalCluster, *, window_s: float = 2.0,
                       rate_hz: float = 10.0) -> dict[str, Measurement]:
    """:func:`lock_service` and :func:`failover` at once: SIGKILL the only ZooKeeper and the only Redis.

    The two share nothing (a lock loop on ZooKeeper, a publish stream on
    Redis), so their windows overlap. Returns ``"zookeeper"`` and ``"redis"``.
    """
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="labkit-single") as pool:
        zk = pool.submit(lock_service, cluster, kill=1, window_s=window_s)
        redis = pool.submit(failover, cluster, window_s=window_s, rate_hz=rate_hz)
        return {"zookeeper": zk.result(), "redis": redis.result()}


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


# ----------------------------------------------------------------------------- the talk's broker has no visibility timeout
@claim("RabbitMQ has no visibility timeout: a task longer than it, and a countdown longer than it, each run once")
def rabbitmq_runs_once(long: Measurement, countdown: Measurement) -> None:
    """A measured comparison of brokers, not a fix: the same tasks, the same ``visibility_timeout`` setting.

    RabbitMQ tracks each delivery on the consumer's channel and redelivers it
    only when that channel or its connection closes; kombu's ``pyamqp``
    transport ignores ``visibility_timeout``. (RabbitMQ's own
    ``consumer_timeout``, 30 min by default, closes the channel of a consumer
    that holds a delivery longer: the same trap, on a clock of its own.)
    """
    for m in (long, countdown):
        verify(f"{m.label}: it outlived the visibility_timeout setting",
               max(m.meta["task_s"], m.meta["countdown_s"]) > m.meta["vt"], task_s=m.meta["task_s"],
               countdown_s=m.meta["countdown_s"], vt=m.meta["vt"])
        verify(f"{m.label}: one execution", m.value == m.meta["n"], executions=m.value, broker=m.meta["broker"])


# ----------------------------------------------------------------------------- plots
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
