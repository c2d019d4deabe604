"""Lesson 12: limiting jobs with a distributed semaphore.

A client lets us make at most ``leases`` requests to their server at once.
Our tasks run on many workers, so a per-process limit is not enough: the
limit must be shared. ZooKeeper's semaphore recipe (kazoo ``Semaphore``)
does that: each holder owns an ephemeral child of the semaphore node, and a
newcomer may add a child only while there are fewer than ``max_leases``.

What this module measures, with a :class:`~labkit.lessons._probe.ProbeServer`
standing in for the client's server (it counts in-flight requests itself):

* ``unprotected``: every task calls at once (the pitfall);
* ``blocking``: ``with Semaphore(max_leases=3):`` (the fix);
* ``nonblocking``: the 2014 talk's ``acquire(blocking=False)`` + ``retry()``.
  kazoo's semaphore first takes an internal *lock* before looking at the
  leases; non-blocking, that lock fails for everyone but the first in line,
  so attempts fail even while leases are free, and each failure costs a
  retry;
* ``timeout``: ``acquire(timeout=...)`` plus a jittered retry;
* ``queue``: no semaphore at all, a dedicated queue whose worker concurrency
  equals the limit.

Attempts and failures are counted in Redis by the tasks (``INCR``), failures
are stamped with the number of leases ZooKeeper showed in use right after.

Every thread of a worker process shares that process's one kazoo client, so
one ZooKeeper session: the leases its threads hold are all ephemeral nodes of
that session (the blocking form records the session id of every holder).
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
import uuid
from typing import TYPE_CHECKING, Any

from celery import shared_task

from labkit.app import redis_client, worker_name, zk_client
from labkit.client import ClusterLike
from labkit.lessons._probe import ProbeServer
from labkit.measure import Comparison, Measurement, claim, verify
from labkit.poll import poll_until
from labkit.table import Table

if TYPE_CHECKING:  # pragma: no cover
    from labkit.cluster import LocalCluster

NOTEBOOK = "12_semaphore.ipynb"

MODES = ("unprotected", "blocking", "nonblocking", "timeout", "queue")
LABELS = {
    "unprotected": "before: unprotected",
    "blocking": "after: Semaphore(max_leases={leases})",
    "nonblocking": "talk: non-blocking + retry",
    "timeout": "fix: timeout + jittered retry",
    "queue": "fix: dedicated queue",
}
QUEUE = "client"  # the dedicated queue; its worker's concurrency is the limit
LIMITED_WORKER = "limited"
HOST_THREADS = 12  # callers per "host" worker


def cluster_config(leases: int = 3) -> dict[str, Any]:
    """Two "host" workers (threads pool, 12 callers each) and ``limited``, whose thread count is the limit.

    Threads because the callers are I/O-bound (HTTP and ZooKeeper): 24 truly
    concurrent callers without 24 processes. ``task_acks_late`` with prefetch
    multiplier 1: a worker never holds more tasks than it has free threads.
    """
    host = {"pool": "threads", "concurrency": HOST_THREADS, "prefetch_multiplier": 1}
    return {
        "workers": [{"name": "h1", **host}, {"name": "h2", **host},
                    {"name": LIMITED_WORKER, "queues": [QUEUE], "pool": "threads", "concurrency": leases,
                     "prefetch_multiplier": 1}],
        "zookeeper": 1,
        "settings": {"task_acks_late": True},
    }


CLUSTER = cluster_config()
WORKSHOP = {"N": 24, "LEASES": 4, "HOLD": 0.3}


# ----------------------------------------------------------------------------- the call
def call_client(url: str, tag: str, hold: float, attempt: int = 0) -> int:
    """One request to the client's server; it takes ``hold`` seconds to answer."""
    query = f"tag={tag}&attempt={attempt}&hold={hold}"
    with urllib.request.urlopen(f"{url}/call?{query}", timeout=60) as response:
        return response.status


def _record(run: str, tag: str, attempt: int, ok: bool, path: str) -> None:
    """Count one acquire attempt in Redis; a failure notes how many leases were in use."""
    r = redis_client()
    r.incr(f"{run}:attempts")
    if ok:
        return
    in_use = len(zk_client().get_children(path))
    r.incr(f"{run}:failed")
    r.rpush(f"{run}:failures", json.dumps({"t": time.time(), "tag": tag, "attempt": attempt, "in_use": in_use}))


