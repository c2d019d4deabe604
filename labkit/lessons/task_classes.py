"""Lesson 04: task base classes — one connection per process, and the handlers that really run.

The 2014 talk (slides 45–53) recommends an "abstract" base class for tasks
that share boilerplate: a database connection created lazily in a ``db``
property, and custom handlers. The slide is ``SLIDE`` below, as printed
(``Database.connect()`` and ``send_email()`` are its stand-ins);
:func:`run_the_slide` executes it.

What this module measures, with the cluster's Redis standing in for "the
database" (each connection is a named Redis client, so Redis itself counts
them: ``INFO stats`` ``total_connections_received`` and ``CLIENT LIST``):

* **Connections.** A task that connects on every call opens one connection
  per task; a lazy ``db`` property cached on the base class opens one per
  pool child, because each child runs its first task after the pool forked
  it. The slide caches it on ``self`` — the task instance, one per task type
  in each process — which opens one per task type per child.
* **Connected before the fork.** The same property, but the connection made
  at import time in the worker's main process (a module-level ``db =
  connect()``): every pool child inherits the *same socket*, their requests
  interleave on it, and a child reads a reply meant for another one. Each
  task sends ``ECHO <its own token>`` and counts the answers that are not its
  token.
* **Handlers.** A probe base class counts every call of ``on_success``,
  ``on_failure``, ``on_retry``, ``after_return`` and of the slide's
  ``after_failure`` (which Celery never calls: it is not a handler name),
  plus the ``task_failure`` signal, across five fates of a task: success,
  exception, one retry, SIGKILL of the pool child, hard time limit.

Celery facts this rests on (read in the installed Celery 5.7 source):
``celery/app/trace.py`` calls ``on_failure`` / ``on_retry`` from the pool child
and ``after_return`` only for SUCCESS and FAILURE (``IGNORE_STATES`` holds
RETRY); ``celery/worker/request.py`` ``on_timeout`` calls ``on_failure`` and
``after_return`` *in the worker's main process* for a hard time limit, while a
child lost to SIGKILL (``WorkerLostError``) gets only ``mark_as_failure`` and
the ``task_failure`` signal — no handler at all. ``Task.abstract`` is a
leftover class attribute ("Deprecated attribute ``abstract`` here for
compatibility") that nothing reads since Celery 4.0 stopped registering task
classes through a metaclass.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

from celery import Task, shared_task
from celery.signals import task_failure, task_postrun, worker_process_init

from labkit.app import redis_client, redis_url, worker_name
from labkit.measure import Comparison, Measurement, claim, verify
from labkit.poll import poll_until
from labkit.table import Table

if TYPE_CHECKING:  # pragma: no cover - workers import this module: keep it light
    from labkit.client import ClusterLike
    from labkit.cluster import LocalCluster

NOTEBOOK = "04_task_classes.ipynb"

DB_NAME = "lesson04-db"  # the client name every "database" connection carries (CLIENT LIST shows it)
CONNECT_AT_IMPORT = "LABKIT_LESSON04_CONNECT_AT_IMPORT"  # set only on the worker that shows the pitfall
CONNECT_IN_CHILD = "LABKIT_LESSON04_CONNECT_IN_CHILD"  # set only on the worker of the exercise's solution
FORKED_QUEUE = "lesson04-forked"  # that worker's queue
FORKED_WORKER = "forked"
SLIDE_ROUNDS = 5  # the slide's run sends each of its two task types in this many batches, alternately
CASES = ("success", "failure", "retry", "sigkill", "time_limit")
HANDLERS = ("after_failure", "on_failure", "on_retry", "on_success", "after_return", "task_failure")


def cluster_config(concurrency: int = 2) -> dict[str, Any]:
    """One prefork worker ``w1`` with ``concurrency`` pool children; no ZooKeeper."""
    return {"workers": [{"name": "w1", "concurrency": concurrency}], "zookeeper": 0}


CLUSTER = cluster_config()
WORKSHOP = {"N": 400, "CONCURRENCY": 4}


# ----------------------------------------------------------------------------- "the database"
def connect(owner: str = "base"):
    """``Database.connect()``: one plain connection (a single-connection Redis client).

    Like most database drivers' connection objects it owns exactly one
    socket and does not notice a ``fork()``; redis-py's default *pooled*
    client would (its pool checks the pid and reconnects in a child). The
    connection is named ``lesson04-db-<owner>-<worker>-<pid that connected>``
    so that Redis's ``CLIENT LIST`` tells who opened it (a reconnect names the process that
    reconnected: a child that dropped an inherited socket carries its own pid).
    """
    import redis  # noqa: PLC0415

    prefix = f"{DB_NAME}-{owner}-{worker_name() or 'kernel'}"

    def named_by_connecting_process(conn) -> None:  # every (re)connect, in the process making it
        conn.client_name = f"{prefix}-{os.getpid()}"
        conn.on_connect()

    return redis.Redis.from_url(redis_url(), single_connection_client=True, socket_timeout=1.0,
                                retry_on_timeout=False, redis_connect_func=named_by_connecting_process)


class SlideDBTask(Task):
    """The slide's lazy property, as written: it caches the connection on ``self``.

    ``self`` is the task: Celery keeps one instance per task *type* in each
    process, so every task type on this base opens its own connection in
    every pool child.
    """

    _db = None

    @property
    def db(self):
        if self._db is None:
            self._db = connect("slide")
        return self._db


class DBTask(Task):
    """The base class to copy: one lazy connection per process, shared by every task on it, and a real handler.

    ``DBTask._db`` starts as ``None``; the first task a process runs creates
    the connection and stores it *on the base class*, so every later task of
    any type in that process reuses it. In a prefork worker that first task
    runs in a pool child, after the fork: one connection per child. No
    ``abstract = True``: Celery 4+ never registers a base class as a task.
    """

    _db = None

    @property
    def db(self):
        if DBTask._db is None:
            DBTask._db = connect()
        return DBTask._db

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # a real handler name
        redis_client().incr("lesson04:alerts")  # stands in for send_email('The task failed!')


if os.environ.get(CONNECT_AT_IMPORT) == "1":
    # The pitfall, on purpose and only in the worker started with this variable:
    # a module-level connection, made while the worker imports its tasks — in the
    # main process, before the prefork pool forks its children.
    DBTask._db = connect()


@worker_process_init.connect
def _connect_in_each_child(**_: Any) -> None:
    """The other fix: connect in each pool child right after the fork (only where asked to)."""
    if os.environ.get(CONNECT_IN_CHILD) == "1":
        DBTask._db = connect()


# ----------------------------------------------------------------------------- tasks
@shared_task(name="task_classes.per_call")
def per_call(key: str) -> int:
    """Before: connect, use, close — on every call."""
    db = connect("call")
    try:
        return db.incr(key)
    finally:
        db.close()


@shared_task(base=DBTask, bind=True, name="task_classes.lazy")
def lazy(self, key: str) -> int:
    """After: the same work through the base class's lazy, per-process ``self.db``."""
    return self.db.incr(key)


