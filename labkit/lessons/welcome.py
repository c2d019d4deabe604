"""Lesson 00 — welcome: a real cluster, who runs a task, what a hop costs, what a dead worker leaves.

The smallest tasks worth sending to a worker, and four experiments on them:

* :func:`fan_out` — many tasks at once: which worker and which pool child
  (OS process) ran each one;
* :func:`local_calls` vs :func:`round_trips` (:func:`compare_latency`) — a
  plain function call against the same call as a task, each measured ``n``
  times;
* :func:`kill_mid_task` — SIGKILL the worker running a task and look at what
  the caller sees, and at what is left of the message in Redis;
* :func:`makespan` — a batch of sleeping tasks: how long until all are done,
  and which worker ran how many (the exercise).

Claims: :func:`fan_out_spreads_over_processes`,
:func:`a_round_trip_costs_many_calls`, :func:`a_killed_workers_task_is_lost`
and, for the exercise, :func:`more_workers_share_the_batch`.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from celery import shared_task

from labkit.app import worker_name
from labkit.client import ClusterLike, short_name
from labkit.measure import Comparison, Measurement, claim, verify
from labkit.poll import poll_until

if TYPE_CHECKING:  # workers import this module: keep them from loading the cluster machinery
    from labkit.cluster import LocalCluster

NOTEBOOK = "00_welcome.ipynb"
QUEUE = "celery"  # the default queue every default worker consumes


def cluster_config(workers: int = 2, concurrency: int = 2) -> dict[str, Any]:
    """``LocalCluster(**welcome.cluster_config(WORKERS, CONCURRENCY))``: the notebook's cluster shape.

    Default workers ``w1``..``wN``, each a prefork pool of ``concurrency``
    children, and a standalone ZooKeeper to look at. The lesson is about work
    spread over processes, so it needs at least two pool children in all.
    """
    for name, value in (("workers", workers), ("concurrency", concurrency)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")
    if workers * concurrency < 2:
        raise ValueError(f"WORKERS x CONCURRENCY = {workers * concurrency}: this lesson shows tasks spread "
                         "over several processes, so give it at least 2 pool children in all")
    return {"workers": workers, "worker_options": {"concurrency": concurrency}}


CLUSTER = cluster_config()
WORKSHOP = {"WORKERS": 3, "CONCURRENCY": 2, "FANOUT": 120, "ROUND_TRIPS": 100}


# ----------------------------------------------------------------------------- tasks


@shared_task(name="welcome.add")
def add(x: float, y: float) -> float:
    return x + y


@shared_task(name="welcome.where")
def where() -> dict:
    """Which worker and which OS process ran this task."""
    return {"worker": worker_name(), "pid": os.getpid(), "host": socket.gethostname()}


@shared_task(name="welcome.slow")
def slow(seconds: float) -> dict:
    """Sleep, then say where it ran: long enough to kill the worker in the middle."""
    time.sleep(seconds)
    return {"worker": worker_name(), "pid": os.getpid(), "slept": seconds}


@shared_task(name="welcome.slow_acks_late", acks_late=True)
def slow_acks_late(seconds: float) -> dict:
    """:func:`slow` with ``acks_late=True``: acknowledged after it returns, not when it starts."""
    time.sleep(seconds)
    return {"worker": worker_name(), "pid": os.getpid(), "slept": seconds}


# ----------------------------------------------------------------------------- who runs a task


def fan_out(cluster: ClusterLike, *, n: int = 40, queue: str = QUEUE, timeout: float = 30) -> Measurement:
    """Send ``n`` :func:`where` tasks at once; count how many each (worker, pid) ran.

    Values: tasks per process that ran any (their sum is the tasks completed);
    ``meta["processes"]`` is how many OS processes took part.
    """
    task = cluster.task(where)
    pending = [task.apply_async(queue=queue) for _ in range(n)]
    ran_on = collections.Counter((r["worker"], r["pid"]) for r in (p.get(timeout=timeout) for p in pending))
    return Measurement("fan-out", "tasks run per pool process", "tasks",
                       [count for _, count in ran_on.most_common()], stat="sum",
                       meta={"tasks": n, "queue": queue, "processes": len(ran_on),
                             "by_process": {f"{w} pid {pid}": k for (w, pid), k in sorted(ran_on.items())}})


@claim("every fan-out task completed, and more than one OS process ran them")
def fan_out_spreads_over_processes(m: Measurement) -> None:
    verify("every fan-out task completed", m.value == m.meta["tasks"], completed=m.value, sent=m.meta["tasks"])
    verify("more than one OS process ran the fan-out", m.meta["processes"] >= 2, processes=m.meta["processes"])


# ----------------------------------------------------------------------------- latency


def local_calls(*, n: int = 30, calls: int = 10_000) -> Measurement:
    """``n`` samples of one plain call to ``add(2, 3)`` (no broker), in seconds.

    One call lasts about as long as reading the clock, so each sample times a
    batch of ``calls`` calls and divides by ``calls``.
    """
    call = add.run  # the task's plain function (looked up once: `add` is a lazy proxy)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(calls):
            call(2, 3)
        samples.append((time.perf_counter() - t0) / calls)
    return Measurement("local call", "latency", "s", samples, meta={"n": n, "calls_per_sample": calls})


def round_trips(cluster: ClusterLike, *, n: int = 30, timeout: float = 30) -> Measurement:
    """``n`` round trips of ``add.delay(2, 3).get()``: kernel -> Redis -> worker -> child -> Redis -> kernel."""
    task = cluster.task(add)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        task.delay(2, 3).get(timeout=timeout)
        samples.append(time.perf_counter() - t0)
    return Measurement("task round trip", "latency", "s", samples, meta={"n": n})


def compare_latency(cluster: ClusterLike, *, n: int = 30) -> Comparison:
    """The same call as a task and as a function, ``n`` samples each."""
    return Comparison(round_trips(cluster, n=n), local_calls(n=n), better="lower", title="one call to add(2, 3)")


@claim("a task round trip costs at least 100x a local call")
def a_round_trip_costs_many_calls(latency: Comparison) -> None:
    latency.check(factor=100)  # typically tens of thousands


# ----------------------------------------------------------------------------- a worker dies


def _copies_in_redis(cluster: ClusterLike, task_id: str, queue: str = QUEUE) -> dict[str, int]:
    """Where a task's message is in Redis: waiting in ``queue``, or in kombu's ``unacked`` hash.

    The Redis transport moves a message it hands to a worker from the queue
    (a list) into ``unacked`` (a hash), and deletes it there on ack. A message
    in ``unacked`` whose worker died is restored to its queue after the
    visibility timeout (one hour by default); one in neither is gone.
    """
    r = cluster.redis_client()
    try:
        waiting = sum(json.loads(raw)["headers"]["id"] == task_id for raw in r.lrange(queue, 0, -1))
        unacked = sum(json.loads(raw)[0]["headers"]["id"] == task_id for raw in r.hvals("unacked"))
    finally:
        r.close()
    return {"queue": waiting, "unacked": unacked}


def kill_mid_task(cluster: LocalCluster, *, seconds: float = 2.0, acks_late: bool = False,
                  timeout: float = 30) -> Measurement:
    """Start a task that sleeps ``seconds``, SIGKILL its worker while it runs, wait ``2 x seconds``.

    The value is how many copies of the task's message are left in Redis
    after the kill (queue + ``unacked``); ``meta`` has what the caller saw
    (``outcome``: ``TimeoutError`` or ``finished``), the task's ``state``
    afterwards, the ``victim`` worker (not restarted here) and the copies
    while the task was running. ``acks_late=True`` runs the same task with
    late acknowledgement (lesson 10's first step).
    """
    task = cluster.task(slow_acks_late if acks_late else slow)
    r = task.delay(seconds)
    poll_until(lambda: r.state == "STARTED", timeout, what=f"task {r.id} to start on a worker")
    victim = short_name(r.info["hostname"])
    # the worker's main process acknowledges once its pool child has accepted the task; give it
    # a moment (well within the task's sleep) so that "while running" is after that point
    gone = poll_until(lambda: not any(_copies_in_redis(cluster, r.id).values()), seconds / 2)
    while_running = _copies_in_redis(cluster, r.id)
    cluster.kill(victim)  # SIGKILL: the worker and its pool children
    t0 = time.perf_counter()
    try:
        r.get(timeout=2 * seconds)
        outcome = "finished"
    except Exception as exc:  # celery.exceptions.TimeoutError is what we expect
        outcome = type(exc).__name__
    waited = time.perf_counter() - t0
    after = _copies_in_redis(cluster, r.id)
    state = r.state
    r.forget()  # stop waiting for it: the app would keep it pending (and subscribed) until it closes
    label = "acks_late" if acks_late else "default (early ack)"
    return Measurement(label, "copies of the message left in Redis", "messages", [sum(after.values())],
                       stat="sum", meta={"task_id": r.id, "victim": victim, "seconds": seconds,
                                         "acks_late": acks_late, "outcome": outcome, "state": state,
                                         "waited_s": waited, "acked_while_running": bool(gone),
                                         "while_running": while_running, "after_kill": after})


@claim("a task whose worker was killed never finishes for the caller, and its message is gone")
def a_killed_workers_task_is_lost(m: Measurement) -> None:
    meta = m.meta
    verify("the caller's get() timed out", meta["outcome"] == "TimeoutError", outcome=meta["outcome"])
    verify("the task's state still says STARTED", meta["state"] == "STARTED", state=meta["state"])
    verify("no copy of the message is left in Redis (acknowledged when the task started)",
           m.value == 0, **{f"in {k}": v for k, v in meta["after_kill"].items()})


# ----------------------------------------------------------------------------- the exercise


def makespan(cluster: ClusterLike, *, n: int = 8, seconds: float = 0.5, timeout: float = 60) -> Measurement:
    """Send ``n`` :func:`slow` tasks at once; seconds until the last is done.

    ``meta["by_worker"]`` counts the tasks each worker ran.
    """
    task = cluster.task(slow)
    t0 = time.perf_counter()
    pending = [task.delay(seconds) for _ in range(n)]
    done = [p.get(timeout=timeout) for p in pending]
    elapsed = time.perf_counter() - t0
    by_worker = collections.Counter(d["worker"] for d in done)
    return Measurement(f"{n} x slow({seconds:g})", "makespan", "s", [elapsed],
                       meta={"n": n, "seconds": seconds, "by_worker": dict(sorted(by_worker.items()))})


@claim("after add_worker, the same batch is shared by more workers")
def more_workers_share_the_batch(before: Measurement, after: Measurement) -> None:
    verify("more workers ran the batch after add_worker", len(after.meta["by_worker"]) > len(before.meta["by_worker"]),
           before=str(before.meta["by_worker"]), after=str(after.meta["by_worker"]))