# ----------------------------------------------------------------------------- tasks
@shared_task(name="semaphore.unprotected")
def unprotected(url: str, tag: str, hold: float) -> int:
    """The pitfall: nothing limits how many of us call at once."""
    return call_client(url, tag, hold)


@shared_task(name="semaphore.blocking")
def blocking(url: str, tag: str, hold: float, path: str, leases: int) -> int:
    """The fix: wait for one of ``leases`` leases, call, give the lease back."""
    semaphore = zk_client().Semaphore(path, identifier=tag, max_leases=leases)
    with semaphore:  # acquire() blocks until a lease is free; release() on exit
        _note_session(path)
        return call_client(url, tag, hold)


def _note_session(path: str) -> None:
    """Record which worker, thread and ZooKeeper session holds a lease (for the notebook)."""
    session = zk_client().client_id[0]  # the session that owns this process's ephemeral nodes
    redis_client().rpush(f"sessions:{path}", f"{worker_name()}|{threading.current_thread().name}|{session:#x}")


@shared_task(bind=True, name="semaphore.nonblocking", max_retries=None)
def nonblocking(self, url: str, tag: str, hold: float, path: str, leases: int,
                run: str, retry_delay: float, jitter: bool = False) -> int:
    """The talk's recipe: try once without waiting; no lease -> retry later."""
    semaphore = zk_client().Semaphore(path, identifier=tag, max_leases=leases)
    got = semaphore.acquire(blocking=False)
    _record(run, tag, self.request.retries, got, path)
    if not got:
        countdown = random.uniform(0, 2 * retry_delay) if jitter else retry_delay
        raise self.retry(countdown=countdown)
    try:
        return call_client(url, tag, hold, self.request.retries)
    finally:
        semaphore.release()


@shared_task(bind=True, name="semaphore.timeout", max_retries=None)
def with_timeout(self, url: str, tag: str, hold: float, path: str, leases: int,
                 run: str, retry_delay: float, wait: float) -> int:
    """Better: wait up to ``wait`` seconds for a lease; only then retry, with jitter."""
    from kazoo.exceptions import LockTimeout  # noqa: PLC0415

    semaphore = zk_client().Semaphore(path, identifier=tag, max_leases=leases)
    try:
        got = semaphore.acquire(timeout=wait)
    except LockTimeout:  # kazoo raises instead of returning False
        got = False
    _record(run, tag, self.request.retries, got, path)
    if not got:
        raise self.retry(countdown=random.uniform(0, 2 * retry_delay))
    try:
        return call_client(url, tag, hold, self.request.retries)
    finally:
        semaphore.release()


@shared_task(name="semaphore.first_try")
def first_try_task(run: str, path: str, leases: int, form: str, wait: float) -> bool:
    """Wait for the starting gun, try once for a lease, keep it until everyone has tried."""
    from kazoo.exceptions import LockTimeout  # noqa: PLC0415

    r = redis_client()
    semaphore = zk_client().Semaphore(path, max_leases=leases)
    r.incr(f"{run}:ready")
    r.blpop(f"{run}:go", timeout=30)  # every caller is released by the same RPUSH
    try:
        got = semaphore.acquire(blocking=False) if form == "nonblocking" else semaphore.acquire(timeout=wait)
    except LockTimeout:
        got = False
    r.rpush(f"{run}:tried", int(got))
    r.blpop(f"{run}:done", timeout=30)  # hold the lease: nobody frees one during the test
    if got:
        semaphore.release()
    return got


# ----------------------------------------------------------------------------- experiments
def ensure_limited_worker(cluster: LocalCluster, concurrency: int = 3) -> None:
    """Make the dedicated queue's total concurrency equal ``concurrency`` (restart if needed)."""
    worker = cluster.workers.get(LIMITED_WORKER)
    if worker is not None and worker.spec.concurrency == concurrency and worker.alive():
        return
    if worker is not None:
        cluster.remove_worker(LIMITED_WORKER)
    cluster.add_worker(LIMITED_WORKER, queues=[QUEUE], pool="threads", concurrency=concurrency,
                       prefetch_multiplier=1)