@shared_task(base=SlideDBTask, bind=True, name="task_classes.slide_get")
def slide_get(self, key: str) -> int:
    """The slide's property, task type one."""
    return self.db.incr(key)


@shared_task(base=SlideDBTask, bind=True, name="task_classes.slide_put")
def slide_put(self, key: str) -> int:
    """The slide's property, task type two (same work)."""
    return self.db.incr(key)


@shared_task(name="task_classes.no_db")
def no_db(key: str) -> int:
    """Control: a task that touches no database (Celery's own connections only)."""
    return len(key)


@shared_task(base=DBTask, bind=True, name="task_classes.echo")
def echo(self, run: str, rounds: int) -> dict[str, int]:
    """Send ``rounds`` ECHOs of this task's own tokens through ``self.db``; count wrong answers.

    The counts go to Redis through the kit's per-process client
    (:func:`labkit.app.redis_client`), never through ``self.db``.
    """
    mixed = errors = 0
    for i in range(rounds):
        token = f"{self.request.id}:{i}"
        try:
            reply = self.db.echo(token)
        except Exception:  # noqa: BLE001 - a protocol error or a timeout: the stream is out of step
            errors += 1
            continue
        if reply != token.encode():
            mixed += 1
    r = redis_client()
    pipe = r.pipeline()
    pipe.hincrby(f"{run}:echo", "mixed", mixed)
    pipe.hincrby(f"{run}:echo", "errors", errors)
    pipe.hincrby(f"{run}:echo", "rounds", rounds)
    pipe.sadd(f"{run}:pids", os.getpid())
    pipe.execute()
    return {"mixed": mixed, "errors": errors}


