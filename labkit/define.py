"""Tasks defined at run time: a module's source, loaded into the kernel and every worker.

``cluster.define(source)`` (and the ``%%task`` cell magic, :mod:`labkit.magics`)
lets a learner try a task of their own on a running cluster without writing a
file that every worker imports. How it travels, with Celery's own parts:

1. **The kernel** compiles the source (a syntax error is reported against the
   cell's own line numbers) and executes it as a module named ``cell_<first
   function>`` (or the name given). ``@shared_task`` registers its tasks in
   every app of the kernel; a name that belongs to a lesson, to Celery or to
   another module is refused before anything is registered.
2. **The cluster's Redis** keeps the source (hash ``labkit:defined``): the one
   place every worker can read, however and whenever it was started. A worker
   loads every stored module at ``worker_init``, in its main process, before
   its pool forks — so a worker added later already knows them.
3. **Running workers** get a remote-control command, ``labkit_define``
   (registered with ``Panel.register`` by :mod:`labkit.worker_app`), naming
   the module and its digest — never code, never a pickle. The worker's main
   process reads the source from Redis, executes it, refreshes its consumer's
   task strategies and renews its prefork pool (:func:`refresh_pool`): idle
   children are replaced at once, busy ones get no further job and are
   replaced when their task ends — no task is lost and none runs old code.
   Children forked after that carry the new code. (Celery's own
   ``pool_restart`` only sets a flag each child reads before it *waits* for a
   job, so a child already waiting runs one more task with the old code.)

Redefining a module replaces its tasks everywhere: Celery's registry keeps the
first definition of a name, so the old tasks are removed first. A definition
that fails (a syntax error, an exception while importing, a name clash) leaves
the previous one in force in that process, and the error names each worker
that failed with its traceback.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import html
import importlib
import importlib.util
import json
import linecache
import logging
import os
import signal
import sys
import threading
import time
import traceback
import types
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from celery import Celery

    from .client import ClusterClient

STORE_KEY = "labkit:defined"
COMMAND = "labkit_define"
PREFIX = "cell_"

log = logging.getLogger(__name__)
_lock = threading.RLock()
#: module -> the app-finalizer callbacks its ``@shared_task`` decorators added (dropped on redefinition)
_finalizers: dict[str, set] = {}


class DefineError(Exception):
    """A definition that could not be loaded; the message says where and why.

    IPython shows only this message (``_render_traceback_``), not the frames of
    labkit that raised it.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


# --------------------------------------------------------------------------- names and source