def run(cluster: LocalCluster, mode: str = "blocking", *, n: int = 12, leases: int = 3, hold: float = 0.4,
        wait: float = 1.0, retry_delay: float = 0.25, jitter: bool = False,
        label: str | None = None, deadline: float = 60.0) -> Measurement:
    """Send ``n`` tasks that each make one ``hold``-second call, limited by ``mode``.

    Returns the peak in-flight requests seen by the server, with the in-flight
    timeline, and in ``meta``: attempts, failed attempts, failures while
    leases were free, first-try successes, makespan and completed calls.
    Mode ``"queue"`` (re)starts the ``limited`` worker if its thread count is
    not ``leases``.
    """
    if mode == "queue":
        ensure_limited_worker(cluster, leases)
    return _run(cluster, mode, n=n, leases=leases, hold=hold, wait=wait, retry_delay=retry_delay,
                jitter=jitter, label=label, deadline=deadline)


def _run(cluster: ClusterLike, mode: str, *, n: int, leases: int, hold: float, wait: float = 1.0,
         retry_delay: float = 0.25, jitter: bool = False, label: str | None = None,
         deadline: float = 60.0) -> Measurement:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    run_id = f"sem:{uuid.uuid4().hex[:8]}"
    path = f"/labkit/semaphore/{run_id[4:]}"
    r = cluster.redis_client()
    with ProbeServer() as probe:
        t0 = time.time()
        results = []
        for i in range(n):
            tag = f"t{i:02d}"
            if mode == "unprotected":
                res = cluster.task(unprotected).delay(probe.url, tag, hold)
            elif mode == "queue":
                res = cluster.task(unprotected).apply_async((probe.url, tag, hold), queue=QUEUE)
            elif mode == "blocking":
                res = cluster.task(blocking).delay(probe.url, tag, hold, path, leases)
            elif mode == "nonblocking":
                res = cluster.task(nonblocking).delay(probe.url, tag, hold, path, leases,
                                                      run_id, retry_delay, jitter)
            else:
                res = cluster.task(with_timeout).delay(probe.url, tag, hold, path, leases,
                                                       run_id, retry_delay, wait)
            results.append(res)
        for res in results:
            res.get(timeout=max(1.0, deadline - (time.time() - t0)))
        calls = probe.snapshot()
        timeline = probe.timeline(t0)
        peak = probe.peak
    failures = [json.loads(x) for x in r.lrange(f"{run_id}:failures", 0, -1)]
    counted = r.get(f"{run_id}:attempts")  # only the retrying forms count; the others try once
    attempts = int(counted) if counted is not None else n
    holders = [x.decode().split("|") for x in r.lrange(f"sessions:{path}", 0, -1)]
    r.delete(f"{run_id}:attempts", f"{run_id}:failed", f"{run_id}:failures", f"sessions:{path}")
    r.close()
    sessions: dict[str, dict[str, Any]] = {}
    for worker, thread, session in holders:
        entry = sessions.setdefault(worker, {"threads": set(), "sessions": set()})
        entry["threads"].add(thread)
        entry["sessions"].add(session)
    first_try_failed = {f["tag"] for f in failures if f["attempt"] == 0}
    meta = {
        "mode": mode, "n": n, "leases": leases, "hold": hold,
        "completed": len({c.tag for c in calls if c.status == 200}),
        "attempts": attempts,
        "failed": len(failures),
        "failed_while_free": sum(1 for f in failures if f["in_use"] < leases),
        "first_try_ok": n - len(first_try_failed),
        "failure_times": [f["t"] - t0 for f in failures],
        "makespan": max(c.end for c in calls) - t0,
        "sessions": {w: {"threads": len(e["threads"]), "sessions": sorted(e["sessions"])}
                     for w, e in sorted(sessions.items())},
    }
    return Measurement(label or LABELS[mode].format(leases=leases), "peak in-flight requests", "requests", [peak],
                       stat="max", timeline=timeline, meta=meta)


