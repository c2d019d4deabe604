"""Lesson 09: abusive tasks — time limits, memory hogs, and programs you call.

The talk (slides 77–87): not all tasks are created equal. Some call outside
your environment, some eat memory, some never finish. Watch their memory,
read their output incrementally, give them their own queue, and use soft and
hard time limits: "soft timeout lets you clean up afterwards; hard timeout
kills without remorse". This module measures each of those on real workers.

Time limits (prefork worker ``limits``):

* :func:`run_jobs` — the slide's ``run_job`` ported to Celery 5
  (``celery.task.current`` is gone: ``bind=True`` and ``self.retry()``): a
  job that never finishes in time hits its soft limit, cleans up, retries,
  and after ``max_retries`` ends with ``MaxRetriesExceededError`` — which
  the slide's sibling ``except MaxRetriesExceededError`` never catches (it
  is raised *inside* the other ``except`` clause). The fix nests it.
* :func:`hard_limit` — the hard limit: billiard sends the child SIGTERM,
  waits 0.1 s, then SIGKILL. A clean-up that takes longer never finishes.
* :func:`pools` — the same stubborn task on the prefork, solo and threads
  pools: only prefork enforces either limit.

Memory (workers ``shared``, ``hogs``, ``shorts``):

* :func:`neighbours` — a memory hog in the short tasks' queue vs its own.
* :func:`runaway` — ``worker_max_memory_per_child`` checks a child's peak
  RSS only after a task returns; an address-space cap
  (``RLIMIT_AS``, set in ``worker_process_init`` on worker ``hogs``) turns
  a runaway into a ``MemoryError`` the task can handle.

Calling outside your environment:

* :func:`compare_output_reading` — ``check_output`` holds the whole output;
  iterating ``proc.stdout`` stays flat (peak RSS in a fresh interpreter).
* :func:`hanging` — a program that hangs: the soft limit ends the task, not
  the program (nor its children); the fix kills the program's process group.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import shared_task
from celery.exceptions import MaxRetriesExceededError, SoftTimeLimitExceeded
from celery.signals import worker_process_init

from labkit.app import redis_client, worker_name
from labkit.lessons._records import collect, plot_gantt, record, summary
from labkit.measure import Comparison, Measurement, claim, verify

if TYPE_CHECKING:  # pragma: no cover - annotations only; workers import this module
    from labkit.client import ClusterLike
    from labkit.cluster import LocalCluster
    from labkit.table import Table

NOTEBOOK = "09_abusive_tasks.ipynb"

MIB = 1 << 20
LIMIT_MIB = 100  # worker_max_memory_per_child of worker "shared" (the setting is in KiB)
CAP_MIB = 200  # address space a "hogs" child may add to what it had at start (RLIMIT_AS)
CAP_ENV = "LABKIT_RLIMIT_AS_MIB"  # a worker whose environment sets this caps each pool child
MAX_HOG_MIB = 1024  # no hog in this lesson may ask for more, whatever its parameters say
RETRY_DELAY = 0.2  # run_job's default_retry_delay: Celery's default is 180 s

CLUSTER: dict[str, Any] = {
    "workers": [
        {"name": "limits", "queues": ["limits"], "concurrency": 2},           # prefork: limits work
        {"name": "solo", "queues": ["solo"], "pool": "solo"},                  # no limits at all
        {"name": "threads", "queues": ["threads"], "pool": "threads", "concurrency": 2},
        {"name": "shared", "queues": ["celery"], "concurrency": 2,            # hogs and short tasks together
         "max_memory_per_child": LIMIT_MIB * 1024},
        {"name": "hogs", "queues": ["hogs"], "concurrency": 1, "env": {CAP_ENV: str(CAP_MIB)}},
        {"name": "shorts", "queues": ["shorts"], "concurrency": 1},
    ],
    "zookeeper": 0,
}
WORKSHOP = {"HOG_MIB": 180, "RUNAWAY_MIB": 600, "OUTPUT_MB": 80, "SHORTS": 24}


# ============================================================================ the address-space cap
def _vm_size() -> int:
    """This process's address-space size in bytes (``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@worker_process_init.connect