def module_name_for(source: str) -> str:
    """``cell_<name>`` for the first function (or class) the source defines at top level."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return PREFIX + "unnamed"
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return PREFIX + node.name
    raise DefineError("this source defines no function: give the module a name "
                      "(cluster.define(source, module='helpers') or %%task --module helpers)")


def check_module_name(module: str) -> None:
    """A plain identifier that does not shadow an importable module."""
    if not module.isidentifier():
        raise DefineError(f"module name {module!r} must be a Python identifier (no dots)")
    if module in sys.modules and not getattr(sys.modules[module], "__labkit_defined__", False):
        raise DefineError(f"module name {module!r} is taken by an imported module; choose another")
    if module not in sys.modules and importlib.util.find_spec(module) is not None:
        raise DefineError(f"module name {module!r} would shadow an installed module; choose another")


def digest(source: str, line_offset: int = 0) -> str:
    return hashlib.sha256(f"{line_offset}\n{source}".encode()).hexdigest()[:16]


def filename(module: str) -> str:
    return f"<task cell {module}>"


def compile_source(module: str, source: str, line_offset: int = 0) -> types.CodeType:
    """Compile with ``line_offset`` blank lines in front, so line numbers are the cell's own.

    A syntax error raises :class:`DefineError` quoting the offending line and
    its neighbour with the cell's line numbers.
    """
    padded = "\n" * line_offset + source
    try:
        return compile(padded, filename(module), "exec", dont_inherit=True)
    except SyntaxError as exc:
        lines = padded.splitlines()
        n = exc.lineno or 0
        shown = []
        for i in range(max(n - 1, line_offset + 1), n + 1):
            if 1 <= i <= len(lines):
                shown.append(f"{'-->' if i == n else '   '} {i:3} | {lines[i - 1]}")
        if exc.offset and shown:
            shown.append(" " * (10 + exc.offset - 1) + "^")
        raise DefineError(f"{module} does not compile: {exc.msg} (cell line {n})\n" + "\n".join(shown)) from None


# --------------------------------------------------------------------------- loading into this process

def _apps() -> list[Celery]:
    from celery import _state  # noqa: PLC0415

    return [a for a in _state._get_active_apps() if a.finalized]


def _owned_tasks(app: Celery, module: str) -> dict[str, Any]:
    return {name: t for name, t in app.tasks.items() if getattr(t, "__module__", None) == module}


def _owner(task: Any) -> str:
    return getattr(task, "__module__", None) or "?"


@contextlib.contextmanager
def _refusing_clashes(module: str):
    """While ``module`` executes, refuse a task name another module already registered.

    Celery's ``_task_from_fun`` keeps the first task of a name and hands it
    back silently; this wrapper checks the name first and raises instead.
    """
    from celery import Celery  # noqa: PLC0415

    original = Celery._task_from_fun

    def checked(app, fun, name=None, **options):
        if getattr(fun, "__module__", None) == module:
            task_name = name or app.gen_task_name(fun.__name__, fun.__module__)
            existing = app.tasks.get(task_name)
            if existing is not None and _owner(existing) != module:
                owner = _owner(existing)
                what = ("the lesson module " if owner.startswith("labkit.lessons") else "module ") + owner
                raise DefineError(
                    f"{module} cannot define task {task_name!r}: that name belongs to {what}. "
                    f"Give your task another name (@shared_task(name=...)) or rename the function")
        return original(app, fun, name=name, **options)

    Celery._task_from_fun = checked
    try:
        yield
    finally:
        Celery._task_from_fun = original


def load_module(module: str, source: str, line_offset: int = 0) -> dict[str, Any]:
    """Execute ``source`` as module ``module`` in this process, replacing an earlier definition.

    Returns ``{task name: task}`` as registered in the first finalized app.
    On any failure the previous definition stays in force and the exception
    propagates (a syntax error as :class:`DefineError`).
    """
    from celery import _state  # noqa: PLC0415

    code = compile_source(module, source, line_offset)
    with _lock:
        apps = _apps()
        old_tasks = {app: _owned_tasks(app, module) for app in apps}
        old_module = sys.modules.get(module)
        old_finalizers = _finalizers.pop(module, set())
        old_lines = linecache.cache.get(filename(module))
        for app in apps:
            for name in old_tasks[app]:
                app.tasks.pop(name, None)
        _state._on_app_finalizers.difference_update(old_finalizers)

        mod = types.ModuleType(module)
        mod.__file__ = filename(module)
        mod.__labkit_defined__ = True
        padded = "\n" * line_offset + source
        linecache.cache[filename(module)] = (len(padded), None, padded.splitlines(True), filename(module))
        before = set(_state._on_app_finalizers)
        sys.modules[module] = mod
        try:
            with _refusing_clashes(module):
                exec(code, mod.__dict__)
        except BaseException:
            _state._on_app_finalizers.difference_update(set(_state._on_app_finalizers) - before)
            _state._on_app_finalizers.update(old_finalizers)
            for app in apps:
                for name in _owned_tasks(app, module):
                    app.tasks.pop(name, None)
                app.tasks.update(old_tasks[app])
            if old_module is not None:
                sys.modules[module] = old_module
                _finalizers[module] = old_finalizers
            else:
                sys.modules.pop(module, None)
            if old_lines is not None:
                linecache.cache[filename(module)] = old_lines
            raise
        _finalizers[module] = set(_state._on_app_finalizers) - before
        return _owned_tasks(apps[0], module) if apps else {}


def format_failure(module: str, exc: BaseException) -> str:
    """The traceback from the module's own frames down (labkit's frames left out)."""
    if isinstance(exc, DefineError):
        return str(exc)
    tb = traceback.TracebackException.from_exception(exc)
    frames = [f for f in tb.stack if f.filename == filename(module)] or list(tb.stack)[-1:]
    tb.stack = traceback.StackSummary.from_list(frames)
    return "".join(tb.format()).rstrip()


# --------------------------------------------------------------------------- the store (Redis)

def store(client: Any, module: str, source: str, line_offset: int) -> str:
    """Save the source under ``module`` in the cluster's Redis; returns its digest."""
    d = digest(source, line_offset)
    record = {"source": source, "line_offset": line_offset, "digest": d, "time": time.time()}
    client.hset(STORE_KEY, module, json.dumps(record))
    return d


def stored(client: Any) -> dict[str, dict]:
    """Every stored module, oldest first (a later module may import an earlier one)."""
    raw = client.hgetall(STORE_KEY) or {}
    records = {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}
    return dict(sorted(records.items(), key=lambda kv: kv[1].get("time", 0)))