def first_try(cluster: ClusterLike, form: str = "nonblocking", *, n: int = 12, leases: int = 3,
              wait: float = 0.5, trials: int = 7, label: str | None = None) -> Measurement:
    """``n`` callers try for one of ``leases`` free leases at the same instant; how many get one?

    Nobody releases a lease until every caller has tried, so while fewer than
    ``leases`` are granted there is a free lease at every failure. A correct
    non-blocking semaphore would grant ``min(n, leases)``.
    """
    granted = []
    r = cluster.redis_client()
    for _ in range(trials):
        run_id = f"sem1:{uuid.uuid4().hex[:8]}"
        path = f"/labkit/semaphore/{run_id[5:]}"
        results = [cluster.task(first_try_task).delay(run_id, path, leases, form, wait) for _ in range(n)]
        poll_until(lambda: int(r.get(f"{run_id}:ready") or 0) >= n, 30, 0.01,  # noqa: B023
                   what=f"{n} callers to be ready for the starting gun")
        time.sleep(0.05)  # the last one to say "ready" is now blocked on the gun
        r.rpush(f"{run_id}:go", *[1] * n)
        poll_until(lambda: r.llen(f"{run_id}:tried") >= n, 30, 0.01,  # noqa: B023
                   what=f"{n} callers to try for a lease")
        r.rpush(f"{run_id}:done", *[1] * n)
        granted.append(sum(bool(res.get(timeout=30)) for res in results))
        r.delete(f"{run_id}:ready", f"{run_id}:go", f"{run_id}:tried", f"{run_id}:done")
    r.close()
    default = {"nonblocking": "talk: acquire(blocking=False)", "timeout": f"fix: acquire(timeout={wait})"}
    return Measurement(label or default[form], "leases granted on the first try", "leases", granted,
                       stat="median", meta={"form": form, "n": n, "leases": leases, "trials": trials})


def before(cluster: ClusterLike, *, n: int = 12, leases: int = 3, hold: float = 0.4) -> Measurement:
    """The pitfall: ``n`` tasks call the client's server with no limit."""
    return _run(cluster, "unprotected", n=n, leases=leases, hold=hold)


def after(cluster: ClusterLike, *, n: int = 12, leases: int = 3, hold: float = 0.4) -> Measurement:
    """The fix: each call inside ``with Semaphore(max_leases=leases)``."""
    return _run(cluster, "blocking", n=n, leases=leases, hold=hold)


def compare(cluster: ClusterLike, *, n: int = 12, leases: int = 3, hold: float = 0.4) -> Comparison:
    """Peak in-flight requests, unprotected vs behind the semaphore."""
    return Comparison(before(cluster, n=n, leases=leases, hold=hold), after(cluster, n=n, leases=leases, hold=hold),
                      better="lower", title="peak in-flight requests at the client's server")


def retry_forms(cluster: LocalCluster, *, n: int = 12, leases: int = 3, hold: float = 0.4, wait: float = 1.0,
                retry_delay: float = 0.25) -> dict[str, Measurement]:
    """The talk's non-blocking acquire + retry next to the two better forms."""
    return {mode: run(cluster, mode, n=n, leases=leases, hold=hold, wait=wait, retry_delay=retry_delay)
            for mode in ("nonblocking", "timeout", "queue")}


# ----------------------------------------------------------------------------- claims
@claim("behind Semaphore(max_leases) the client never sees more than its limit; unprotected, twice or more")
def semaphore_caps_the_client(comparison: Comparison) -> None:
    """Before: peak >= 2 x leases (needs n >= 2 x leases); after: peak <= leases, every call done."""
    b, a = comparison.before, comparison.after
    leases, n = a.meta["leases"], a.meta["n"]
    verify(f"unprotected, the client sees at least twice its limit of {leases}",
           n >= 2 * leases and b.value >= 2 * leases, peak=b.value, limit=leases, n=n)
    verify(f"behind the semaphore the client never sees more than {leases}, and all {n} calls complete",
           a.value <= leases and a.meta["completed"] == n, peak=a.value, completed=a.meta["completed"])


@claim("acquire(blocking=False) grants fewer leases than are free when callers arrive together")
def nonblocking_leaves_free_leases(talk: Measurement, fixed: Measurement) -> None:
    """Median over trials: the talk's form grants < leases; acquire(timeout=...) grants all of them."""
    leases, n = talk.meta["leases"], talk.meta["n"]
    verify("more callers than leases", n > leases, n=n, leases=leases)
    verify("the talk's non-blocking acquire leaves leases unused although callers wanted them",
           talk.value < leases, granted_median=talk.value, trials=talk.values, leases=leases)
    verify("acquire with a timeout grants every free lease", fixed.value == leases,
           granted_median=fixed.value, trials=fixed.values, leases=leases)