# ----------------------------------------------------------------------------- handlers
def _where() -> str:
    """``"child"`` in a prefork pool child, ``"main"`` in the worker's main process."""
    from billiard.process import current_process  # noqa: PLC0415

    return "main" if current_process().name == "MainProcess" else "child"


def _count(kwargs: dict | None, handler: str) -> None:
    kwargs = kwargs or {}
    run, case = kwargs.get("run"), kwargs.get("case")
    if run and case:
        redis_client().hincrby(f"{run}:calls", f"{case}|{handler}|{_where()}", 1)


class HandlerProbe(Task):
    """A base class that defines every handler name — and the slide's ``after_failure`` — and counts calls."""

    def after_failure(self, *args, **kwargs) -> None:  # the slide's name: not a Celery handler
        _count(kwargs or (args[3] if len(args) > 3 else None), "after_failure")

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        _count(kwargs, "on_failure")

    def on_retry(self, exc, task_id, args, kwargs, einfo) -> None:
        _count(kwargs, "on_retry")

    def on_success(self, retval, task_id, args, kwargs) -> None:
        _count(kwargs, "on_success")

    def after_return(self, status, retval, task_id, args, kwargs, einfo) -> None:
        _count(kwargs, "after_return")


@shared_task(base=HandlerProbe, bind=True, name="task_classes.fate")
def fate(self, *, run: str, case: str) -> str:
    """One task meeting one fate: ``success``, ``failure``, ``retry`` (once), ``sigkill`` or ``time_limit``."""
    if case == "failure":
        raise ValueError("the task failed")
    if case == "retry" and self.request.retries == 0:
        # Not countdown=0: the retried attempt could then finish before this one records RETRY,
        # and the backend's guard (read the state; skip if SUCCESS; else write) is a check-then-
        # act race: RETRY overwrote SUCCESS for good in about one run in ten under load.
        raise self.retry(countdown=1)
    if case in ("sigkill", "time_limit"):
        redis_client().set(f"{run}:pid", os.getpid())
        time.sleep(60)  # killed long before: by the notebook, or by the hard time limit
    return case


@task_failure.connect
def _on_task_failure(sender=None, kwargs=None, **_: Any) -> None:
    if getattr(sender, "name", "") == fate.name:
        _count(kwargs, "task_failure")
        _settled(kwargs, "failure")


@task_postrun.connect
def _on_task_postrun(sender=None, kwargs=None, state=None, **_: Any) -> None:
    if getattr(sender, "name", "") == fate.name and state in ("SUCCESS", "FAILURE"):
        _settled(kwargs, "postrun")


def _settled(kwargs: dict | None, signal: str) -> None:
    """Mark a case as finished: every handler that will run for it has run."""
    kwargs = kwargs or {}
    if kwargs.get("run") and kwargs.get("case"):
        redis_client().sadd(f"{kwargs['run']}:settled", f"{kwargs['case']}|{signal}|{_where()}")