# --------------------------------------------------------------------------- worker side

def load_all(app: Celery) -> None:
    """At worker start: load every stored module (a failure is logged, the worker still starts)."""
    from .app import redis_client  # noqa: PLC0415

    app.tasks  # noqa: B018  (finalize: lesson tasks first, so clashes are seen)
    try:
        records = stored(redis_client())
    except Exception as exc:  # the worker starts anyway; its log says why
        log.error("labkit: could not read defined tasks from Redis: %r", exc)
        return
    for module, record in records.items():
        try:
            tasks = load_module(module, record["source"], record.get("line_offset", 0))
            log.info("labkit: loaded %s (%s)", module, ", ".join(sorted(tasks)) or "no tasks")
        except BaseException as exc:
            log.error("labkit: could not load %s:\n%s", module, format_failure(module, exc))


def _replace(inner: Any, procs: list) -> None:
    """Kill pool processes that hold no task and fork their successors now."""
    for proc in procs:
        proc._controlled_termination = True  # the pool does not report it as a crash
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.join(2.0)  # SIGKILL takes milliseconds; once reaped, the pool sees the exit
    if procs:
        inner.maintain_pool()  # successors forked from the main process, which holds the new code


def refresh_pool(pool: Any, hub: Any = None) -> str:
    """Make sure no pool process started before now runs another task; returns what was done.

    * Celery's pool-restart flag (``Pool.restart()``, enabled by
      ``worker_pool_restarts``) is set on every child.
    * A child with no task is replaced at once (killed, reaped, and the
      pool's own ``maintain_pool()`` forks its successor). A graceful exit
      would cost a fixed second: billiard sleeps 1 s after a child announces
      its death.
    * A child with a task keeps it: nothing more is written to its pipe, and
      once its result is in (checked every 50 ms on the worker's event loop)
      it is replaced the same way. The flag alone is not enough: a child
      that finished its task before the flag was set is already waiting for
      the next one, and would run it with the old code.
    """
    inner = getattr(pool, "_pool", None)
    if inner is None or not hasattr(inner, "_poolctrl"):
        return "no pool processes (tasks run in the worker's main process)"
    inner.restart()
    live = [p for p in list(inner._pool) if p.exitcode is None]
    busy = [p for p in live if inner._worker_active(p)]
    idle = [p for p in live if p not in busy]
    writable = getattr(inner, "_all_inqueues", None)
    for proc in busy:
        if writable is not None:
            writable.discard(proc.inqW_fd)
    _replace(inner, idle)
    if busy and hub is not None:
        def retire() -> None:
            done = [p for p in busy if p.exitcode is None and not inner._worker_active(p)]
            _replace(inner, done)
            busy[:] = [p for p in busy if p.exitcode is None and p not in done]
            if busy:
                hub.call_later(0.05, retire)

        hub.call_later(0.05, retire)
    return f"{len(idle)} idle pool process(es) replaced now, {len(busy)} once their task ends"


def handle_define(state: Any, module: str, digest: str = "") -> dict:
    """The ``labkit_define`` remote-control command, in the worker's main process."""
    from .app import redis_client  # noqa: PLC0415

    consumer = state.consumer
    try:
        record = stored(redis_client()).get(module)
        if record is None:
            return {"error": f"{module} is not in the cluster's Redis ({STORE_KEY})"}
        tasks = load_module(module, record["source"], record.get("line_offset", 0))
    except BaseException as exc:
        return {"error": format_failure(module, exc), "pid": os.getpid()}
    app = consumer.app
    for name in list(consumer.strategies):
        if name not in app.tasks:
            consumer.strategies.pop(name, None)  # a task the new definition dropped
    consumer.update_strategies()
    pool = refresh_pool(consumer.pool, getattr(consumer, "hub", None))
    return {"ok": sorted(tasks), "digest": record["digest"], "pool": pool, "pid": os.getpid()}


# --------------------------------------------------------------------------- kernel side