@claim("every limited form keeps the client at or below the limit and completes every call")
def limited_forms_hold_the_limit(forms: dict[str, Measurement]) -> None:
    for m in forms.values():
        leases, n = m.meta["leases"], m.meta["n"]
        verify(f"{m.label}: never more than {leases} in flight, all {n} calls done",
               m.value <= leases and m.meta["completed"] == n, peak=m.value, completed=m.meta["completed"])


@claim("a timeout plus a jittered retry wastes fewer attempts than the talk's non-blocking acquire + retry")
def timeout_wastes_fewer_attempts(talk: Measurement, fixed: Measurement) -> None:
    n, leases = talk.meta["n"], talk.meta["leases"]
    verify("the talk's form fails at least once per caller that found no lease at first",
           talk.meta["failed"] >= n - leases, failed=talk.meta["failed"], n=n, leases=leases)
    verify("the timeout form fails fewer acquires", fixed.meta["failed"] < talk.meta["failed"],
           timeout_failed=fixed.meta["failed"], talk_failed=talk.meta["failed"])


def table(measurements: list[Measurement]) -> Table:
    """What each run cost: peak, calls done, attempts, failures (with a free lease), makespan."""
    return Table(
        ["run", "peak", "done", "attempts", "failed", "failed w/ free lease", "makespan s"],
        [[m.label, m.value, m.meta["completed"], m.meta["attempts"], m.meta["failed"],
          m.meta["failed_while_free"], round(m.meta["makespan"], 2)] for m in measurements],
    )


def sessions_table(m: Measurement) -> Table:
    """Which ZooKeeper session held the leases of each worker's threads (from a blocking run)."""
    return Table(["worker", "threads that held a lease", "ZooKeeper sessions"],
                 [[w, e["threads"], ", ".join(e["sessions"])] for w, e in m.meta["sessions"].items()],
                 title=f"{m.label}: lease holders by worker")


# ----------------------------------------------------------------------------- plots
def plot_timelines(measurements: list[Measurement], limit: int | None = None):
    """One panel per run: requests in flight at the server over time; ticks mark failed acquires."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from labkit.plots import colour_for, timelines  # noqa: PLC0415

    fig, axes = plt.subplots(len(measurements), 1, figsize=(9, 1.9 * len(measurements)),
                             sharex=True, sharey=True, layout="constrained", squeeze=False)
    top = max(m.value for m in measurements)
    for i, (ax, m) in enumerate(zip(axes[:, 0], measurements, strict=True)):
        timelines([m], ax=ax, limit=limit, title=f"{m.label}: peak {int(m.value)}, "
                  f"makespan {m.meta['makespan']:.1f} s, failed acquires {m.meta['failed']}",
                  xlabel="seconds since the tasks were sent" if i == len(measurements) - 1 else "")
        ax.set_ylabel("in flight")
        fails = m.meta.get("failure_times") or []
        if fails:
            ax.plot(fails, [-0.04 * top] * len(fails), "|", color=colour_for(m.label, i), ms=10,
                    alpha=0.8, label="failed acquire")
            ax.legend(frameon=False, fontsize=8, loc="upper right")
        ax.set_ylim(-0.1 * top, top * 1.15)
    return fig


def plot_costs(measurements: list[Measurement]):
    """Failed acquire attempts and makespan, one bar per run."""
    from labkit.plots import bars, panels  # noqa: PLC0415

    fig, (ax1, ax2) = panels(2, width=5.5)
    failed = [Measurement(m.label, "failed acquire attempts", "attempts", [m.meta["failed"]])
              for m in measurements]
    span = [Measurement(m.label, "makespan", "s", [m.meta["makespan"]]) for m in measurements]
    bars(failed, ax1, title="wasted attempts (failed acquires)").set_ylabel("failed acquires")
    bars(span, ax2, title="makespan: first send to last call done").set_ylabel("seconds")
    return fig