# ----------------------------------------------------------------------------- experiments
def _redis_stats(r: Any, worker: str = "", owner: str = "") -> tuple[int, list[int]]:
    """(connections Redis has accepted so far, pids that opened the live database connections).

    Only the connections of ``worker`` / ``owner`` when given. Reuse one
    client ``r`` for every reading: a new client is itself a new connection.
    """
    total = int(r.info("stats")["total_connections_received"])
    pids = []
    for c in r.client_list():
        parts = c.get("name", "").split("-")  # lesson04, db, owner, worker, pid
        if parts[:2] == DB_NAME.split("-") and len(parts) == 5 and worker in ("", parts[3]) \
                and owner in ("", parts[2]):
            pids.append(int(parts[4]))
    return total, sorted(pids)


def _batch(cluster: ClusterLike, task: Any, args_list: list[tuple], queue: str | None = None,
           timeout: float = 60.0) -> list[Any]:
    opts = {"queue": queue} if queue else {}
    results = [cluster.task(task).apply_async(args, **opts) for args in args_list]
    return [r.get(timeout=timeout) for r in results]


def fresh_worker(cluster: LocalCluster, name: str = "w1") -> None:
    """Restart a worker so its pool children start with no connection (the slide's ``_db is None``)."""
    cluster.restart(name)


