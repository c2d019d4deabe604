"""Lesson 14 — a distributed mutex: the talk's recipe, measured where it breaks; a ZooKeeper lock, measured correct.

The talk (slides 114–125) builds a "Celery Mutex": a task base class whose
``apply_async`` asks ZooKeeper ``exists(node)?`` and, if not, ``create(node)``
and sends the task; ``after_return`` deletes the node. This module runs it
three ways and says which is which:

1. **As written** (:class:`MutexTask`, only ``client = None`` replaced by a
   real kazoo client): ``after_return(self, *args, **kwargs)`` receives
   Celery's ``(status, retval, task_id, args, kwargs, einfo)`` as ``args``, so
   ``_get_node`` raises ``TypeError``; the worker logs it, the node is never
   deleted, and the job locks itself out after its first run.
2. **The slide's placement, after_return repaired** (:class:`TalkMutexTask`,
   ``mutex_on="submit"``): the mutex is taken in the producer. ZooKeeper's
   ``create()`` is atomic, so the check-then-act race surfaces as
   ``NodeExistsError`` in the producer, and refused submissions never reach a
   worker (never run ``after_return``): one holder at a time.
3. **Moved to run time** (``mutex_on="run"``: our adaptation, the way such a
   guard often ends up — on the worker, where it also covers a redelivered
   message): now *every* task runs ``after_return``, the skipped ones
   included, and deletes whatever node is there — the winner's. The next
   contender starts while the winner still runs. Peak concurrent holders is
   counted by Redis (``INCR``/``DECR`` around the critical section, the peak
   kept by a Lua script), never by reading logs.

Also measured: a SIGKILLed holder's persistent node (no session owns it:
nothing ever frees it), and why a correct lock still needs **fencing**: a
holder paused past its session timeout wakes up and writes; only the
protected resource can refuse it, if every write carries a growing token.

The fix, :class:`ZkMutexTask`, uses kazoo's :class:`~kazoo.recipe.lock.Lock`:
an *ephemeral sequential* node per contender (atomic, no check-then-act), the
path keyed by the task's ``mutex_keys`` arguments, released only by its owner,
freed by ZooKeeper when the owner's session expires, and the node's sequence
number is a fencing token.

Kazoo clients are created per process, lazily, after the prefork fork
(:func:`labkit.app.zk_client`); nothing here opens a connection at import.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from celery import Task, shared_task

from labkit.app import redis_client, worker_name, zk_client
from labkit.measure import Comparison, Measurement, claim, verify
from labkit.poll import poll_until

if TYPE_CHECKING:  # pragma: no cover
    from labkit.client import ClusterLike
    from labkit.cluster import LocalCluster

NOTEBOOK = "14_mutex.ipynb"
SKIPPED = "skipped"
TALK_ROOT = "/mutex/celery"  # the talk's path prefix
FIX_ROOT = "/labkit/mutex"
FAULT_QUEUE = "mutex-fault"  # served by w3 only: the worker we kill and pause
MIN_CONTENDERS = 6  # before(): more contenders than w1 + w2's four processes


# --------------------------------------------------------------------------- cluster layout
def cluster_config(session_timeout: float = 1.0) -> dict[str, Any]:
    """w1, w2: the contenders (prefork -c2, 10 s sessions). w3: the victim, with a short session.

    w3 serves :data:`FAULT_QUEUE` with two children and a ZooKeeper session of
    ``session_timeout`` s (``LABKIT_ZK_SESSION_TIMEOUT``; the server allows
    0.5–30 s), so a crash or a pause costs about that long before ZooKeeper
    gives its lock away.
    """
    if not 0.5 <= session_timeout <= 30:
        raise ValueError(f"session_timeout={session_timeout}: ZooKeeper negotiates 0.5-30 s "
                         "(2x-20x its 250 ms tick)")
    return {
        "workers": [
            {"name": "w1"},
            {"name": "w2"},
            {"name": "w3", "queues": [FAULT_QUEUE], "concurrency": 2,
             "env": {"LABKIT_ZK_SESSION_TIMEOUT": str(session_timeout)}},
        ],
        "zookeeper": 1,
    }


CLUSTER = cluster_config()
WORKSHOP = {"TRIALS": 10, "CONTENDERS": 24, "PER_KEY": 4}

# --------------------------------------------------------------------------- counting (Redis)
# The system counts, not the logs: one atomic script per entry/exit of the
# critical section. KEYS: this job's "now" and "peak", the run's "now" and "peak".
_ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
local m = redis.call('INCR', KEYS[3])
if m > tonumber(redis.call('GET', KEYS[4]) or '0') then redis.call('SET', KEYS[4], m) end
return n
"""
_EXIT = """
redis.call('DECR', KEYS[1])
return redis.call('DECR', KEYS[2])
"""
# The protected resource. ARGV: value, token ('' = an unfenced write).
# A fenced write is refused when its token is lower than the highest seen.
_WRITE = """
if ARGV[2] ~= '' then
  local high = tonumber(redis.call('GET', KEYS[2]) or '-1')
  if tonumber(ARGV[2]) < high then return 0 end
  redis.call('SET', KEYS[2], ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


def _ns(run: str) -> str:
    return f"lk:mutex:{run}"


def tally(run: str, event: str, n: int = 1) -> None:
    """Count an event (``ran``, ``skipped``, ``loser_deletes`` ...) for this run in Redis."""
    redis_client().hincrby(f"{_ns(run)}:tally", event, n)


def critical_section(run: str, job: str, seconds: float, token: int | None = None) -> dict:
    """The work the mutex protects, with holders counted around it.

    ``seconds`` of simulated I/O (an export writing a file); the same amount
    for every recipe, so the workloads are identical.
    """
    r = redis_client()
    ns = _ns(run)
    keys = [f"{ns}:job:{job}:now", f"{ns}:job:{job}:peak", f"{ns}:all:now", f"{ns}:all:peak"]
    me = {"job": job, "pid": os.getpid(), "worker": worker_name(), "token": token}
    start = time.time()
    r.eval(_ENTER, 4, *keys)
    r.rpush(f"{ns}:entered", json.dumps({**me, "t": start}))
    try:
        time.sleep(seconds)
    finally:
        end = time.time()
        r.eval(_EXIT, 2, keys[0], keys[2])
        r.rpush(f"{ns}:intervals", json.dumps({**me, "start": start, "end": end}))
    return {**me, "start": start, "end": end}


def protected_write(run: str, value: str, token: int | None) -> bool:
    """Write ``value`` to the run's protected resource; ``token=None`` writes unfenced."""
    ns = _ns(run)
    ok = redis_client().eval(_WRITE, 2, f"{ns}:resource", f"{ns}:resource:token", value,
                             "" if token is None else str(token))
    return bool(ok)