def _cap_address_space(**_: Any) -> None:
    """In a pool child of a worker started with ``LABKIT_RLIMIT_AS_MIB``: cap its address space.

    The cap is what the child has mapped right after start plus that many
    MiB, so the figure is headroom for tasks, not a guess at the size of
    Python. An allocation past it fails with ``MemoryError`` in the task.
    """
    headroom = os.environ.get(CAP_ENV)
    if not headroom:
        return
    import resource  # noqa: PLC0415

    limit = _vm_size() + int(float(headroom) * MIB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ["LABKIT_RLIMIT_AS_BYTES"] = str(limit)


# ============================================================================ the talk's run_job
class AbusiveJob:
    """Stands in for the slide's job: it builds, then runs far longer than it is allowed to."""

    def __init__(self, run: str, job_id: str, attempt: int) -> None:
        self.run_id, self.job_id, self.attempt = run, job_id, attempt
        self.started = time.time()

    def build(self) -> None:
        """Prepare (here: nothing)."""

    def run(self, seconds: float) -> None:
        """The work: longer than the soft limit, every time."""
        time.sleep(seconds)

    def clean_up(self) -> None:
        """Undo what a half-finished run left behind; note the attempt and how long it ran."""
        note = {"job": self.job_id, "attempt": self.attempt, "start": self.started, "end": time.time()}
        redis_client().rpush(f"{self.run_id}:attempts", json.dumps(note))


def send_email(run: str, text: str) -> None:
    """The slide's ``send_email``: here, a Redis list an experiment reads."""
    redis_client().rpush(f"{run}:emails", text)


@shared_task(bind=True, name="abusive_tasks.run_job", default_retry_delay=RETRY_DELAY)
def run_job(self, run: str, job_id: str, seconds: float) -> None:
    """The slide's ``run_job`` in Celery 5 (``bind=True``, ``self.retry()``), with a clean-up."""
    job = AbusiveJob(run, job_id, self.request.retries)
    try:
        job.build()
        job.run(seconds)
    except SoftTimeLimitExceeded:
        job.clean_up()
        raise self.retry()  # noqa: B904 - as on the slide
    except MaxRetriesExceededError:  # never reached: retry() raised inside the clause above
        send_email(run, f"AbusiveJob {job_id} failed")


@shared_task(bind=True, name="abusive_tasks.run_job_fixed", default_retry_delay=RETRY_DELAY)
def run_job_fixed(self, run: str, job_id: str, seconds: float) -> None:
    """The fix: catch ``MaxRetriesExceededError`` around ``self.retry()``, where it is raised."""
    job = AbusiveJob(run, job_id, self.request.retries)
    try:
        job.build()
        job.run(seconds)
    except SoftTimeLimitExceeded:
        job.clean_up()
        try:
            raise self.retry()  # noqa: B904
        except MaxRetriesExceededError:
            send_email(run, f"AbusiveJob {job_id} failed")
            raise


def _outcome(result: Any, timeout: float) -> tuple[str, str]:
    """(state, exception class name or '') of a finished AsyncResult."""
    result.get(timeout=timeout, propagate=False)
    value = result.result
    return result.state, type(value).__name__ if isinstance(value, BaseException) else ""


def run_jobs(cluster: ClusterLike, *, soft: float = 0.5, seconds: float = 5.0) -> dict[str, Measurement]:
    """Send the slide's ``run_job`` and the fixed one, each with ``soft_time_limit=soft``.

    Both jobs always overrun. Returns ``{"talk": ..., "fixed": ...}``: values
    are each attempt's duration (start to clean-up); ``meta`` has the
    attempts, the notification e-mails sent, the final state and exception.
    """
    out = {}
    pending = {}
    t0 = time.time()
    for form, task in (("talk", run_job), ("fixed", run_job_fixed)):
        run = f"a9j:{uuid.uuid4().hex[:8]}"
        res = cluster.task(task).apply_async((run, f"job-{form}", seconds), queue="limits", soft_time_limit=soft)
        pending[form] = (run, res)
    r = cluster.redis_client()
    max_retries = run_job.max_retries
    for form, (run, res) in pending.items():
        state, exc = _outcome(res, 30 + (max_retries + 1) * (soft + RETRY_DELAY) * 3)
        attempts = [json.loads(x) for x in r.lrange(f"{run}:attempts", 0, -1)]
        emails = [x.decode() for x in r.lrange(f"{run}:emails", 0, -1)]
        r.delete(f"{run}:attempts", f"{run}:emails")
        attempts.sort(key=lambda a: a["attempt"])
        durations = [a["end"] - a["start"] for a in attempts]
        label = "talk: except clauses side by side" if form == "talk" else "fix: except around self.retry()"
        out[form] = Measurement(label, "attempt duration", "s", durations, stat="median", meta={
            "form": form, "soft": soft, "seconds": seconds, "max_retries": max_retries,
            "attempts": len(attempts), "cleaned_up": len(attempts), "emails": len(emails),
            "state": state, "exception": exc, "retry_delay": RETRY_DELAY,
            "spans": [(a["start"] - t0, a["end"] - t0) for a in attempts]})
    r.close()
    return out


# ============================================================================ hard limit
@shared_task(bind=True, name="abusive_tasks.stubborn")
def stubborn(self, run: str, tag: str, seconds: float, cleanup_s: float, marker: str) -> dict[str, Any]:
    """Overrun; on the way out (``finally``) write a marker, take ``cleanup_s`` to clean up, mark it done."""
    redis_client().hset(f"{run}:pid", tag, os.getpid())
    start = time.time()
    try:
        time.sleep(seconds)
    finally:
        with open(marker, "a") as fh:
            fh.write("clean-up started\n")
        time.sleep(cleanup_s)  # e.g. flushing partial results somewhere
        with open(marker, "a") as fh:
            fh.write("clean-up finished\n")
    return {"ran": time.time() - start}


def hard_limit(cluster: LocalCluster, *, hard: float = 0.6, seconds: float = 3.0,
               cleanups: Sequence[float] = (0.0, 0.5), worker: str = "limits") -> list[Measurement]:
    """Run :func:`stubborn` with ``time_limit=hard`` once per clean-up duration in ``cleanups``.

    One Measurement per run: value = seconds until the caller saw the
    result; ``meta``: state, exception, the child's pid and whether it still
    exists, what the marker file says, and how long the pool took to be
    whole again (``replaced_s``).
    """

    from labkit.poll import poll_until  # noqa: PLC0415

    queue = cluster.workers[worker].spec.queues[0]
    size = len(cluster.children(worker))
    out = []
    r = cluster.redis_client()
    for cleanup_s in cleanups:
        run = f"a9h:{uuid.uuid4().hex[:8]}"
        marker = cluster.run_dir / f"{run.replace(':', '-')}.marker"
        before = set(cluster.children(worker))
        t0 = time.time()
        res = cluster.task(stubborn).apply_async((run, "h", seconds, cleanup_s, str(marker)), queue=queue,
                                                 time_limit=hard)
        state, exc = _outcome(res, 30 + seconds)
        seen = time.time() - t0
        pid = int(r.hget(f"{run}:pid", "h") or 0)
        r.delete(f"{run}:pid")
        def whole(pid: int = pid) -> bool:
            kids = cluster.children(worker)
            return len(kids) >= size and pid not in kids

        whole = poll_until(whole, 30, 0.02)
        replaced = time.time() - t0 - seen if whole else math.nan
        time.sleep(max(0.0, cleanup_s + 0.2 - (time.time() - t0 - hard)))  # give a clean-up every chance to end
        text = marker.read_text() if marker.exists() else ""
        marker.unlink(missing_ok=True)
        after = set(cluster.children(worker))
        out.append(Measurement(f"hard limit {hard:g} s, clean-up {cleanup_s:g} s", "result seen after", "s", [seen],
                               meta={"hard": hard, "seconds": seconds, "cleanup_s": cleanup_s, "state": state,
                                     "exception": exc, "pid": pid, "pid_alive": _alive(pid),
                                     "new_children": sorted(after - before), "replaced_s": replaced,
                                     "cleanup_started": "started" in text, "cleanup_finished": "finished" in text}))
    r.close()
    return out


def _alive(pid: int) -> bool:
    """Is ``pid`` a live process (not gone, not a zombie)?"""
    import psutil  # noqa: PLC0415

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ============================================================================ pools
@shared_task(bind=True, name="abusive_tasks.overrun")
def overrun(self, run: str, tag: str, seconds: float) -> dict[str, Any]:
    """A stubborn task: it notes a soft time limit, ignores it and carries on for ``seconds``."""
    r = redis_client()
    start = time.time()
    r.hset(f"{run}:start", tag, start)
    for _ in range(max(1, round(seconds / 0.05))):
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            r.hset(f"{run}:soft", tag, time.time() - start)
    return {"ran": time.time() - start, "pool_pid": os.getpid()}


def pools(cluster: ClusterLike, *, soft: float = 0.5, hard: float = 1.0, seconds: float = 2.0,
          workers: Sequence[str] = ("limits", "solo", "threads")) -> dict[str, Measurement]:
    """The same :func:`overrun` with ``soft_time_limit=soft, time_limit=hard`` on each worker (pool), at once.

    Value: how long the task ran (until it returned or was killed); ``meta``:
    state, exception, when the soft limit was seen (NaN if never).
    """
    run = f"a9p:{uuid.uuid4().hex[:8]}"
    pending = {}
    t0 = time.time()
    for w in workers:
        pending[w] = cluster.task(overrun).apply_async((run, w, seconds), queue=w, soft_time_limit=soft,
                                                       time_limit=hard)
    out = {}
    r = cluster.redis_client()
    for w, res in pending.items():
        state, exc = _outcome(res, 30 + 3 * seconds)
        seen = time.time() - t0
        start = float(r.hget(f"{run}:start", w) or t0)
        ran = res.result["ran"] if state == "SUCCESS" else seen - (start - t0)
        soft_at = r.hget(f"{run}:soft", w)
        pool = cluster.workers[w].spec.pool if hasattr(cluster, "workers") and w in cluster.workers else w
        out[w] = Measurement(f"{pool} pool", "task ran for", "s", [ran], stat="max", meta={
            "worker": w, "pool": pool, "soft": soft, "hard": hard, "seconds": seconds, "state": state,
            "exception": exc, "soft_seen_at": float(soft_at) if soft_at else math.nan})
    r.delete(f"{run}:start", f"{run}:soft")
    r.close()
    return out


# ============================================================================ memory hogs
@shared_task(name="abusive_tasks.hog")
def hog(run: str, tag: str, mib: int, seconds: float, sent: float) -> dict[str, Any]:
    """Allocate (and touch) ``mib`` MiB in 8 MiB steps over ``seconds``, then let go.

    A ``MemoryError`` (an address-space cap) ends the allocation early; the
    task handles it and says so. The peak is the child's resident size at
    the top, read from ``/proc/self/status``.
    """
    from labkit.fresh import memory_now  # noqa: PLC0415

    if mib > MAX_HOG_MIB:
        raise ValueError(f"a hog may ask for at most {MAX_HOG_MIB} MiB, not {mib}")
    start = time.time()
    step = 8
    chunks = max(1, math.ceil(mib / step))
    held: list[bytes] = []
    outcome = "allocated"
    try:
        for _ in range(chunks):
            held.append(b"\x01" * (step * MIB))
            time.sleep(seconds / chunks)
    except MemoryError:
        outcome = "MemoryError"
    got = len(held) * step
    top = memory_now()["rss"]
    held.clear()
    cap = os.environ.get("LABKIT_RLIMIT_AS_BYTES")
    return record(run, tag, sent, start, mib_asked=mib, mib_got=got, outcome=outcome, rss_top_mib=top,
                  cap_bytes=int(cap) if cap else None)


@shared_task(name="abusive_tasks.short")
def short(run: str, tag: str, seconds: float, sent: float) -> dict[str, Any]:
    """A short task (somebody is waiting for it)."""
    start = time.time()
    time.sleep(seconds)
    return record(run, tag, sent, start)


@shared_task(name="abusive_tasks.whoami")
def whoami() -> dict[str, Any]:
    """Which worker and pool process runs this."""
    return {"worker": worker_name(), "pid": os.getpid()}


def _sample_rss(cluster: Any, worker: str, samples: list[tuple[float, int, float]], stop: Any,
                interval: float) -> None:
    """Sample the RSS (MiB) of each pool child of ``worker`` until ``stop`` is set."""
    import psutil  # noqa: PLC0415

    from labkit.poll import poll_until  # noqa: PLC0415

    def once() -> bool:
        now = time.time()
        for pid in cluster.children(worker):
            with contextlib.suppress(psutil.Error):  # a child that just left
                samples.append((now, pid, psutil.Process(pid).memory_info().rss / MIB))
        return stop.is_set()

    poll_until(once, 600, interval)


def neighbours(cluster: LocalCluster, layout: str = "shared", *, hogs: int = 2, hog_mib: int = 150,
               hog_s: float = 1.0, shorts: int = 12, short_s: float = 0.05, spacing: float = 0.1,
               label: str | None = None) -> Measurement:
    """``hogs`` memory hogs, then ``shorts`` short tasks every ``spacing`` s.

    ``layout="shared"``: all in the default queue, worker ``shared`` (2
    processes, ``max_memory_per_child`` = LIMIT_MIB). ``"own"``: the hogs in
    queue ``hogs`` (worker ``hogs``, 1 process, address space capped), the
    short tasks in ``shorts`` (1 process). Values: short-task latency, submit
    to done (stat p95). ``meta["rss"]``: the hog worker's children's RSS over
    time.
    """
    import threading  # noqa: PLC0415

    if layout not in ("shared", "own"):
        raise ValueError(f"layout must be 'shared' or 'own', not {layout!r}")
    if hog_mib > MAX_HOG_MIB:
        raise ValueError(f"hog_mib must be at most {MAX_HOG_MIB}")
    hog_q, short_q = ("celery", "celery") if layout == "shared" else ("hogs", "shorts")
    hog_worker = "shared" if layout == "shared" else "hogs"
    names = ["shared"] if layout == "shared" else ["hogs", "shorts"]
    samples: list[tuple[float, int, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(cluster, hog_worker, samples, stop, 0.05), daemon=True)
    sampler.start()
    run = f"a9n:{uuid.uuid4().hex[:8]}"
    try:
        t0 = time.time()
        for i in range(hogs):
            cluster.task(hog).apply_async((run, f"H{i}", hog_mib, hog_s, time.time()), queue=hog_q)
        for i in range(shorts):
            cluster.task(short).apply_async((run, f"s{i}", short_s, time.time()), queue=short_q)
            time.sleep(spacing)  # the arrival schedule is part of the workload
        records = collect(cluster, run, hogs + shorts, 60 + 3 * hogs * hog_s)
        time.sleep(0.3)  # let the sampler see the children that replace recycled ones
    finally:
        stop.set()
        sampler.join(5)
    slots = {n: cluster.workers[n].spec.concurrency for n in names}
    meta = {"layout": layout, "hogs": hogs, "hog_mib": hog_mib, "hog_s": hog_s, "shorts": shorts,
            "short_s": short_s, "spacing": spacing, "slots": slots, "limit_mib": LIMIT_MIB,
            "rss": [(t - t0, pid, mib) for t, pid, mib in samples], "hog_worker": hog_worker,
            **summary(records, t0, slots)}
    hog_recs = [x for x in meta["records"] if x["tag"].startswith("H")]
    meta["hog_top_mib"] = max(x["rss_top_mib"] for x in hog_recs)
    meta["hog_outcomes"] = sorted({x["outcome"] for x in hog_recs})
    default = "before: hog in the shared queue" if layout == "shared" else "after: hog in its own queue"
    return Measurement(label or default, "short-task latency (submit to done)", "s", meta["short_done"],
                       stat="p95", meta=meta)


def before(cluster: LocalCluster, **params: Any) -> Measurement:
    """The pitfall: a memory hog shares the short tasks' queue and worker."""
    return neighbours(cluster, "shared", **params)


def after(cluster: LocalCluster, **params: Any) -> Measurement:
    """The fix: the hog gets its own queue and worker (same two processes in all)."""
    return neighbours(cluster, "own", **params)


def compare(cluster: LocalCluster, **params: Any) -> Comparison:
    """Short-task latency p95 while hogs run, shared queue vs a queue of their own."""
    return Comparison(before(cluster, **params), after(cluster, **params), better="lower",
                      title="short-task latency p95 while hogs run")


def runaway(cluster: LocalCluster, worker: str = "shared", *, mib: int = 400, seconds: float = 0.8,
            label: str | None = None) -> Measurement:
    """One hog asking for ``mib`` MiB on ``worker``, then a task that says which child runs next.

    Value: the hog's child's RSS at its top (MiB). ``meta``: outcome
    (``allocated`` or ``MemoryError``), MiB got, the worker's
    ``max_memory_per_child`` and cap, and whether the next task ran in the
    same child (with one process per worker, the next task's pid tells).
    """
    if mib > MAX_HOG_MIB:
        raise ValueError(f"mib must be at most {MAX_HOG_MIB}")
    spec = cluster.workers[worker].spec
    queue = spec.queues[0]
    run = f"a9r:{uuid.uuid4().hex[:8]}"
    solo = spec.concurrency == 1
    res = cluster.task(hog).apply_async((run, "H", mib, seconds, time.time()), queue=queue)
    state, exc = _outcome(res, 60 + 3 * seconds)
    records = collect(cluster, run, 1, 30) if state == "SUCCESS" else []
    rec = records[0] if records else {}
    pid = rec.get("pid")
    if solo:  # one process: the next task runs in it, or in its replacement
        next_pid = cluster.task(whoami).apply_async(queue=queue).get(timeout=60)["pid"]
        same = next_pid == pid
    else:  # several: watch whether the hog's child leaves the pool (it exits right after its task)
        from labkit.poll import poll_until  # noqa: PLC0415

        next_pid = None
        same = not poll_until(lambda: pid not in cluster.children(worker), 5, 0.02)
    limit = spec.max_memory_per_child / 1024 if spec.max_memory_per_child else None
    meta = {"worker": worker, "mib": mib, "state": state, "exception": exc, "outcome": rec.get("outcome"),
            "mib_got": rec.get("mib_got"), "pid": pid, "limit_mib": limit,
            "cap_mib": float(spec.env[CAP_ENV]) if CAP_ENV in spec.env else None,
            "next_pid": next_pid, "same_child_after": same}
    default = f"{worker}: " + ("capped address space" if meta["cap_mib"] else
                               f"max_memory_per_child {limit:g} MiB" if limit else "no limit")
    return Measurement(label or default, "pool child RSS at the top", "MiB", [rec.get("rss_top_mib", math.nan)],
                       stat="max", meta=meta)


# ============================================================================ output of external programs
CHATTY = ("import sys\n"
          "line = b'x' * 99 + b'\\n'\n"
          "w = sys.stdout.buffer.write\n"
          "for _ in range(int(float(sys.argv[1]) * 1e6 / 100)):\n"
          "    w(line)\n")


def chatty_command(mb: float) -> list[str]:
    """An external program that writes ``mb`` MB of 100-byte lines to stdout."""
    return [sys.executable, "-c", CHATTY, str(mb)]


def read_all(mb: float) -> dict[str, int]:
    """Before: ``check_output`` — the whole output in memory at once."""
    out = subprocess.check_output(chatty_command(mb))
    return {"bytes": len(out), "lines": out.count(b"\n")}


def read_lines(mb: float) -> dict[str, int]:
    """After: read the output line by line as the program writes it."""
    size = lines = 0
    with subprocess.Popen(chatty_command(mb), stdout=subprocess.PIPE) as proc:
        for line in proc.stdout:
            size += len(line)
            lines += 1
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return {"bytes": size, "lines": lines}


def compare_output_reading(mb: float = 40) -> Comparison:
    """Peak RSS (above baseline, fresh interpreter) of :func:`read_all` vs :func:`read_lines`."""
    from labkit.fresh import peak_rss  # noqa: PLC0415

    before_m = peak_rss(read_all, (mb,), label="before: check_output", interval=0.02)
    after_m = peak_rss(read_lines, (mb,), label="after: for line in proc.stdout", interval=0.02)
    for m in (before_m, after_m):
        m.meta["mb"] = mb
    return Comparison(before_m, after_m, better="lower", title=f"reading {mb:g} MB of a program's output")


# ============================================================================ programs that hang
def hanging_command(hang: float) -> list[str]:
    """A shell script that starts a helper (``sleep``) in the background and waits for it."""
    return ["sh", "-c", f"sleep {hang:g} & wait"]


def _external_env(run: str, tag: str) -> dict[str, str]:
    return {**os.environ, "LABKIT_EXTERNAL": f"{run}/{tag}"}


@shared_task(name="abusive_tasks.call_popen")
def call_popen(run: str, tag: str, hang: float) -> int:
    """Before: start the program, read its output line by line; nothing ends it if we stop."""
    proc = subprocess.Popen(hanging_command(hang), stdout=subprocess.PIPE, env=_external_env(run, tag))
    lines = 0
    for _line in proc.stdout:
        lines += 1
    proc.wait()
    return lines


@shared_task(name="abusive_tasks.call_check_output")
def call_check_output(run: str, tag: str, hang: float) -> int:
    """``check_output``: on any exception it kills the program it started — but only that one."""
    return len(subprocess.check_output(hanging_command(hang), env=_external_env(run, tag)))


@shared_task(name="abusive_tasks.call_fixed")
def call_fixed(run: str, tag: str, hang: float) -> int:
    """The fix: the program leads its own process group; whatever ends the task, the group dies."""
    proc = subprocess.Popen(hanging_command(hang), stdout=subprocess.PIPE, env=_external_env(run, tag),
                            start_new_session=True)
    lines = 0
    try:
        for _line in proc.stdout:
            lines += 1
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the program and everything it started
        proc.wait()
        proc.stdout.close()
    return lines


CALLERS = {"popen": call_popen, "check_output": call_check_output, "fixed": call_fixed}
SETTLE = 0.3  # seconds between a task's end and the count of what it left running


def _name(process: Any) -> str:
    """A process's name, or ``"(gone)"`` if it ended while we looked."""
    import psutil  # noqa: PLC0415

    try:
        return process.name()
    except psutil.Error:
        return "(gone)"


def external_programs(prefix: str, cluster_id: str | None = None) -> list[Any]:
    """Live processes started by this lesson's callers whose ``LABKIT_EXTERNAL`` mark starts with ``prefix``.

    A caller marks each program it starts with ``LABKIT_EXTERNAL=<run>/<tag>``;
    children inherit the mark, so a program's helpers are found too.
    """
    import psutil  # noqa: PLC0415

    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("LABKIT_EXTERNAL", "").startswith(prefix) and (
                cluster_id is None or env.get("LABKIT_CLUSTER") == cluster_id):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                pass
    return found


def hanging(cluster: ClusterLike, *, soft: float | None = 0.5, hard: float | None = None, hang: float = 30.0,
            forms: Sequence[str] = ("popen", "check_output", "fixed")) -> dict[str, Measurement]:
    """Each caller in ``forms`` runs :func:`hanging_command` with ``soft_time_limit=soft`` (and ``time_limit=hard``).

    ``SETTLE`` seconds after each task has ended, the processes it started
    that are still running are counted (by their environment mark), named,
    then killed — the lesson cleans up after its own before. Value: how many
    survived the task.
    """
    import psutil  # noqa: PLC0415

    from labkit.poll import poll_until  # noqa: PLC0415

    out = {}
    for form in forms:
        run = f"a9x:{uuid.uuid4().hex[:8]}"
        t0 = time.time()
        res = cluster.task(CALLERS[form]).apply_async((run, form, hang), queue="limits", soft_time_limit=soft,
                                                      time_limit=hard)
        state, exc = _outcome(res, 30 + 3 * min(x for x in (soft, hard, hang) if x))
        ended = time.time() - t0
        # After a hard limit the caller hears of the failure before the pool process has finished
        # dying (its `finally` may still be running): give whatever is ending a moment to end.
        time.sleep(SETTLE)
        survivors = external_programs(f"{run}/", cluster.id)
        names = sorted(_name(p) for p in survivors)
        for p in survivors:  # we started them; we end them (a killed child of a pool process stays a zombie
            with contextlib.suppress(psutil.Error):  # until that process reaps it: harmless, and not counted)
                p.kill()
        gone = poll_until(lambda run=run: not external_programs(f"{run}/", cluster.id), 5, 0.05)
        left = [] if gone else external_programs(f"{run}/", cluster.id)
        label = {"popen": "before: Popen, no clean-up", "check_output": "check_output",
                 "fixed": "fix: own process group, killpg in finally"}[form]
        out[form] = Measurement(label, "programs still running after the task ended", "processes",
                                [len(survivors)], stat="sum", meta={
                                    "form": form, "soft": soft, "hard": hard, "hang": hang, "state": state, "exception": exc,
                                    "task_ended_s": ended, "survivors": names, "left_after_reap": len(left)})
    return out


# ============================================================================ claims
@claim("the fix's MaxRetriesExceededError handler runs; the slide's never does")
def retry_handler_runs_only_in_the_fix(talk: Measurement, fixed: Measurement) -> None:
    """Both jobs make max_retries + 1 attempts, each cleaned up; only the fixed one sends its e-mail."""
    for m in (talk, fixed):
        x = m.meta
        verify(f"{m.label}: {x['max_retries'] + 1} attempts, each stopped by the soft limit and cleaned up",
               x["attempts"] == x["max_retries"] + 1, attempts=x["attempts"])
        verify(f"{m.label}: it ends FAILURE with MaxRetriesExceededError",
               x["state"] == "FAILURE" and x["exception"] == "MaxRetriesExceededError",
               state=x["state"], exception=x["exception"])
    verify("the slide's `except MaxRetriesExceededError` never runs", talk.meta["emails"] == 0,
           emails=talk.meta["emails"])
    verify("the nested handler sends exactly one e-mail", fixed.meta["emails"] == 1, emails=fixed.meta["emails"])


@claim("the hard limit kills the pool child: a slow clean-up never finishes")
def hard_limit_kills_the_child(m: Measurement) -> None:
    """FAILURE with TimeLimitExceeded, the child gone and replaced, the clean-up cut off."""
    x = m.meta
    verify("the task failed with TimeLimitExceeded", x["state"] == "FAILURE" and x["exception"] == "TimeLimitExceeded",
           state=x["state"], exception=x["exception"])
    verify("the result came back before the task could have finished", m.value < x["seconds"],
           seen_after=m.value, task_seconds=x["seconds"])
    verify("the child that ran it is gone", not x["pid_alive"], pid=x["pid"])
    verify("a clean-up slower than the 0.1 s grace never finished", not x["cleanup_finished"],
           cleanup_s=x["cleanup_s"], started=x["cleanup_started"])


@claim("only the prefork pool enforces time limits; solo and threads ignore both")
def limits_hold_only_on_prefork(prefork: Measurement, others: Sequence[Measurement]) -> None:
    """Prefork: the soft limit is raised and the hard limit ends the task; elsewhere it runs to the end."""
    x = prefork.meta
    verify(f"{prefork.label}: the soft limit was raised in the task", not math.isnan(x["soft_seen_at"]),
           soft_seen_at=x["soft_seen_at"])
    verify(f"{prefork.label}: the hard limit killed it (TimeLimitExceeded)", x["exception"] == "TimeLimitExceeded",
           state=x["state"], exception=x["exception"])
    for m in others:
        y = m.meta
        verify(f"{m.label}: ran past both limits and succeeded",
               y["state"] == "SUCCESS" and m.value >= y["hard"] and math.isnan(y["soft_seen_at"]),
               state=y["state"], ran=m.value, hard=y["hard"], soft_seen_at=y["soft_seen_at"])


@claim("a hog in its own queue no longer delays short tasks")
def own_queue_shields_short_tasks(comparison: Comparison) -> None:
    """Before, the p95 short task waited at least half a hog; after, under a quarter of that wait."""
    b, a = comparison.before.meta, comparison.after.meta
    verify("sharing a queue with hogs, the p95 short task waits at least half a hog's run",
           b["short_wait_p95"] >= b["hog_s"] / 2, wait_p95=b["short_wait_p95"], hog_s=b["hog_s"])
    verify("with the hogs in their own queue, the p95 short task waits under a quarter as long",
           a["short_wait_p95"] <= b["short_wait_p95"] / 4, wait_p95=a["short_wait_p95"],
           shared_wait_p95=b["short_wait_p95"])
    comparison.check(factor=2)


@claim("max_memory_per_child lets a runaway task finish far above the limit; the child goes only afterwards")
def max_memory_acts_after_the_task(m: Measurement) -> None:
    """The task got all it asked for, its child went far past the limit, and the next task ran in a new child."""
    x = m.meta
    verify("the worker has a max_memory_per_child", x["limit_mib"] is not None, limit_mib=x["limit_mib"])
    verify("the runaway got every MiB it asked for", x["outcome"] == "allocated" and x["mib_got"] >= x["mib"],
           outcome=x["outcome"], got=x["mib_got"], asked=x["mib"])
    verify("its child's RSS went past the limit", m.value > x["limit_mib"], rss_top=m.value,
           limit=x["limit_mib"])
    verify("the child was replaced after the task", not x["same_child_after"], pid=x["pid"],
           next_pid=x["next_pid"])


@claim("an address-space cap turns a runaway into a MemoryError the task handles, in the same child")
def cap_contains_the_runaway(capped: Measurement, uncapped: Measurement) -> None:
    """Capped: MemoryError caught, RSS under the cap, the child lives on. Uncapped: it took everything."""
    c, u = capped.meta, uncapped.meta
    verify("capped: the allocation stopped with a MemoryError the task handled",
           c["state"] == "SUCCESS" and c["outcome"] == "MemoryError", state=c["state"], outcome=c["outcome"])
    verify("capped: it got less than it asked for, and at most the cap",
           c["mib_got"] < c["mib"] and c["mib_got"] <= (c["cap_mib"] or 0), got=c["mib_got"], asked=c["mib"],
           cap=c["cap_mib"])
    verify("capped: the same child runs the next task", c["same_child_after"], pid=c["pid"], next_pid=c["next_pid"])
    verify("uncapped: the same runaway got all it asked for", u["mib_got"] is not None and u["mib_got"] >= u["mib"],
           got=u["mib_got"], asked=u["mib"])


@claim("reading a program's output line by line keeps memory flat")
def streaming_output_stays_flat(comparison: Comparison) -> None:
    """check_output's peak is at least half the output; line by line needs under a fifth of that."""
    mb = comparison.before.meta["mb"]
    output_mib = mb * 1e6 / MIB
    verify("check_output holds (at least half of) the whole output", comparison.before.value >= output_mib / 2,
           peak_mib=comparison.before.value, output_mib=output_mib)
    comparison.check(factor=5)


@claim("the soft limit ends the task but not the program it started; the fix ends both")
def soft_limit_ends_the_program_only_with_the_fix(popen: Measurement, fixed: Measurement) -> None:
    """Both tasks were stopped by the soft limit; processes left: some without the fix, none with it."""
    for m in (popen, fixed):
        verify(f"{m.label}: the soft limit ended the task", m.meta["exception"] == "SoftTimeLimitExceeded",
               state=m.meta["state"], exception=m.meta["exception"])
    verify("without clean-up, the program (and its helper) outlive the task", popen.value >= 1,
           survivors=popen.meta["survivors"])
    verify("with the process group killed in `finally`, nothing outlives the task", fixed.value == 0,
           survivors=fixed.meta["survivors"])


# ============================================================================ tables and plots
def table(measurements: Sequence[Measurement]) -> Table:
    """Short-task latency while hogs run, per layout."""
    from labkit.table import Table  # noqa: PLC0415

    rows = []
    for m in measurements:
        x = m.meta
        busy_txt = ", ".join(f"{w} {100 * f:.0f}%" for w, f in x["busy_fraction"].items())
        rows.append([m.label, x["short_wait_p50"], x["short_wait_p95"], x["short_p95"], x["hog_top_mib"],
                     ", ".join(x["hog_outcomes"]), busy_txt])
    return Table(["run", "short wait p50 [s]", "short wait p95 [s]", "short done p95 [s]", "hog child RSS [MiB]",
                  "hogs", "busy"], rows)


def facts(measurements: Sequence[Measurement], keys: Sequence[str]) -> Table:
    """One row per measurement: its label, value and the ``meta`` entries named in ``keys``."""
    from labkit.table import Table  # noqa: PLC0415

    rows = [[m.label, m.value, *[m.meta.get(k) if not isinstance(m.meta.get(k), list | tuple)
                                 else ", ".join(map(str, m.meta[k])) for k in keys]] for m in measurements]
    return Table(["run", f"{measurements[0].metric} [{measurements[0].unit}]", *keys], rows)


def plot_tasks(runs: Sequence[Measurement]):
    """Every task of each run on its pool process's lane (hogs dark, short tasks light)."""
    return plot_gantt(runs, legend="seconds since the first task was sent (dark: memory hogs, light: short tasks)")


def plot_rss(runs: Sequence[Measurement]):
    """RSS of the hog worker's pool children over time, one line per child, with the worker's limit."""
    from labkit.plots import NEUTRAL, panels, style  # noqa: PLC0415

    fig, axes = panels(len(runs), width=5.2)
    for ax, m in zip(axes, runs, strict=True):
        pids = sorted({pid for _, pid, _ in m.meta["rss"]})
        for i, pid in enumerate(pids):
            pts = [(t, v) for t, p, v in m.meta["rss"] if p == pid and v > 0]  # 0: a process on its way out
            if not pts:
                continue
            ax.plot(*zip(*pts, strict=True), color=NEUTRAL[i % len(NEUTRAL)], lw=1.8, label=f"child {pid}")
        if m.meta["hog_worker"] == "shared":
            ax.axhline(m.meta["limit_mib"], ls="--", color="grey", lw=1,
                       label=f"max_memory_per_child {m.meta['limit_mib']} MiB")
        ax.legend(frameon=False, fontsize=8)
        style(ax, f"{m.label}\n(worker {m.meta['hog_worker']})", "RSS [MiB]", "seconds since the first task was sent")
    return fig


def plot_attempts(runs: Sequence[Measurement]):
    """Each run_job form's attempts on a time line: a bar per attempt, cut by the soft limit."""
    from labkit.plots import axis, colour_for, style  # noqa: PLC0415

    ax = axis()
    for i, m in enumerate(runs):
        for k, (start, end) in enumerate(m.meta["spans"]):
            ax.barh(i, end - start, left=start, height=0.5, color=colour_for(m.label, i), alpha=0.85)
            ax.annotate(f"#{k + 1}", (start + (end - start) / 2, i), ha="center", va="center", fontsize=8,
                        color="white")
        last = m.meta["spans"][-1][1] if m.meta["spans"] else 0
        ax.annotate(f"  {m.meta['emails']} e-mail(s)", (last, i), va="center", fontsize=9)
    ax.set_yticks(range(len(runs)), [m.label for m in runs])
    ax.set_xlim(0, max(s[-1][1] for s in (m.meta["spans"] for m in runs) if s) * 1.25)
    return style(ax, f"run_job: every attempt ends at the soft limit ({runs[0].meta['soft']:g} s), "
                     f"then waits {runs[0].meta['retry_delay']:g} s", "", "seconds since the jobs were sent")