def connections(cluster: LocalCluster, style: str = "per_call", *, n: int = 200,
                fresh: bool = True, label: str | None = None) -> Measurement:
    """Connections Redis accepted while ``n`` tasks each did one database call in ``style``.

    ``style`` is ``per_call`` (connect on every call), ``slide`` (the
    slide's property, cached per task type) or ``lazy`` (:class:`DBTask`,
    one per process). The slide's ``n`` tasks are two task types, sent in
    ``2 * SLIDE_ROUNDS`` awaited batches that take turns: the pool hands
    tasks to its children in turn, so types strictly alternating task by
    task could each land on one child and hide the cost. With ``fresh`` the
    worker is restarted first, so no child holds a connection yet. Before
    measuring, a warm-up batch of ``no_db`` tasks lets every child open
    Celery's own connections, and a control batch of ``no_db`` tasks (a
    quarter of ``n``, at least 50) measures what Celery alone opens meanwhile
    (``meta["control"]``, expected 0).
    """
    tasks = {"per_call": [per_call], "slide": [slide_get, slide_put], "lazy": [lazy]}
    if style not in tasks:
        raise ValueError(f"style must be one of {sorted(tasks)}, not {style!r}")
    if fresh:
        fresh_worker(cluster)
    key = f"lesson04:{uuid.uuid4().hex[:8]}"
    concurrency = cluster.workers["w1"].spec.concurrency
    _batch(cluster, no_db, [(key,)] * (4 * concurrency))  # warm-up: Celery's own connections
    r = cluster.redis_client()
    control_n = max(50, n // 4)
    t0, _ = _redis_stats(r)
    _batch(cluster, no_db, [(key,)] * control_n)
    t1, _ = _redis_stats(r)
    start = time.perf_counter()
    types = tasks[style]
    step = max(1, n // (2 * SLIDE_ROUNDS)) if len(types) > 1 else n
    for batch, first in enumerate(range(0, n, step)):  # the slide's types take turns, batch by batch
        _batch(cluster, types[batch % len(types)], [(key,)] * min(step, n - first))
    seconds = time.perf_counter() - start
    t2, live = _redis_stats(r, "w1", {"per_call": "call", "slide": "slide", "lazy": "base"}[style])
    done = int(r.get(key) or 0)
    r.delete(key)
    r.close()
    default = {"per_call": "before: connect per call", "slide": "talk: lazy db per task type",
               "lazy": "after: lazy db per process"}[style]
    return Measurement(label or default, "connections opened", "connections", [t2 - t1], stat="sum",
                       meta={"style": style, "n": n, "concurrency": concurrency, "task_types": len(types),
                             "control": t1 - t0, "control_n": control_n, "live_db_connections": len(live),
                             "live_db_pids": live,
                             "done": done, "seconds": seconds})


def forked_connection(cluster: LocalCluster, where: str = "before_fork", *, n: int = 200,
                      rounds: int = 20, concurrency: int = 2, label: str | None = None) -> Measurement:
    """Replies that went to the wrong pool child, over ``n`` tasks of ``rounds`` ECHOs each.

    ``where="before_fork"`` runs the tasks on a worker started to make the
    connection at import time (in its main process, before the pool forked);
    ``where="after_fork"`` on ``w1``, whose children make it lazily;
    ``where="process_init"`` on a worker whose children make it in Celery's
    ``worker_process_init`` signal, right after the fork. All run the same
    task code from the same base class, with ``concurrency`` children.
    ``meta["connection_pids"]`` lists the processes that opened the
    worker's live database connections (Redis ``CLIENT LIST``).
    """
    envs = {"before_fork": {CONNECT_AT_IMPORT: "1"}, "process_init": {CONNECT_IN_CHILD: "1"}}
    if where not in (*envs, "after_fork"):
        raise ValueError(f"where must be one of {sorted([*envs, 'after_fork'])}, not {where!r}")
    worker, queue = ("w1", None) if where == "after_fork" else (FORKED_WORKER, FORKED_QUEUE)
    if where == "after_fork" and cluster.workers["w1"].spec.concurrency != concurrency:
        raise ValueError(f"w1 runs {cluster.workers['w1'].spec.concurrency} children, not {concurrency}")
    if where != "after_fork":
        if FORKED_WORKER in cluster.workers:
            cluster.remove_worker(FORKED_WORKER)
        cluster.add_worker(FORKED_WORKER, queues=[FORKED_QUEUE], concurrency=concurrency, env=envs[where])
    r = cluster.redis_client()
    try:
        run = f"lesson04:echo:{uuid.uuid4().hex[:8]}"
        _batch(cluster, echo, [(run, rounds)] * n, queue=queue, timeout=120)
        _, pids = _redis_stats(r, worker, "base")
        counts = {k.decode(): int(v) for k, v in r.hgetall(f"{run}:echo").items()}
        children = r.scard(f"{run}:pids")
        main = cluster.workers[worker].pid
        r.delete(f"{run}:echo", f"{run}:pids")
    finally:
        r.close()
        if where != "after_fork":
            cluster.remove_worker(FORKED_WORKER)
    wrong = counts.get("mixed", 0) + counts.get("errors", 0)
    default = {"before_fork": "before: connected before the fork",
               "after_fork": "after: connected after the fork",
               "process_init": "after: connected in worker_process_init"}[where]
    return Measurement(label or default, "replies wrong or lost", "replies", [wrong], stat="sum",
                       meta={"where": where, "n": n, "rounds": rounds, "concurrency": concurrency,
                             "mixed": counts.get("mixed", 0), "errors": counts.get("errors", 0),
                             "requests": counts.get("rounds", 0), "children_used": children,
                             "db_connections_of_worker": len(pids), "connection_pids": pids,
                             "opened_by_main_process": sum(p == main for p in pids)})


def handlers(cluster: LocalCluster, *, time_limit: float = 1.0, timeout: float = 30.0,
             worker: str = "w1") -> dict[str, Measurement]:
    """Calls of each handler across the five fates of a task, counted in Redis by the handlers.

    Returns one Measurement per name in ``HANDLERS``: its values are the
    calls in each case of ``CASES`` (in order); ``meta["where"]`` says which
    process made them (``child`` or ``main``), ``meta["states"]`` the state
    the result backend recorded.
    """
    run = f"lesson04:fate:{uuid.uuid4().hex[:8]}"
    r = cluster.redis_client()
    states: dict[str, str] = {}
    try:
        for case in CASES:
            options = {"time_limit": time_limit} if case == "time_limit" else {}
            result = cluster.task(fate).apply_async(kwargs={"run": run, "case": case}, **options)
            if case == "sigkill":
                pid = poll_until(lambda: r.get(f"{run}:pid"), timeout, 0.02, what="the task to start")
                r.delete(f"{run}:pid")
                children = cluster.children(worker)
                cluster.kill(worker, child=children.index(int(pid)))
            if not poll_until(result.ready, timeout, 0.02):
                raise TimeoutError(f"the {case} task ({result.id}) did not finish within {timeout:g} s "
                                   f"(state {result.state}); last lines of {worker}'s log:\n"
                                   + cluster.logs(worker, 30))
            states[case] = result.state
            _wait_for_handlers(cluster, r, run, case, timeout)
            r.delete(f"{run}:pid")
        calls = {k.decode(): int(v) for k, v in r.hgetall(f"{run}:calls").items()}
        r.delete(f"{run}:calls", f"{run}:settled")
    finally:
        r.close()
    out = {}
    for handler in HANDLERS:
        per_case = [sum(v for k, v in calls.items() if k.startswith(f"{case}|{handler}|")) for case in CASES]
        where = {case: sorted({k.rsplit("|", 1)[1] for k in calls if k.startswith(f"{case}|{handler}|")})
                 for case in CASES}
        out[handler] = Measurement(handler, "calls", "calls", per_case, stat="sum",
                                   meta={"cases": list(CASES), "where": where, "states": states})
    return out


def _wait_for_handlers(cluster: Any, r: Any, run: str, case: str, timeout: float) -> None:
    """Return once every handler that will run for ``case`` has run.

    The result is stored *before* the handlers run. Handlers in the worker's
    main process (a lost child, a hard time limit) run in the same event-loop
    callback that stored the result, so a control ping answered afterwards
    proves they are done. A child that survived ends its trace with the
    ``task_postrun`` signal, after ``after_return``: wait for its mark.
    """
    cluster.ping(timeout=timeout)
    marks = {m.decode() for m in r.smembers(f"{run}:settled")}
    if f"{case}|failure|main" in marks:  # the child is gone: nothing more will run
        return
    poll_until(lambda: r.sismember(f"{run}:settled", f"{case}|postrun|child"), timeout, 0.02,
               what=f"the handlers of the {case} task")


# ----------------------------------------------------------------------------- comparisons
def compare(cluster: LocalCluster, *, n: int = 200) -> Comparison:
    """Connections per ``n`` tasks: connect per call vs the lazy per-process ``db``."""
    return Comparison(connections(cluster, "per_call", n=n, fresh=False), connections(cluster, "lazy", n=n),
                      better="lower", title=f"database connections opened for {n} tasks")


def compare_fork(cluster: LocalCluster, *, n: int = 200, rounds: int = 20, concurrency: int = 2) -> Comparison:
    """Wrong replies: connection made before the fork vs after it."""
    return Comparison(forked_connection(cluster, "before_fork", n=n, rounds=rounds, concurrency=concurrency),
                      forked_connection(cluster, "after_fork", n=n, rounds=rounds, concurrency=concurrency),
                      better="lower", title="replies that reached the wrong pool child")


def alerts(calls: dict[str, Measurement], cases: tuple[str, ...] = ("failure", "time_limit")) -> Comparison:
    """Failure alerts the slide's ``after_failure`` sent vs ``on_failure``, over the failing cases the child survives."""
    def total(handler: str, label: str) -> Measurement:
        m = calls[handler]
        picked = [v for case, v in zip(m.meta["cases"], m.values, strict=True) if case in cases]
        return Measurement(label, "failure alerts", "alerts", picked, stat="sum",
                           meta={"cases": list(cases), "handler": handler})

    return Comparison(total("after_failure", "talk: after_failure"), total("on_failure", "fix: on_failure"),
                      better="higher", title="failures that reached the alert handler")


def killed_child_alerts(calls: dict[str, Measurement]) -> Comparison:
    """A SIGKILLed child: alerts from any task handler vs from the ``task_failure`` signal."""
    i = calls["on_failure"].meta["cases"].index("sigkill")
    handler_calls = sum(calls[h].values[i] for h in ("after_failure", "on_failure", "on_retry",
                                                     "on_success", "after_return"))
    before = Measurement("before: task handlers", "alerts for a SIGKILLed child", "alerts", [handler_calls],
                         stat="sum", meta={"state": calls["on_failure"].meta["states"].get("sigkill")})
    after = Measurement("after: task_failure signal", "alerts for a SIGKILLed child", "alerts",
                        [calls["task_failure"].values[i]], stat="sum",
                        meta={"where": calls["task_failure"].meta["where"]["sigkill"]})
    return Comparison(before, after, better="higher", title="who hears about a pool child killed mid-task")


# ----------------------------------------------------------------------------- claims
@claim("the lazy per-process connection opens at most one connection per pool child; per call opens one per task")
def lazy_connection_per_child(comparison: Comparison) -> None:
    n, children = comparison.before.meta["n"], comparison.after.meta["concurrency"]
    verify("every task did its database call", comparison.before.meta["done"] == n
           and comparison.after.meta["done"] == n, before=comparison.before.meta["done"],
           after=comparison.after.meta["done"], n=n)
    verify(f"the lazy db keeps at most {children} live connections (one per child)",
           comparison.after.meta["live_db_connections"] <= children,
           live=comparison.after.meta["live_db_connections"], children=children)
    comparison.check(before_at_least=0.9 * n, after_at_most=children)


@claim("cached on the base class, one connection serves every task type in a child; the slide's self._db opens one per type")
def one_connection_per_process(comparison: Comparison) -> None:
    before, after = comparison.before.meta, comparison.after.meta
    children, types = after["concurrency"], before["task_types"]
    verify("both runs did every database call", before["done"] == before["n"] and after["done"] == after["n"])
    slide, shared = Counter(before["live_db_pids"]), Counter(after["live_db_pids"])  # connections per child pid
    verify(f"the base-class cache keeps one live connection per child (at most {children})",
           max(shared.values(), default=0) <= 1 and len(shared) <= children, per_child=dict(shared),
           children=children)
    verify(f"a child that ran the slide's {types} task types holds one connection per type",
           max(slide.values(), default=0) == types, per_child=dict(slide))
    # the pool picks which child runs a task: thresholds count the children that did
    comparison.check(before_at_least=len(slide) + 1, after_at_most=children)


@claim("a connection made before the fork hands replies to the wrong child; made after it, none")
def connect_after_the_fork(comparison: Comparison) -> None:
    requests = comparison.after.meta["n"] * comparison.after.meta["rounds"]
    verify("every ECHO of the after-fork run was counted", comparison.after.meta["requests"] == requests,
           counted=comparison.after.meta["requests"], expected=requests)
    comparison.check(before_at_least=1, after_at_most=0)


@claim("the slide's after_failure is never called; on_failure is, for every failure the child survives")
def on_failure_is_the_handler(comparison: Comparison) -> None:
    cases = comparison.after.meta["cases"]
    verify("on_failure ran once per failing case", comparison.after.values == [1.0] * len(cases),
           handler=comparison.after.meta["handler"], calls=comparison.after.values, cases=cases)
    verify("after_failure never ran", comparison.before.value == 0, after_failure=comparison.before.value)


@claim("no task handler runs when the pool child is SIGKILLed; the task_failure signal does, in the main process")
def only_the_signal_hears_a_kill(comparison: Comparison) -> None:
    verify("the task was recorded as failed", comparison.before.meta["state"] == "FAILURE",
           state=comparison.before.meta["state"])
    verify("no task handler ran", comparison.before.value == 0, handler_calls=comparison.before.value)
    verify("the task_failure signal fired in the worker's main process",
           comparison.after.value >= 1 and comparison.after.meta.get("where") == ["main"],
           signal_calls=comparison.after.value, where=comparison.after.meta.get("where"))


# ----------------------------------------------------------------------------- the slide, as printed
SLIDE = """\
class DBTask(celery.Task):
    abstract = True
    _db = None

    @property
    def db(self):
        if self._db is None:
            self._db = Database.connect()
        return self._db

    def after_failure(self, *args, **kwargs):
        send_email('The task failed!')


@app.task(base=DebugTask)
def get_data(table_name):
    return get_data.db.table(table_name).all()
"""


def run_the_slide() -> BaseException | None:
    """Execute the slide's code as printed (with stand-ins for ``Database`` and ``send_email``).

    Returns the exception it raises (``None`` if it ran). Uses a throwaway
    Celery app that never connects anywhere.
    """
    import celery  # noqa: PLC0415

    app = celery.Celery("slide", set_as_current=False)
    namespace = {"celery": celery, "app": app, "Database": object, "send_email": print}
    try:
        exec(compile(SLIDE, "<slide 49>", "exec"), namespace)  # noqa: S102 - the talk's code, on purpose
    except Exception as exc:  # noqa: BLE001 - what it raises is the result
        return exc
    return None


def who_reads_abstract() -> list[str]:
    """Every place in the installed Celery package that *reads* an attribute named ``abstract``.

    Walks the syntax tree of each module: an ``x.abstract`` load, or
    ``getattr(x, "abstract"...)``. Celery 3 read it in its task metaclass to
    skip registering base classes; an empty list means nothing reads it now.
    """
    import ast  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import celery  # noqa: PLC0415

    found = []
    root = Path(celery.__file__).parent
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            load = isinstance(node, ast.Attribute) and node.attr == "abstract" and isinstance(node.ctx, ast.Load)
            getattr_call = (isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr", "hasattr")
                            and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                            and node.args[1].value == "abstract")
            if load or getattr_call:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def abstract_changes_nothing() -> Table:
    """Two base classes, with and without ``abstract = True``, one task on each: what gets registered.

    Uses a throwaway app; reports, per base class, whether the base itself
    became a task and whether the task on it did, and the task's inherited
    ``abstract`` value.
    """
    import celery  # noqa: PLC0415

    app = celery.Celery("abstract-probe", set_as_current=False)

    class WithAbstract(celery.Task):
        abstract = True

    class WithoutAbstract(celery.Task):
        pass

    @app.task(base=WithAbstract, name="probe.on_with")
    def on_with() -> None: ...

    @app.task(base=WithoutAbstract, name="probe.on_without")
    def on_without() -> None: ...

    names = set(app.tasks)
    rows = []
    for base, task in ((WithAbstract, on_with), (WithoutAbstract, on_without)):
        as_task = any(type(t) is base for t in app.tasks.values())
        rows.append([base.__name__, "yes" if as_task else "no", "yes" if task.name in names else "no",
                     str(task.abstract)])
    return Table(["base class", "base registered as a task", "task registered", "task.abstract"], rows,
                 title="abstract = True, with and without (Celery " + celery.__version__ + ")")


# ----------------------------------------------------------------------------- tables and plots
def handler_table(calls: dict[str, Measurement]) -> Table:
    """Rows: the five fates; columns: calls of each handler (``main`` marks calls from the main process)."""
    cases = calls[HANDLERS[0]].meta["cases"]
    states = calls[HANDLERS[0]].meta["states"]
    rows = []
    for i, case in enumerate(cases):
        row: list[Any] = [case, states.get(case, "")]
        for h in HANDLERS:
            n = int(calls[h].values[i])
            where = calls[h].meta["where"][case]
            row.append(f"{n} ({'/'.join(where)})" if n else "0")
        rows.append(row)
    return Table(["fate", "result", *HANDLERS], rows,
                 title="handler calls per fate of a task (in which process)",
                 note="after_failure is the slide's name; task_failure is a signal, not a Task method")