# --------------------------------------------------------------------------- the talk's recipe
class MutexTask(Task):
    """The talk's Celery Mutex (slides 117–123), as written.

    One change so that it runs at all: the slide's ``client = None`` (and the
    undefined ``client`` in ``after_return``) is a real kazoo client, one per
    process; ``super(MutexTask, self)`` is spelled ``super()``. Everything
    else is the slide's: ``abstract = True`` (a no-op since Celery 4.0),
    ``exists()`` then ``create()`` of a persistent node, the mutex taken in
    ``apply_async`` — and ``after_return(self, *args, **kwargs)``.
    """

    abstract = True

    def _get_node(self, args, kwargs):
        mutex_keys = getattr(self, "mutex_keys", ())
        lock_node = f"{TALK_ROOT}/{self.name}"
        items = inspect.getcallargs(self.run, *args, **kwargs)
        for value in (items[x] for x in mutex_keys if items.get(x)):
            lock_node += value
        return lock_node

    @contextlib.contextmanager
    def mutex(self, args, kwargs):
        client = zk_client()
        success = False
        lock_node = self._get_node(args, kwargs)
        if not client.exists(lock_node):
            success = True
        if success:
            client.create(lock_node, makepath=True)
            yield True
        else:
            yield False

    def apply_async(self, args=None, kwargs=None, **options):
        with self.mutex(args, kwargs) as mutex_acquired:
            if mutex_acquired:
                return super().apply_async(args, kwargs, **options)

    def after_return(self, *args, **kwargs):
        lock_node = self._get_node(args, kwargs)
        client = zk_client()
        if client.exists(lock_node):
            client.delete(lock_node)