@dataclass
class Defined:
    """What :func:`define_on` did: the module, its tasks, and each worker's answer."""

    module: str
    tasks: dict[str, Any]
    workers: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __getitem__(self, name: str) -> Any:
        return self.tasks[name]

    def __getattr__(self, name: str) -> Any:
        tasks = self.__dict__.get("tasks", {})
        if name in tasks:
            return tasks[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        names = ", ".join(t.name for t in self.tasks.values()) or "no tasks"
        where = ", ".join(self.workers) or "no worker"
        late = f"; not confirmed by {', '.join(self.pending)}" if self.pending else ""
        return f"<defined {self.module}: {names} on {where} in {self.seconds:.2f} s{late}>"

    def _repr_html_(self) -> str:
        return f"<code>{html.escape(repr(self))}</code>"


def _targets(cluster: ClusterClient, timeout: float) -> tuple[list[str], list[str]]:
    """(workers to wait for, paused workers to tell without waiting).

    A local cluster knows its workers (dead ones are skipped); for an attached
    one, whoever answers a ping.
    """
    from .status import Status  # noqa: PLC0415

    workers = getattr(cluster, "workers", None)
    if isinstance(workers, dict):
        alive = [w for w in workers.values() if w.alive()]
        return ([w.hostname for w in alive if w.state != Status.PAUSED],
                [w.hostname for w in alive if w.state == Status.PAUSED])
    return sorted(h for r in cluster.app.control.ping(timeout=min(timeout, 1.0)) for h in r), []


def define_on(cluster: ClusterClient, source: str, module: str | None = None, *,
              line_offset: int = 0, timeout: float = 10.0) -> Defined:
    """Load ``source`` into the kernel, the cluster's store and every running worker.

    Raises :class:`DefineError` for a syntax error (cell line numbers), an
    exception while the kernel or a worker imports it (each failing worker
    named, with its traceback), or a task name that another module owns.
    A worker that does not answer within ``timeout`` (paused, partitioned) is
    listed in ``Defined.pending`` and a warning says so.
    """
    from .client import short_name  # noqa: PLC0415

    t0 = time.perf_counter()
    module = module or module_name_for(source)
    check_module_name(module)
    compile_source(module, source, line_offset)  # a syntax error stops here, before anything changes
    for name in cluster.app.conf.include or ():  # the lesson tasks, so a clash with one is seen here
        importlib.import_module(name)
    cluster.app.tasks  # noqa: B018  (finalize the cluster's app so it takes the tasks too)
    try:
        load_module(module, source, line_offset)
    except DefineError:
        raise
    except BaseException as exc:
        raise DefineError(f"{module} failed while the kernel imported it; nothing was changed:\n"
                          + format_failure(module, exc)) from None
    tasks = {name.rsplit(".", 1)[-1]: cluster.app.tasks[name] for name in _owned_tasks(cluster.app, module)}
    client = cluster.redis_client()
    try:
        d = store(client, module, source, line_offset)
    finally:
        client.close()
    expected, paused = _targets(cluster, timeout)
    if paused:  # a stopped process reads the command from its socket when it is resumed
        cluster.app.control.broadcast(COMMAND, arguments={"module": module, "digest": d},
                                      destination=paused, reply=False)
    replies: dict[str, dict] = {}
    if expected:
        deadline = time.monotonic() + timeout
        while len(replies) < len(expected) and time.monotonic() < deadline:
            missing = [h for h in expected if h not in replies]
            answers = cluster.app.control.broadcast(
                COMMAND, arguments={"module": module, "digest": d}, destination=missing, reply=True,
                timeout=max(0.1, deadline - time.monotonic()), limit=len(missing))
            for answer in answers:
                replies.update({h: r for h, r in answer.items() if h in expected})
            if not answers:
                break
    failed = {h: r["error"] for h, r in replies.items() if "error" in r}
    ok = {short_name(h): r.get("pool", "") for h, r in replies.items() if "error" not in r}
    pending = [short_name(h) for h in [*expected, *paused] if h not in replies]
    if failed:
        names = ", ".join(short_name(h) for h in failed)
        where = f"; {', '.join(ok)} run{'s' if len(ok) == 1 else ''} the new definition" if ok else ""
        body = "\n".join(f"--- {short_name(h)} ({h}, pid {replies[h].get('pid', '?')}) ---\n{err}"
                         for h, err in failed.items())
        raise DefineError(f"{module} could not be loaded on {len(failed)} of {len(expected)} worker(s) "
                          f"({names}); {'they keep' if len(failed) > 1 else 'it keeps'} the previous "
                          f"definition{where}. Fix the source and define it again.\n{body}")
    if pending:
        warnings.warn(f"{module}: not confirmed by {', '.join(pending)} (paused, partitioned or busy?); "
                      "a worker loads the definition when it next reads its control messages, and always "
                      "when it (re)starts", stacklevel=3)
    return Defined(module, tasks, ok, pending, time.perf_counter() - t0)
