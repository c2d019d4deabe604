"""Lesson 14 — a distributed mutex: the talk's recipe, measured broken; a ZooKeeper lock, measured correct.

The talk (slides 114–125) builds a "Celery Mutex": a task base class that asks
ZooKeeper ``exists(node)?`` and, if not, ``create(node)``; ``after_return``
deletes the node. Three things go wrong, and this module measures each one
on real workers:

1. **Check-then-act, and everybody cleans up.** Two workers can both see "no
   node"; the loser's ``create`` then fails — and its ``after_return``, like
   every task's, deletes whatever node is there, i.e. the *winner's*. The
   next contender finds the path free and starts while the winner is still
   running. Peak concurrent holders is counted by Redis (``INCR``/``DECR``
   around the critical section, the peak kept by a Lua script), never by
   reading logs.
2. **Persistent node.** A holder that is SIGKILLed never runs
   ``after_return``; its node stays and every later run is skipped until a
   human deletes it.
3. **No fencing.** Even a correct lock cannot stop a holder that was paused
   (GC, swap, SIGSTOP) past its session timeout from waking up and writing.
   Only the protected resource can refuse it, if every write carries a
   monotonically increasing token.

The fix, :class:`ZkMutexTask`, uses kazoo's :class:`~kazoo.recipe.lock.Lock`:
an *ephemeral sequential* node per contender (atomic, no check-then-act), the
path keyed by the task's ``mutex_keys`` arguments, released only by its owner
(each contender deletes only its own node), freed by ZooKeeper when the
owner's session expires, and the node's sequence number is a fencing token.

Kazoo clients are created per process, lazily, after the prefork fork
(:func:`labkit.app.zk_client`); nothing here opens a connection at import.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import time
import uuid
from typing import Any
from urllib.parse import quote

from celery import Task, shared_task

from labkit.app import redis_client, worker_name, zk_client
from labkit.measure import Comparison, Measurement

SKIPPED = "skipped"
TALK_ROOT = "/mutex/celery"  # the talk's path prefix
FIX_ROOT = "/labkit/mutex"
FAULT_QUEUE = "mutex-fault"  # served by w3 only: the worker we kill and pause

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
    for the talk's recipe and the fix, so the workloads are identical.
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
class TalkMutexTask(Task):
    """The talk's Celery Mutex, written fresh with the same logic.

    As on the slides: a persistent node at ``/mutex/celery/<task name>`` with
    the values of ``mutex_keys`` appended; ``exists()`` then ``create()``;
    ``after_return`` deletes the node if it exists, whoever made it. Two
    repairs only, so that it runs at all: a real kazoo client instead of
    ``client = None``, and ``after_return`` with Celery's signature (the
    slide's ``*args`` would hand ``_get_node`` the status and return value).

    ``mutex_on`` says where ``mutex()`` is called:

    * ``"submit"`` — the slide: ``apply_async`` checks and creates in the
      caller and sends the task only if it got the node;
    * ``"run"`` — the same ``mutex()`` when the task starts on a worker,
      the usual way such a decorator ends up being used (and the only way to
      guard a task that is already queued or delivered twice).
    """

    abstract = True
    mutex_keys: tuple[str, ...] = ()
    mutex_on: str = "run"

    def _get_node(self, args: tuple, kwargs: dict) -> str:
        lock_node = f"{TALK_ROOT}/{self.name}"
        items = inspect.getcallargs(self.run, *args, **kwargs)
        for value in (items[x] for x in self.mutex_keys if items.get(x)):
            lock_node += value
        return lock_node

    @contextlib.contextmanager
    def mutex(self, args: tuple, kwargs: dict):
        client = zk_client()
        success = False
        lock_node = self._get_node(args, kwargs)
        if not client.exists(lock_node):
            success = True
        if success:
            client.create(lock_node, makepath=True)  # raises NodeExistsError if someone got there first
            yield True
        else:
            yield False

    def apply_async(self, args=None, kwargs=None, **options):
        if self.mutex_on != "submit":
            return super().apply_async(args, kwargs, **options)
        with self.mutex(args or (), kwargs or {}) as mutex_acquired:
            if mutex_acquired:
                return super().apply_async(args, kwargs, **options)
        return None

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


@shared_task(base=TalkMutexTask, name="mutex.talk_export", mutex_keys=("job",))
def talk_export(run: str, job: str, seconds: float) -> dict:
    """Build one export (the talk's ``build_exports(schedule_id)``), guarded by the talk's mutex."""
    return critical_section(run, job, seconds)


@shared_task(base=TalkMutexTask, name="mutex.talk_export_slide", mutex_keys=("job",), mutex_on="submit")
def talk_export_slide(run: str, job: str, seconds: float) -> dict:
    """The same export with the mutex taken in ``apply_async``, exactly where the slide takes it."""
    return critical_section(run, job, seconds)


@shared_task(name="mutex.submit")
def submit(task_name: str, args: list, queue: str | None = None) -> str | None:
    """A producer running on a worker: ``apply_async`` as application code calls it.

    Returns the task id, or ``None`` when the slide's mutex refused to send it.
    """
    from celery import current_app  # noqa: PLC0415

    result = current_app.tasks[task_name].apply_async(tuple(args), queue=queue)
    return result.id if result is not None else None


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

    abstract = True
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


# --------------------------------------------------------------------------- cluster layout
def workers(session_timeout: float = 1.0) -> list[dict]:
    """w1, w2: the contenders (prefork -c2, default 10 s sessions). w3: the victim.

    w3 serves :data:`FAULT_QUEUE` with two children and a short ZooKeeper session
    (``LABKIT_ZK_SESSION_TIMEOUT``), so a crash or a pause costs only about
    ``session_timeout`` seconds before ZooKeeper gives its lock away.
    """
    return [
        {"name": "w1"},
        {"name": "w2"},
        {"name": "w3", "queues": [FAULT_QUEUE], "concurrency": 2,
         "env": {"LABKIT_ZK_SESSION_TIMEOUT": str(session_timeout)}},
    ]


# --------------------------------------------------------------------------- kernel side
def new_run() -> str:
    return uuid.uuid4().hex[:8]


def _wait(predicate, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(interval)


def _int(r, key: str) -> int:
    return int(r.get(key) or 0)


def _list(r, key: str) -> list[dict]:
    return [json.loads(x) for x in r.lrange(key, 0, -1)]


def warm_up(cluster, n: int = 12) -> None:
    """Open every pool child's kazoo and Redis clients before measuring (first use costs ~50 ms)."""
    task = cluster.task(fixed_export)
    results = [task.apply_async((new_run(), f"warm{i}", 0.05)) for i in range(n)]
    for res in results:
        res.get(timeout=30)


def _trial(cluster, task, contenders: int, seconds: float) -> dict:
    """Submit ``contenders`` copies of one export at once; count what the system saw."""
    r = cluster.redis_client()
    run = new_run()
    job = f"report-{run}"
    sent = cluster.task(task)
    t0 = time.perf_counter()
    results = [sent.apply_async((run, job, seconds)) for _ in range(contenders)]
    outcomes = {"ran": 0, "skipped": 0, "failed": 0}
    errors: set[str] = set()
    for res in results:
        value = res.get(timeout=60, propagate=False)
        if res.failed():
            outcomes["failed"] += 1
            errors.add(type(value).__name__)
        elif value == SKIPPED:
            outcomes["skipped"] += 1
        else:
            outcomes["ran"] += 1
    tallies = {k.decode(): int(v) for k, v in r.hgetall(f"{_ns(run)}:tally").items()}
    return {
        "run": run, "submitted": contenders, **outcomes, "errors": sorted(errors),
        "peak": _int(r, f"{_ns(run)}:job:{job}:peak"),
        "loser_deletes": tallies.get("loser_deletes", 0),
        "elapsed": time.perf_counter() - t0,
    }


def run_trials(cluster, task, label: str, *, trials: int, contenders: int, seconds: float) -> Measurement:
    """Peak concurrent holders per trial for ``task`` (a Measurement; stat = max)."""
    rows = [_trial(cluster, task, contenders, seconds) for _ in range(trials)]
    return Measurement(
        label, "peak concurrent holders", "holders", [row["peak"] for row in rows], stat="max",
        meta={"trials": rows, "contenders": contenders, "seconds": seconds,
              "totals": {k: sum(row[k] for row in rows)
                         for k in ("submitted", "ran", "skipped", "failed", "loser_deletes")}},
    )


def before(cluster, trials: int = 6, contenders: int = 12, seconds: float = 0.2) -> Measurement:
    """The talk's recipe: ``contenders`` exports of the same job submitted at once, per trial."""
    return run_trials(cluster, talk_export, "talk's recipe", trials=trials,
                               contenders=contenders, seconds=seconds)


def after(cluster, trials: int = 6, contenders: int = 12, seconds: float = 0.2) -> Measurement:
    """The same workload under :class:`ZkMutexTask` (skip when busy)."""
    return run_trials(cluster, fixed_export, "fix: ZooKeeper Lock", trials=trials,
                               contenders=contenders, seconds=seconds)


def compare(before_m: Measurement, after_m: Measurement) -> Comparison:
    return Comparison(before_m, after_m, better="lower", title="peak concurrent holders of one mutex")


def _victim(cluster, task, run: str, job: str, queue: str | None = None, hold: float = 60.0) -> dict:
    """Start a long export and return its ``entered`` record (pid, worker) once it holds the lock."""
    r = cluster.redis_client()
    cluster.task(task).apply_async((run, job, hold), queue=queue)
    entered = _wait(lambda: _list(r, f"{_ns(run)}:entered"), 30, "the victim to enter its critical section")
    return entered[0]


def _kill(cluster, victim: dict) -> float:
    """SIGKILL the pool process that runs ``victim`` (via the cluster); return the kill time."""
    index = cluster.children(victim["worker"]).index(victim["pid"])
    cluster.kill(victim["worker"], child=index)
    return time.time()


def _talk_attempt(cluster, task, run: str, job: str) -> str:
    """Ask for the job once more: ``ran``, ``skipped`` (run placement) or ``refused`` (slide placement)."""
    if task.mutex_on == "submit":
        sent = cluster.task(submit).apply_async((task.name, [run, job, 0.05])).get(timeout=30)
        if sent is None:
            return "refused"
        outcome = cluster.task(task).AsyncResult(sent).get(timeout=30)
    else:
        outcome = cluster.task(task).apply_async((run, job, 0.05)).get(timeout=30)
    return outcome if outcome == SKIPPED else "ran"


def crash_talk(cluster, wait: float = 3.0) -> dict:
    """SIGKILL a holder of the talk's mutex, in both placements, and ask for the same job again.

    ``"submit"`` (the slide): every later submission is refused, right away
    and ``wait`` s later, until the node is deleted by hand. ``"run"``: the
    next run is skipped — and its own ``after_return`` deletes the orphan
    (the loser's-cleanup bug again), so the run after it goes through.
    """
    zk = cluster.zk()
    r = cluster.redis_client()
    out: dict[str, Any] = {}
    for placement, task in (("submit", talk_export_slide), ("run", talk_export)):
        run, job = new_run(), f"nightly-{placement}"
        node = cluster.task(task)._get_node((run, job, 0.05), {})
        if placement == "submit":
            cluster.task(submit).apply_async((task.name, [run, job, 60.0])).get(timeout=30)
            victim = _wait(lambda run=run: _list(r, f"{_ns(run)}:entered"), 30, "the holder to start")[0]
        else:
            victim = _victim(cluster, task, run, job)
        t_kill = _kill(cluster, victim)
        attempts = []

        def record(when: str, outcome: str, node_before, t_kill=t_kill, attempts=attempts) -> None:
            attempts.append({"when": when, "after_s": round(time.time() - t_kill, 2), "outcome": outcome,
                             "node_there_before": node_before is not None,
                             "node_persistent": node_before is not None and node_before.ephemeralOwner == 0})

        stat = zk.exists(node)
        record("right after the crash", _talk_attempt(cluster, task, run, job), stat)
        if placement == "submit":
            time.sleep(max(0.0, t_kill + wait - time.time()))
            stat = zk.exists(node)
            record(f"{wait:g} s later", _talk_attempt(cluster, task, run, job), stat)
            zk.delete(node)  # the manual cleanup: someone notices and deletes the node by hand
            record("after deleting the node by hand", _talk_attempt(cluster, task, run, job), None)
        else:
            # the skipped run's after_return deletes the orphan right after it reports "skipped"
            _wait(lambda node=node: zk.exists(node) is None, 10, "the skipped run's after_return")
            record("the run after that", _talk_attempt(cluster, task, run, job), None)
        out[placement] = {"node": node, "attempts": attempts}
    return out


def crash_fixed(cluster) -> dict:
    """SIGKILL a holder of the ephemeral lock; time until another worker holds it again."""
    r = cluster.redis_client()
    run, job = new_run(), "nightly"
    timeout = cluster.task(session_timeout).apply_async(queue=FAULT_QUEUE).get(timeout=30)
    victim = _victim(cluster, keyed_export, run, job, queue=FAULT_QUEUE)
    t_kill = _kill(cluster, victim)
    res = cluster.task(keyed_export).apply_async((run, job, 0.05))  # retries until the lock is free
    res.get(timeout=60)
    follower = [iv for iv in _list(r, f"{_ns(run)}:intervals")][0]
    tallies = {k.decode(): int(v) for k, v in r.hgetall(f"{_ns(run)}:tally").items()}
    return {"session_timeout_s": timeout, "victim_token": victim["token"], "next_token": follower["token"],
            "reacquired_after_s": follower["start"] - t_kill, "retries": tallies.get("retries", 0),
            "next_worker": follower["worker"]}


def fencing(cluster, fenced: bool, hold: float = 1.0) -> dict:
    """A holder on w3 is paused past its session timeout; a second holder writes; the first resumes.

    Returns the event timeline (seconds from the first acquire) and the
    protected resource's final value.
    """
    r = cluster.redis_client()
    zk = cluster.zk()
    run = new_run()
    resource = f"account-{run}"
    events_key = f"{_ns(run)}:events"
    task = cluster.task(fenced_write)
    lock_dir = task.lock_path((run, resource, "A", hold, fenced), {})
    kernel: list[dict] = []

    res_a = task.apply_async((run, resource, "A", hold, fenced), queue=FAULT_QUEUE)
    first = _wait(lambda: _list(r, events_key), 30, "holder A to acquire the lock")[0]
    index = cluster.children("w3").index(first["pid"])
    cluster.pause("w3", child=index)
    kernel.append({"t": time.time(), "who": "A", "what": "paused"})
    if any(e["what"] == "write" for e in _list(r, events_key)):
        cluster.resume("w3", child=index)
        raise RuntimeError(f"A finished its {hold} s of work before the pause landed; raise hold")
    res_b = task.apply_async((run, resource, "B", 0.05, fenced))  # on w1/w2: waits for the lock
    _wait(lambda: not any(c.endswith(f"{first['token']:010d}") for c in zk.get_children(lock_dir)),
          60, "ZooKeeper to expire A's session")
    kernel.append({"t": time.time(), "who": "A", "what": "session expired"})
    b = res_b.get(timeout=60)
    kernel.append({"t": time.time(), "who": "A", "what": "resumed"})  # stamped just before SIGCONT
    cluster.resume("w3", child=index)
    a = res_a.get(timeout=60)
    events = sorted(_list(r, events_key) + kernel, key=lambda e: e["t"])
    t0 = events[0]["t"]
    for e in events:
        e["t"] = round(e["t"] - t0, 3)
    final = (r.get(f"{_ns(run)}:resource") or b"").decode()
    return {"fenced": fenced, "events": events, "final_value": final,
            "stale_write_accepted": bool(a["accepted"]), "b_write_accepted": bool(b["accepted"]),
            "tokens": {"A": a["token"], "B": b["token"]}, "session_ms": first["session_ms"]}


def keyed(cluster, keys: tuple[str, ...] = ("a", "b"), per_key: int = 3, seconds: float = 0.3) -> dict:
    """``per_key`` exports for each key, all submitted at once, under the keyed lock (retry when busy)."""
    r = cluster.redis_client()
    run = new_run()
    task = cluster.task(keyed_export)
    t0 = time.time()
    results = [task.apply_async((run, f"{key}-{run}", seconds)) for _ in range(per_key) for key in keys]
    for res in results:
        res.get(timeout=60)
    wall = time.time() - t0
    intervals = _list(r, f"{_ns(run)}:intervals")
    out: dict[str, Any] = {"keys": {}, "wall_s": wall, "seconds": seconds, "per_key": per_key,
                           "peak_all_keys": _int(r, f"{_ns(run)}:all:peak"), "t0": t0}
    for key in keys:
        job = f"{key}-{run}"
        mine = sorted((iv for iv in intervals if iv["job"] == job), key=lambda iv: iv["start"])
        out["keys"][key] = {
            "peak": _int(r, f"{_ns(run)}:job:{job}:peak"),
            "intervals": [(iv["start"] - t0, iv["end"] - t0) for iv in mine],
            "span_s": mine[-1]["end"] - mine[0]["start"],
            "tokens": [iv["token"] for iv in mine],
        }
    out["span_all_s"] = max(iv["end"] for iv in intervals) - min(iv["start"] for iv in intervals)
    tallies = {k.decode(): int(v) for k, v in r.hgetall(f"{_ns(run)}:tally").items()}
    out["retries"] = tallies.get("retries", 0)
    return out


def redis_lock_note(cluster, ttl: float = 0.3) -> dict:
    """redis-py's ``Lock`` from the kernel: SET NX PX, token-checked release, expiry — and no fencing token."""
    from redis.exceptions import LockNotOwnedError  # noqa: PLC0415

    r = cluster.redis_client()
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


class Table:
    """Rows of dicts shown as an HTML table in a notebook (and as text elsewhere)."""

    def __init__(self, rows: list[dict], columns: list[str] | None = None) -> None:
        self.rows = rows
        self.columns = columns or (list(rows[0]) if rows else [])

    def _cell(self, value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.2f}"
        if isinstance(value, list | tuple):
            return ", ".join(map(str, value))
        return str(value)

    def __repr__(self) -> str:
        lines = [" | ".join(self.columns)]
        lines += [" | ".join(self._cell(row.get(c, "")) for c in self.columns) for row in self.rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html  # noqa: PLC0415

        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(self._cell(row.get(c, '')))}</td>" for c in self.columns) + "</tr>"
            for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------- plots
def plot_trials(before_m: Measurement, after_m: Measurement, ax=None):
    """Peak concurrent holders per trial, talk's recipe vs the fix."""
    from labkit.plots import per_trial  # noqa: PLC0415

    ax = per_trial([before_m, after_m], ax, title="peak holders of one mutex, per trial", limit=1)
    ax.set_ylim(0, max(before_m.values + [2]) + 0.5)
    return ax


def plot_fencing(results: list[dict], axes=None):
    """One timeline per fencing run: who held the lock, when A was paused, whose writes counted."""
    from labkit.plots import AFTER, BEFORE, panels  # noqa: PLC0415

    if axes is None:
        _, axes = panels(len(results), width=6.0, height=2.6)
    for ax, res in zip(axes, results, strict=True):
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
                text = f"{'stale ' if stale else ''}write, token {e['token']}: {('ACCEPTED' if stale else 'accepted') if ok else 'rejected'}"
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


def plot_keyed(result: dict, ax=None):
    """Critical sections per key over time: each key's bars never overlap; the keys do."""
    from labkit.plots import NEUTRAL, panels  # noqa: PLC0415

    if ax is None:
        _, (ax,) = panels(1, width=7.0, height=2.4)
    for i, info in enumerate(result["keys"].values()):
        ax.broken_barh([(s, e - s) for s, e in info["intervals"]], (i - 0.35, 0.7),
                       color=NEUTRAL[i % len(NEUTRAL)], edgecolor="white")
    keys = list(result["keys"])
    ax.set_yticks(range(len(keys)), [f"key {k!r}" for k in keys])
    ax.set_xlabel("seconds since submission")
    ax.set_title(f"keyed lock: peak per key = {max(v['peak'] for v in result['keys'].values())}, "
                 f"peak across keys = {result['peak_all_keys']}", fontsize=11, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    return ax