class TalkMutexTask(MutexTask):
    """The same recipe with ``after_return`` repaired, taken where ``mutex_on`` says.

    The one repair: Celery's signature, ``after_return(status, retval,
    task_id, args, kwargs, einfo)``, so the node is deleted after a run —
    still *whatever node is there*, whoever made it.

    * ``"submit"`` — the slide: ``apply_async`` checks and creates in the
      producer and sends the task only if it got the node;
    * ``"run"`` — our adaptation: the same ``mutex()`` when the task starts on
      a worker (``__call__``); a busy lock returns :data:`SKIPPED`.
    """

    mutex_keys: tuple[str, ...] = ()
    mutex_on: str = "run"

    def apply_async(self, args=None, kwargs=None, **options):
        if self.mutex_on == "submit":
            return super().apply_async(args, kwargs, **options)
        return Task.apply_async(self, args, kwargs, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.mutex_on != "run":
            return self.run(*args, **kwargs)
        with self.mutex(args, kwargs) as mutex_acquired:
            if not mutex_acquired:
                return SKIPPED
            return self.run(*args, **kwargs)

    def after_return(self, status, retval, task_id, args, kwargs, einfo) -> None:
        client = zk_client()
        lock_node = self._get_node(args, kwargs)
        if client.exists(lock_node):
            client.delete(lock_node)
            if retval == SKIPPED or status == "FAILURE":  # measuring only: a loser just freed the lock
                tally(inspect.getcallargs(self.run, *args, **kwargs)["run"], "loser_deletes")


@shared_task(base=MutexTask, name="mutex.slide_export", mutex_keys=("job"))  # a string, as on slide 124
def slide_export(run: str, job: str, seconds: float) -> dict:
    """The talk's ``build_exports(schedule_id)`` under its mutex, as written (``mutex_keys`` a string, too)."""
    return critical_section(run, job, seconds)


@shared_task(base=TalkMutexTask, name="mutex.talk_export_slide", mutex_keys=("job",), mutex_on="submit")
def talk_export_slide(run: str, job: str, seconds: float) -> dict:
    """One export, the mutex taken in ``apply_async`` (the slide's placement), ``after_return`` repaired."""
    return critical_section(run, job, seconds)


@shared_task(base=TalkMutexTask, name="mutex.talk_export", mutex_keys=("job",))
def talk_export(run: str, job: str, seconds: float) -> dict:
    """The same export, the same mutex taken when the task starts on a worker (our adaptation)."""
    return critical_section(run, job, seconds)


@shared_task(name="mutex.submit")
def submit(task_name: str, args: list) -> str | None:
    """A producer running on a worker: ``task.delay(*args)``, as the talk's code sends its tasks.

    Returns the task id, or ``None`` when the slide's mutex refused to send
    it; the slide's ``NodeExistsError`` (a lost race) propagates: this task fails.
    """
    from celery import current_app  # noqa: PLC0415

    result = current_app.tasks[task_name].delay(*args)
    return result.id if result is not None else None


@shared_task(name="mutex.submit_burst")
def submit_burst(task_name: str, args: list, k: int) -> list[str]:
    """``k`` threads of one producer call ``task.delay(*args)`` at the same instant.

    A web app handling ``k`` requests at once, each asking for the same
    export. A ``threading.Barrier`` releases them together. Each thread's
    outcome: the task id it sent, ``"refused"``, or the exception it raised.
    """
    from celery import current_app  # noqa: PLC0415

    task = current_app.tasks[task_name]
    barrier = threading.Barrier(k)
    out = ["" for _ in range(k)]

    def one(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            result = task.delay(*args)
            out[i] = result.id if result is not None else "refused"
        except Exception as exc:  # the slide's lost race: NodeExistsError, here in the producer
            out[i] = type(exc).__name__

    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


# --------------------------------------------------------------------------- the fix
def fencing_token(lock) -> int:
    """The sequence number ZooKeeper gave this holder's lock node: it only ever grows."""
    return int(lock.node.rsplit("__lock__", 1)[1])


class ZkMutexTask(Task):
    """A keyed, ephemeral, owner-released ZooKeeper lock around the task body.

    * ``mutex_keys``: argument names whose values select the lock — the same
      values serialise, different values run in parallel.
    * ``on_busy``: ``"skip"`` (return :data:`SKIPPED`, like the talk),
      ``"retry"`` (``self.retry`` with jitter: the slot is freed while
      waiting), or ``"wait"`` (block in ``acquire`` for ``wait_timeout`` s).
    * The body reads its fencing token as ``self.request.fencing_token``
      (``bind=True``).
    """

    mutex_keys: tuple[str, ...] = ()
    on_busy: str = "skip"
    retry_delay: float = 0.05
    busy_max_retries: int = 500
    wait_timeout: float = 30.0

    def lock_path(self, args: tuple, kwargs: dict) -> str:
        """``/labkit/mutex/<task>/<key>=<value>/...`` — every key, escaped, so keys never collide."""
        items = inspect.getcallargs(self.run, *args, **kwargs)
        parts = [f"{k}={quote(str(items[k]), safe='')}" for k in self.mutex_keys]
        return "/".join([FIX_ROOT, self.name, *parts]) if parts else f"{FIX_ROOT}/{self.name}/_"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        lock = zk_client().Lock(self.lock_path(args, kwargs),
                                identifier=f"{worker_name()}:{os.getpid()}:{self.request.id}")
        if self.on_busy == "wait":
            acquired = lock.acquire(timeout=self.wait_timeout)
        else:
            acquired = lock.acquire(blocking=False)  # one atomic create; never check-then-act
        run = inspect.getcallargs(self.run, *args, **kwargs).get("run")
        if not acquired:
            if self.on_busy == "retry":
                if run:
                    tally(run, "retries")
                raise self.retry(countdown=self.retry_delay * (1 + random.random()),
                                 max_retries=self.busy_max_retries)
            if run:
                tally(run, "skipped")
            return SKIPPED
        try:
            self.request.fencing_token = fencing_token(lock)
            return self.run(*args, **kwargs)
        finally:
            lock.release()  # deletes this holder's own node only


@shared_task(base=ZkMutexTask, name="mutex.fixed_export", mutex_keys=("job",), on_busy="skip")
def fixed_export(run: str, job: str, seconds: float) -> dict:
    """The same export as :func:`talk_export`, guarded by :class:`ZkMutexTask` (skip when busy)."""
    return critical_section(run, job, seconds)


@shared_task(base=ZkMutexTask, name="mutex.keyed_export", mutex_keys=("job",), on_busy="retry",
             bind=True)
def keyed_export(self, run: str, job: str, seconds: float) -> dict:
    """The same export, but a busy lock means "try again shortly", not "skip"."""
    return critical_section(run, job, seconds, token=self.request.fencing_token)


@shared_task(base=ZkMutexTask, name="mutex.unkeyed_export", on_busy="retry", bind=True)
def unkeyed_export(self, run: str, job: str, seconds: float) -> dict:
    """:func:`keyed_export` without ``mutex_keys``: one lock for every job (the keys switched off)."""
    return critical_section(run, job, seconds, token=self.request.fencing_token)


@shared_task(base=ZkMutexTask, name="mutex.fenced_write", mutex_keys=("resource",), on_busy="wait",
             bind=True)
def fenced_write(self, run: str, resource: str, who: str, hold: float, fenced: bool) -> dict:
    """Hold the lock, work for ``hold`` s, then write ``who`` to the protected resource.

    With ``fenced`` the write carries the lock's token and the resource
    refuses it if a later holder has already written with a higher one.
    """
    token = self.request.fencing_token
    r = redis_client()
    events = f"{_ns(run)}:events"
    session_ms = getattr(zk_client(), "_session_timeout", None)
    r.rpush(events, json.dumps({"t": time.time(), "who": who, "what": "acquired", "token": token,
                                "pid": os.getpid(), "worker": worker_name(), "session_ms": session_ms}))
    time.sleep(hold)  # the slow part of the job: a long GC pause or SIGSTOP may land here
    accepted = protected_write(run, who, token if fenced else None)
    r.rpush(events, json.dumps({"t": time.time(), "who": who, "what": "write", "token": token,
                                "accepted": accepted}))
    return {"who": who, "token": token, "accepted": accepted}


@shared_task(name="mutex.session_timeout")
def session_timeout() -> float:
    """The ZooKeeper session timeout this worker process negotiated, in seconds."""
    return zk_client()._session_timeout / 1000.0


# --------------------------------------------------------------------------- kernel side
def new_run() -> str:
    return uuid.uuid4().hex[:8]


def _int(r, key: str) -> int:
    return int(r.get(key) or 0)


def _list(r, key: str) -> list[dict]:
    return [json.loads(x) for x in r.lrange(key, 0, -1)]


def _tallies(r, run: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(f"{_ns(run)}:tally").items()}


def warm_up(cluster: ClusterLike, n: int = 12) -> None:
    """Open every pool child's kazoo and Redis clients before measuring (first use costs ~50 ms)."""
    task = cluster.task(fixed_export)
    results = [task.apply_async((new_run(), f"warm{i}", 0.05)) for i in range(n)]
    for res in results:
        res.get(timeout=30)


def _outcome(res) -> str:
    """What one result says: ``ran``, ``skipped``, or the name of the exception it failed with."""
    value = res.get(timeout=60, propagate=False)
    if res.failed():
        return type(value).__name__
    return SKIPPED if value == SKIPPED else "ran"


def _run_trial(cluster: ClusterLike, task, contenders: int, seconds: float) -> dict:
    """Submit ``contenders`` copies of one export at once; count what the system saw."""
    r = cluster.redis_client()
    run = new_run()
    job = f"report-{run}"
    sent = cluster.task(task)
    t0 = time.perf_counter()
    outcomes = [_outcome(res) for res in [sent.apply_async((run, job, seconds)) for _ in range(contenders)]]
    ran, skipped = outcomes.count("ran"), outcomes.count(SKIPPED)
    return {
        "run": run, "submitted": contenders, "ran": ran, "skipped": skipped,
        "failed": contenders - ran - skipped, "errors": sorted(set(outcomes) - {"ran", SKIPPED}),
        "peak": _int(r, f"{_ns(run)}:job:{job}:peak"),
        "loser_deletes": _tallies(r, run).get("loser_deletes", 0),
        "elapsed": time.perf_counter() - t0,
    }


def _submit_trial(cluster: ClusterLike, contenders: int, seconds: float) -> dict:
    """One producer's ``contenders`` threads call the slide's ``delay()`` for one job at once; count what happened."""
    r = cluster.redis_client()
    run = new_run()
    job = f"report-{run}"
    t0 = time.perf_counter()
    answers = cluster.task(submit_burst).delay(talk_export_slide.name, [run, job, seconds], contenders).get(timeout=60)
    sent = [a for a in answers if len(a) == 36 and a.count("-") == 4]  # task ids
    raised = [a for a in answers if a not in sent and a != "refused"]
    outcomes = [_outcome(cluster.task(talk_export_slide).AsyncResult(task_id)) for task_id in sent]
    return {
        "run": run, "submitted": contenders, "sent": len(sent), "refused": answers.count("refused"),
        "raised": len(raised), "errors": sorted(set(raised)), "ran": outcomes.count("ran"),
        "peak": _int(r, f"{_ns(run)}:job:{job}:peak"),
        "loser_deletes": _tallies(r, run).get("loser_deletes", 0),
        "elapsed": time.perf_counter() - t0,
    }


def _trials(label: str, rows: list[dict], contenders: int, seconds: float) -> Measurement:
    keys = [k for k, v in rows[0].items() if isinstance(v, int) and k != "peak"]
    return Measurement(
        label, "peak concurrent holders", "holders", [row["peak"] for row in rows], stat="max",
        meta={"trials": rows, "contenders": contenders, "seconds": seconds,
              "totals": {k: sum(row[k] for row in rows) for k in keys}},
    )


def before(cluster: ClusterLike, *, trials: int = 6, contenders: int = 12, seconds: float = 0.2) -> Measurement:
    """The talk's mutex taken at run time: ``contenders`` exports of one job submitted at once, per trial.

    Needs ``contenders >= 6``: with no more contenders than the four worker
    processes, they all start at once and rarely is anyone left to walk in
    after a loser's cleanup, so the overlap this measures would be luck.
    """
    if contenders < MIN_CONTENDERS:
        raise ValueError(f"contenders={contenders}: use {MIN_CONTENDERS} or more. With no more contenders than "
                         "the 4 worker processes they all start together and almost nobody arrives after a "
                         "loser's after_return freed the node, so an overlap (or its absence) would be luck")
    rows = [_run_trial(cluster, talk_export, contenders, seconds) for _ in range(trials)]
    return _trials("talk's mutex, at run time", rows, contenders, seconds)


def after(cluster: ClusterLike, *, trials: int = 6, contenders: int = 12, seconds: float = 0.2) -> Measurement:
    """The same workload under :class:`ZkMutexTask` (skip when busy)."""
    rows = [_run_trial(cluster, fixed_export, contenders, seconds) for _ in range(trials)]
    return _trials("fix: ZooKeeper Lock", rows, contenders, seconds)


def slide_placement(cluster: ClusterLike, *, trials: int = 6, contenders: int = 12,
                    seconds: float = 0.2) -> Measurement:
    """The talk's mutex where the slide takes it (in ``apply_async``), ``contenders`` producers at once."""
    rows = [_submit_trial(cluster, contenders, seconds) for _ in range(trials)]
    return _trials("the slide's placement: in apply_async", rows, contenders, seconds)


def compare(cluster: ClusterLike, *, trials: int = 6, contenders: int = 12, seconds: float = 0.2) -> Comparison:
    """The talk's mutex at run time vs the fix, same contenders, same exports."""
    params = {"trials": trials, "contenders": contenders, "seconds": seconds}
    return Comparison(before(cluster, **params), after(cluster, **params), better="lower",
                      title="peak concurrent holders of one mutex")


def _log_line(cluster: LocalCluster, needle: str) -> str:
    """The last line of any worker's log that contains ``needle`` (or ``""``)."""
    for name in cluster.workers:
        for line in reversed(cluster.logs(name, 400).splitlines()):
            if needle in line:
                return line.strip()
    return ""


def resubmit(cluster: LocalCluster, *, repaired: bool = False, attempts: int = 3,
             seconds: float = 0.05) -> Measurement:
    """Submit one export ``attempts`` times, one after another, through the slide's mutex.

    ``repaired=False``: the slide's code as written (:class:`MutexTask`);
    ``True``: the same placement with ``after_return`` repaired. Each attempt
    goes through a producer task (``delay()`` runs the mutex in the caller);
    the next starts once the export has run and its ``after_return`` is done
    (the node is gone, or the worker logged that ``after_return`` raised).
    Records what happened to each attempt and to the node.
    """
    task = talk_export_slide if repaired else slide_export
    zk = cluster.zk()
    run = new_run()
    args = [run, f"nightly-{run}", seconds]
    node = cluster.task(task)._get_node(tuple(args), {})
    if zk.exists(node):  # a previous run's lockout: this experiment starts from a free lock
        zk.delete(node)
    rows = []
    for i in range(1, attempts + 1):
        task_id = cluster.task(submit).delay(task.name, args).get(timeout=30)
        outcome = "refused" if task_id is None else _outcome(cluster.task(task).AsyncResult(task_id))
        error = ""
        if task_id is not None:
            needle = f"{task.name}[{task_id}] after_return handler raised"
            error = poll_until(lambda needle=needle: zk.exists(node) is None or _log_line(cluster, needle),
                               10, interval=0.01, what="the export's after_return")
        stat = zk.exists(node)
        rows.append({"attempt": i, "outcome": outcome, "node_after": stat is not None,
                     "node_persistent": stat is not None and stat.ephemeralOwner == 0,
                     "after_return": "" if task_id is None else error if isinstance(error, str) else "deleted the node"})
    if zk.exists(node):
        zk.delete(node)  # the manual cleanup, so the next run starts free
    return Measurement("the slide, after_return repaired" if repaired else "the slide as written",
                       "submissions that ran", "runs", [1 if row["outcome"] == "ran" else 0 for row in rows],
                       stat="sum", meta={"attempts": rows, "node": node, "repaired": repaired})


# --------------------------------------------------------------------------- crashes
def _victim(cluster: LocalCluster, run: str, start) -> dict:
    """Start a long export (``start()``) and return its ``entered`` record once it holds the lock."""
    r = cluster.redis_client()
    start()
    return poll_until(lambda: _list(r, f"{_ns(run)}:entered"), 30, interval=0.01,
                      what="the victim to enter its critical section")[0]


def _kill(cluster: LocalCluster, victim: dict) -> float:
    """SIGKILL the pool process that runs ``victim`` (via the cluster); return the kill time."""
    index = cluster.children(victim["worker"]).index(victim["pid"])
    cluster.kill(victim["worker"], child=index)
    return time.time()


def _talk_attempt(cluster: LocalCluster, task, run: str, job: str) -> str:
    """Ask for the job once more: ``ran``, ``skipped`` (run placement) or ``refused`` (slide placement)."""
    if task.mutex_on == "submit":
        sent = cluster.task(submit).delay(task.name, [run, job, 0.05]).get(timeout=30)
        return "refused" if sent is None else _outcome(cluster.task(task).AsyncResult(sent))
    return _outcome(cluster.task(task).apply_async((run, job, 0.05)))


def crash_talk(cluster: LocalCluster, *, placement: str = "submit", wait: float = 3.0) -> Measurement:
    """SIGKILL a holder of the talk's (repaired) mutex and ask for the same job again until it runs.

    ``"submit"`` (the slide): asked right after the kill and ``wait`` s later
    — refused both times, the node persistent — then the node is deleted by
    hand and the job runs. ``"run"``: the next run is skipped, and its own
    ``after_return`` deletes the orphan (the loser's-cleanup bug), so the run
    after it goes through. The value: seconds from the kill until the job ran.
    """
    if placement not in ("submit", "run"):
        raise ValueError("placement must be 'submit' (the slide) or 'run'")
    task = talk_export_slide if placement == "submit" else talk_export
    zk = cluster.zk()
    run, job = new_run(), f"nightly-{placement}"
    node = cluster.task(task)._get_node((run, job, 0.05), {})
    if placement == "submit":
        victim = _victim(cluster, run, lambda: cluster.task(submit).delay(task.name, [run, job, 60.0]).get(timeout=30))
    else:
        victim = _victim(cluster, run, lambda: cluster.task(task).apply_async((run, job, 60.0)))
    t_kill = _kill(cluster, victim)
    attempts: list[dict] = []

    def attempt(when: str) -> str:
        stat = zk.exists(node)
        outcome = _talk_attempt(cluster, task, run, job)
        attempts.append({"when": when, "after_s": round(time.time() - t_kill, 2), "outcome": outcome,
                         "node_there_before": stat is not None,
                         "node_persistent": stat is not None and stat.ephemeralOwner == 0})
        return outcome

    attempt("right after the crash")
    if placement == "submit":
        time.sleep(max(0.0, t_kill + wait - time.time()))
        attempt(f"{wait:.1f} s later")
        zk.delete(node)  # the manual cleanup: someone notices and deletes the node by hand
        freed_by = "hand"
        attempt("after deleting the node by hand")
    else:
        # the skipped run's after_return deletes the orphan right after it reports "skipped"
        poll_until(lambda: zk.exists(node) is None, 10, interval=0.01, what="the skipped run's after_return")
        freed_by = "a skipped run's after_return"
        attempt("the run after that")
    ran_at = next((a["after_s"] for a in attempts if a["outcome"] == "ran"), math.inf)
    return Measurement(f"talk's mutex ({placement})", "seconds until the job ran again after a crash", "s",
                       [ran_at], stat="last",
                       meta={"placement": placement, "node": node, "attempts": attempts, "freed_by": freed_by,
                             "wait": wait})


def crash_fixed(cluster: LocalCluster) -> Measurement:
    """SIGKILL a holder of the ephemeral lock; seconds until another worker holds it again."""
    r = cluster.redis_client()
    run, job = new_run(), "nightly"
    timeout = cluster.task(session_timeout).apply_async(queue=FAULT_QUEUE).get(timeout=30)
    victim = _victim(cluster, run, lambda: cluster.task(keyed_export).apply_async(
        (run, job, 60.0), queue=FAULT_QUEUE))
    t_kill = _kill(cluster, victim)
    cluster.task(keyed_export).apply_async((run, job, 0.05)).get(timeout=60)  # retries until the lock is free
    follower = _list(r, f"{_ns(run)}:intervals")[0]
    return Measurement("fix: ZooKeeper Lock", "seconds until the job ran again after a crash", "s",
                       [follower["start"] - t_kill], stat="last",
                       meta={"session_timeout_s": timeout, "victim_token": victim["token"],
                             "next_token": follower["token"], "next_worker": follower["worker"],
                             "retries": _tallies(r, run).get("retries", 0),
                             "freed_by": "ZooKeeper (session expired)"})


# --------------------------------------------------------------------------- fencing
def _fence(cluster: LocalCluster, flags: list[bool], hold: float) -> list[Measurement]:
    """One fencing run per flag, side by side: each A on its own w3 child, each B on w1/w2."""
    r, zk = cluster.redis_client(), cluster.zk()
    task = cluster.task(fenced_write)
    runs = []
    for fenced in flags:
        run = new_run()
        resource = f"account-{run}"
        runs.append({"fenced": fenced, "run": run, "resource": resource, "events": f"{_ns(run)}:events",
                     "lock_dir": task.lock_path((run, resource, "A", hold, fenced), {}), "kernel": [],
                     "a": task.apply_async((run, resource, "A", hold, fenced), queue=FAULT_QUEUE)})
    waiting = list(runs)

    def pause_new_holders() -> bool:  # 1. A holds the lock ... 2. ... and is paused mid-job, at once
        for x in list(waiting):
            events = _list(r, x["events"])
            if events:
                x["first"] = events[0]
                x["child"] = cluster.children("w3").index(x["first"]["pid"])
                cluster.pause("w3", child=x["child"])
                x["kernel"].append({"t": time.time(), "who": "A", "what": "paused"})
                waiting.remove(x)
        return not waiting

    try:
        poll_until(pause_new_holders, 30, interval=0.01, what="holder A to acquire the lock")
        if any(e["what"] == "write" for x in runs for e in _list(r, x["events"])):
            raise RuntimeError(f"A finished its {hold} s of work before the pause landed; raise hold")
    except Exception:
        for x in runs:
            if "child" in x:
                cluster.resume("w3", child=x["child"])
        raise
    for x in runs:  # 3. B waits for the lock, gets it when ZooKeeper expires A's session, and writes
        x["b"] = task.apply_async((x["run"], x["resource"], "B", 0.05, x["fenced"]))
    for x in runs:
        token = f"{x['first']['token']:010d}"
        poll_until(lambda x=x, token=token: not any(c.endswith(token) for c in zk.get_children(x["lock_dir"])),
                   60, interval=0.01, what="ZooKeeper to expire A's session")
        x["kernel"].append({"t": time.time(), "who": "A", "what": "session expired"})
    for x in runs:  # 4. A resumes and writes, still believing it holds the lock
        x["b_result"] = x["b"].get(timeout=60)
        x["kernel"].append({"t": time.time(), "who": "A", "what": "resumed"})  # stamped just before SIGCONT
        cluster.resume("w3", child=x["child"])
    out = []
    for x in runs:
        a = x["a"].get(timeout=60)
        events = sorted(_list(r, x["events"]) + x["kernel"], key=lambda e: e["t"])
        t0 = events[0]["t"]
        for e in events:
            e["t"] = round(e["t"] - t0, 3)
        final = (r.get(f"{_ns(x['run'])}:resource") or b"").decode()
        label = "fenced: writes carry the token" if x["fenced"] else "unfenced writes"
        out.append(Measurement(
            label, "stale writes accepted", "writes", [1 if a["accepted"] else 0], stat="sum",
            meta={"fenced": x["fenced"], "events": events, "final_value": final,
                  "b_write_accepted": bool(x["b_result"]["accepted"]),
                  "tokens": {"A": a["token"], "B": x["b_result"]["token"]},
                  "session_ms": x["first"]["session_ms"]}))
    return out


def fencing(cluster: LocalCluster, *, fenced: bool = True, hold: float = 1.0) -> Measurement:
    """A holder on w3 is paused past its session timeout; a second holder writes; the first resumes.

    The value is 1 if the paused holder's stale write was accepted, else 0;
    ``meta["events"]`` is the timeline (seconds from the first acquire).
    """
    return _fence(cluster, [fenced], hold)[0]


def compare_fencing(cluster: LocalCluster, *, hold: float = 1.0) -> Comparison:
    """The same pause, run twice side by side on w3's two children: unfenced writes vs token-carrying writes."""
    unfenced, fenced = _fence(cluster, [False, True], hold)
    return Comparison(unfenced, fenced, better="lower", title="a paused holder's stale write")


# --------------------------------------------------------------------------- keyed locks
def keyed(cluster: ClusterLike, *, keys: tuple[str, ...] = ("a", "b"), per_key: int = 3,
          seconds: float = 0.2, keyed: bool = True) -> Measurement:
    """``per_key`` exports for each key, all submitted at once, under the keyed lock (retry when busy).

    ``keyed=False`` uses :func:`unkeyed_export`: the same lock without
    ``mutex_keys``, so every key shares it. Values: the peak holders per key.
    """
    if len(keys) < 2 or per_key < 1:
        raise ValueError("keyed() needs at least two keys and one export per key")
    r = cluster.redis_client()
    run = new_run()
    task = cluster.task(keyed_export if keyed else unkeyed_export)
    t0 = time.time()
    results = [task.apply_async((run, f"{key}-{run}", seconds)) for _ in range(per_key) for key in keys]
    for res in results:
        res.get(timeout=60)
    wall = time.time() - t0
    intervals = _list(r, f"{_ns(run)}:intervals")
    per: dict[str, Any] = {}
    for key in keys:
        job = f"{key}-{run}"
        mine = sorted((iv for iv in intervals if iv["job"] == job), key=lambda iv: iv["start"])
        per[key] = {
            "peak": _int(r, f"{_ns(run)}:job:{job}:peak"),
            "intervals": [(iv["start"] - t0, iv["end"] - t0) for iv in mine],
            "span_s": mine[-1]["end"] - mine[0]["start"],
            "tokens": [iv["token"] for iv in mine],
        }
    span_all = max(iv["end"] for iv in intervals) - min(iv["start"] for iv in intervals)
    work = sum(iv["end"] - iv["start"] for iv in intervals)
    return Measurement("keyed lock" if keyed else "one lock for every key", "peak holders of one key", "holders",
                       [v["peak"] for v in per.values()], stat="max",
                       meta={"keys": per, "keyed": keyed, "wall_s": wall, "seconds": seconds, "per_key": per_key,
                             "peak_all_keys": _int(r, f"{_ns(run)}:all:peak"), "span_all_s": span_all,
                             "work_s": work,
                             "retries": _tallies(r, run).get("retries", 0)})


def redis_lock_note(r: Any, ttl: float = 0.3) -> dict:
    """redis-py's ``Lock`` on client ``r``: SET NX PX, token-checked release, expiry — and no fencing token."""
    from redis.exceptions import LockNotOwnedError  # noqa: PLC0415

    name = f"lk:mutex:note:{new_run()}"
    a = r.lock(name, timeout=ttl)
    b = r.lock(name, timeout=ttl)
    out: dict[str, Any] = {"a_acquired": a.acquire(blocking=False)}
    out["b_while_a_holds"] = b.acquire(blocking=False)
    time.sleep(ttl * 1.5)  # A stalls past its expiry (as if paused)
    out["a_still_owns"] = a.owned()
    out["b_after_expiry"] = b.acquire(blocking=False)
    out["tokens"] = [a.local.token.decode(), b.local.token.decode()]
    try:
        a.release()
        out["a_release"] = "deleted B's lock"
    except LockNotOwnedError:
        out["a_release"] = "LockNotOwnedError (token-checked)"
    b.release()
    return out


# --------------------------------------------------------------------------- claims
@claim("the slide's code as written runs the job once, then refuses it for good")
def slide_locks_itself_out(slide: Measurement) -> None:
    """First submission ran; every later one refused; the persistent node still there after each."""
    rows = slide.meta["attempts"]
    verify("the slide as written: the first submission runs, its after_return fails to delete the node, "
           "and every later submission is refused",
           len(rows) >= 2 and rows[0]["outcome"] == "ran"
           and all(row["outcome"] == "refused" for row in rows[1:])
           and all(row["node_after"] and row["node_persistent"] for row in rows),
           attempts=[(row["outcome"], row["node_after"]) for row in rows])


@claim("where the slide takes the mutex (in apply_async) it never lets two exports run at once")
def slide_placement_keeps_one_holder(slide: Measurement) -> None:
    """Every trial's peak is 1; every submission was sent, refused, or raised in the producer."""
    t = slide.meta["totals"]
    accounted = t.get("sent", -1) + t.get("refused", -1) + t.get("raised", -1)
    verify("in apply_async, the talk's mutex keeps one holder; a lost race raises in the producer",
           slide.value == 1 and accounted == t["submitted"] and t.get("ran") == t.get("sent"),
           peaks=slide.values, **t)


@claim("the talk's mutex at run time lets two or more exports of one job run at once; the fix never does")
def fix_keeps_one_holder(comparison: Comparison) -> None:
    """Before: peak >= 2 in at least half the trials. After: peak 1 in every trial, every task accounted for."""
    before_m, after_m = comparison.before, comparison.after
    verify("the talk's mutex, taken at run time, lets two or more exports run at once in at least "
           "half the trials",
           sum(p >= 2 for p in before_m.values) >= math.ceil(len(before_m.values) / 2),
           peaks=before_m.values)
    t = after_m.meta["totals"]
    verify("the fixed lock never has more than one holder, and every task ran or was skipped",
           all(p == 1 for p in after_m.values) and t["ran"] + t["skipped"] == t["submitted"],
           peaks=after_m.values, **t)


@claim("a crashed holder's ephemeral lock frees itself within a few session timeouts; the talk's node waits for a human")
def ephemeral_lock_frees_itself(fix: Measurement, talk: Measurement) -> None:
    """The fix runs again within 4x its session timeout; the talk's node still refuses work after that."""
    timeout = fix.meta.get("session_timeout_s", 0.0)
    refused_later = [a["after_s"] for a in talk.meta["attempts"]
                     if a["outcome"] == "refused" and a["node_persistent"]]
    verify("the ephemeral lock is held again within 4x the session timeout, freed by ZooKeeper",
           fix.meta["freed_by"].startswith("ZooKeeper") and 0 < fix.value <= 4 * timeout,
           ran_again_after_s=fix.value, session_timeout_s=timeout)
    verify("... while the talk's persistent node still refused the job later than that, until deleted by hand",
           talk.meta["freed_by"] == "hand" and bool(refused_later) and max(refused_later) > fix.value,
           refused_at_s=refused_later, fix_ran_again_after_s=fix.value)


@claim("with fencing tokens the paused holder's stale write is rejected; without them it overwrites B's")
def fencing_rejects_the_stale_write(comparison: Comparison) -> None:
    """Both runs follow the story; unfenced: A's stale write accepted, final 'A'; fenced: rejected, final 'B'."""
    for m in (comparison.before, comparison.after):
        t = {(e["who"], e["what"]): e["t"] for e in m.meta["events"]}
        verify("the timeline is the story: A paused, B held the lock and wrote, then A resumed and wrote",
               t[("A", "paused")] < t[("B", "acquired")] < t[("B", "write")] < t[("A", "resumed")]
               < t[("A", "write")] and m.meta["tokens"]["B"] > m.meta["tokens"]["A"],
               **{f"{who} {what}": v for (who, what), v in t.items()})
    unfenced, fenced = comparison.before, comparison.after
    verify("without fencing the stale write is accepted and overwrites B's",
           unfenced.value == 1 and unfenced.meta["final_value"] == "A", final=unfenced.meta["final_value"])
    verify("with fencing tokens the stale write is rejected and B's value stays",
           fenced.value == 0 and fenced.meta["final_value"] == "B" and fenced.meta["b_write_accepted"],
           final=fenced.meta["final_value"])


@claim("a keyed lock serialises each key and lets different keys run side by side")
def keyed_lock_serialises_each_key_only(m: Measurement) -> None:
    """Peak 1 for every key; two or more holders at once across the keys."""
    keys = m.meta["keys"]
    verify("the same key never has two holders", m.value == 1, **{f"peak {k}": v["peak"] for k, v in keys.items()})
    verify("different keys hold their locks at the same time", m.meta["peak_all_keys"] >= 2,
           peak_all_keys=m.meta["peak_all_keys"])


# --------------------------------------------------------------------------- plots
def plot_trials(measurements: list[Measurement], ax=None):
    """Peak concurrent holders per trial, one line per recipe."""
    from labkit.plots import per_trial  # noqa: PLC0415

    ax = per_trial(measurements, ax, title="peak holders of one mutex, per trial", limit=1)
    ax.set_ylim(0, max(max(m.values) for m in measurements) + 1.5)
    return ax


def plot_fencing(runs: list[Measurement], axes=None):
    """One timeline per fencing run: who held the lock, when A was paused, whose writes counted."""
    from labkit.plots import AFTER, BEFORE, panels  # noqa: PLC0415

    if axes is None:
        _, axes = panels(len(runs), width=6.0, height=2.6)
    for ax, m in zip(axes, runs, strict=True):
        res = m.meta
        ev = {(e["who"], e["what"]): e["t"] for e in res["events"]}
        end = max(e["t"] for e in res["events"]) + 0.2
        lanes = {"A": 1, "B": 0}
        ax.broken_barh([(ev[("A", "acquired")], ev[("A", "session expired")] - ev[("A", "acquired")])],
                       (0.8, 0.4), color="#8d96a3", label="lock node exists (ZooKeeper)")
        ax.broken_barh([(ev[("A", "paused")], ev[("A", "resumed")] - ev[("A", "paused")])],
                       (0.8, 0.4), facecolor="none", edgecolor="black", hatch="//", label="A paused (SIGSTOP)")
        ax.broken_barh([(ev[("B", "acquired")], ev[("B", "write")] - ev[("B", "acquired")] + 0.05)],
                       (-0.2, 0.4), color="#8d96a3")
        for e in res["events"]:
            y = lanes[e["who"]]
            if e["what"] == "write":
                ok, stale = e["accepted"], e["who"] == "A"
                colour = (BEFORE if ok else AFTER) if stale else AFTER  # a stale write that counts is the bug
                verdict = ("ACCEPTED" if stale else "accepted") if ok else "rejected"
                text = f"{'stale ' if stale else ''}write, token {e['token']}: {verdict}"
                ax.plot(e["t"], y, "o" if ok else "X", ms=11, color=colour)
                ax.annotate(text, (e["t"], y), xytext=(6, 9), textcoords="offset points", fontsize=8,
                            color=colour if stale else "black")
            elif e["what"] == "acquired":
                ax.annotate(f"acquired, token {e['token']}", (e["t"], y), xytext=(0, -24),
                            textcoords="offset points", fontsize=8)
        ax.set_yticks([0, 1], ["B (w1/w2)", "A (w3)"])
        ax.set_ylim(-0.6, 1.6)
        ax.set_xlim(-0.1, end + 0.6)
        ax.set_xlabel("seconds since A acquired")
        kind = "with fencing tokens" if res["fenced"] else "without fencing"
        ax.set_title(f"{kind}: final value = {res['final_value']!r}", fontsize=11, loc="left")
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(frameon=False, fontsize=8, loc="lower left")
    return axes


def plot_keyed(m: Measurement, ax=None):
    """Critical sections per key over time: each key's bars never overlap; the keys do."""
    from labkit.plots import NEUTRAL, panels  # noqa: PLC0415

    if ax is None:
        _, (ax,) = panels(1, width=7.0, height=2.4)
    keys = m.meta["keys"]
    for i, info in enumerate(keys.values()):
        ax.broken_barh([(s, e - s) for s, e in info["intervals"]], (i - 0.35, 0.7),
                       color=NEUTRAL[i % len(NEUTRAL)], edgecolor="white")
    ax.set_yticks(range(len(keys)), [f"key {k!r}" for k in keys])
    ax.set_xlabel("seconds since submission")
    ax.set_title(f"{m.label}: peak per key = {int(m.value)}, peak across keys = {m.meta['peak_all_keys']}",
                 fontsize=11, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    return ax
