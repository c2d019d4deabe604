"""The preloaded worker launcher: one warm interpreter per cluster that forks its workers.

Starting a ``celery worker`` costs a fresh interpreter importing Celery, kombu,
redis-py and every lesson module — about a second of CPU, paid again by each
worker and on each restart. A cluster therefore starts one **launcher**
(``python -m labkit.services.zygote``, :mod:`labkit.services.zygote`) that
imports all of that once and then forks a worker on demand; the fork runs
Celery's own ``celery worker`` command line, so a worker's start costs a fork,
its app, its pool and its broker connection.

What a forked worker keeps, exactly as a fresh one has it:

* **its own session and process group** (``setsid`` in the child), so
  ``kill``/``pause``/``restart`` signal its whole group and ``child=`` and
  ``children()`` find its pool processes as before;
* **a parent-death signal**: the launcher is its parent, so the child sets
  ``PR_SET_PDEATHSIG`` (SIGKILL) against the launcher, whose own parent-death
  signal points at the owner's spawner thread. When the kernel dies: the
  launcher gets SIGKILL, then each forked worker. The guard covers both as
  well: their pids are recorded in the cluster's ``pgids`` file like every
  service's, and both carry ``LABKIT_CLUSTER`` in ``/proc/PID/environ``
  (a forked worker shows the launcher's start-up environment there; its
  ``os.environ`` is its own);
* **its own log file, environment, settings and include list** (the request
  carries the worker's full environment; the app is created after the fork by
  ``labkit.worker_app``, which the launcher never imports);
* **no thread crosses the fork**: the launcher checks ``/proc/self/task`` after
  its imports and before every fork, and refuses to fork if it is not
  single-threaded.

The launcher reaps its children and reports each exit status; the owner sees
a forked worker through :class:`ForkedProcess`, which offers what
``subprocess.Popen`` offered a :class:`~labkit.services.base.Service`
(``pid``, ``poll``, ``wait``, ``returncode``).

**Workers that start as a fresh interpreter** (``python -m celery worker``, as
before), each for a reason :func:`fresh_reason` names and ``status()``
reports:

* a ``clock_offset``: libfaketime works through ``LD_PRELOAD``, which only an
  ``exec`` loads;
* an environment that changes a variable read when an interpreter or the C
  library starts (``LD_*``, ``PYTHON*``, ``MALLOC_*``, ``GLIBC_TUNABLES``,
  ``FAKETIME*``, ``LANG``, ``LC_*``, ``TZ``);
* an environment that changes a variable one of the preloaded modules read at
  import (the launcher records them; e.g. ``KOMBU_LOG_CONNECTION``);
* an include list that leaves out a module the launcher preloaded (its tasks
  would be registered in the worker, which a fresh one would not do);
* ``LABKIT_PRELOAD=0`` in the owner's environment: no launcher at all.

Beats always start as a fresh interpreter. Killing the launcher takes every
worker it forked with it (their parent-death signal), as killing the kernel
would.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .base import Service, ServiceError, spawn

PRELOAD_ENV = "LABKIT_PRELOAD"
FD_ENV = "LABKIT_LAUNCHER_FD"

#: Variables read when an interpreter or the C library starts, not later: a fork cannot change them.
STARTUP_PREFIXES = ("LD_", "PYTHON", "MALLOC_", "FAKETIME", "LC_")
STARTUP_NAMES = frozenset({"LANG", "TZ", "GLIBC_TUNABLES"})
#: The launcher's own variables, never compared.
LAUNCHER_ONLY = frozenset({FD_ENV})


def preload_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """False when ``LABKIT_PRELOAD`` is ``0``/``no``/``false``/``off`` (every worker a fresh interpreter)."""
    value = (os.environ if environ is None else environ).get(PRELOAD_ENV, "1")
    return value.strip().lower() not in ("0", "no", "false", "off")


def startup_variable(name: str) -> bool:
    """True for a variable an interpreter or the C library reads at start-up (so a fork cannot change it)."""
    return name in STARTUP_NAMES or name.startswith(STARTUP_PREFIXES)


def include_of(env: Mapping[str, str]) -> list[str]:
    """The modules a worker with environment ``env`` imports (``LABKIT_INCLUDE``, default every lesson)."""
    value = env.get("LABKIT_INCLUDE")
    if value is None:
        from ..app import lesson_modules  # noqa: PLC0415

        return lesson_modules()
    return [m for m in value.split(",") if m]


def fresh_reason(
    env: Mapping[str, str],
    base: Mapping[str, str],
    *,
    preloaded: Sequence[str],
    env_read: Iterable[str] = (),
    clock_offset: float = 0.0,
) -> str | None:
    """Why a worker with environment ``env`` must start as a fresh interpreter; None if it can be forked.

    ``base`` is the launcher's environment, ``preloaded`` the modules it
    imported, ``env_read`` the variables those imports read.
    """
    if clock_offset:
        return f"clock_offset {clock_offset:+g} s: libfaketime is loaded through LD_PRELOAD, at exec only"
    changed = sorted(k for k in set(env) | set(base) if env.get(k) != base.get(k) and k not in LAUNCHER_ONLY)
    startup = [k for k in changed if startup_variable(k)]
    if startup:
        return f"its environment changes {', '.join(startup)}, read when an interpreter starts"
    read = sorted(set(changed) & set(env_read))
    if read:
        return f"its environment changes {', '.join(read)}, read by a preloaded module when imported"
    include = set(include_of(env))
    left_out = [m for m in preloaded if m not in include]
    if left_out:
        return f"its include list leaves out {', '.join(left_out)}, which the launcher preloaded"
    return None


# --------------------------------------------------------------------------- a forked worker, seen from the owner


class ForkedProcess:
    """A worker the launcher forked, with the part of ``subprocess.Popen`` a Service uses.

    The launcher is the worker's parent, so only it can reap the worker; it
    reports the exit status, which :meth:`poll` and :meth:`wait` return
    (``-N`` for a signal, like ``Popen.returncode``). If the launcher itself is
    gone, its workers got their parent-death signal: a worker no longer in
    the process table counts as killed by SIGKILL.
    """

    def __init__(self, pid: int, args: Sequence[str], connection: _Connection) -> None:
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None
        self._exited = threading.Event()
        self._connection = connection

    def _set_exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    def _check_orphan(self) -> None:
        if self.returncode is None and self._connection.lost and not _running(self.pid):
            self._set_exit(-signal.SIGKILL)

    def poll(self) -> int | None:
        self._check_orphan()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import time  # noqa: PLC0415

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            if self._exited.wait(step):
                return self.returncode
            self._check_orphan()
            if self.returncode is not None:
                return self.returncode
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode}>"


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


@dataclass
class _Request:
    args: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    process: ForkedProcess | None = None
    error: str = ""


class _Connection:
    """One launcher process's control socket, and a thread reading its messages."""

    def __init__(self, sock: socket.socket, base_env: dict[str, str]) -> None:
        self.sock = sock
        self.base_env = base_env
        self.hello: dict | None = None
        self.lost = False
        self.lock = threading.Lock()
        self.pending: dict[int, _Request] = {}
        self.live: dict[int, ForkedProcess] = {}
        self.ids = itertools.count(1)
        self.thread = threading.Thread(target=self._read, name="labkit-launcher", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                try:
                    data = self.sock.recv(1 << 20)
                except OSError:
                    data = b""
                if not data:
                    break
                self._handle(json.loads(data))
        finally:  # the launcher is gone (or spoke nonsense): nobody will answer or report exits any more
            with self.lock:
                self.lost = True
                for request in self.pending.values():
                    request.error = "the launcher exited before it answered"
                    request.done.set()
                self.pending.clear()

    def _handle(self, message: dict) -> None:
        op = message.get("op")
        with self.lock:
            if op == "hello":
                self.hello = message
            elif op == "forked":
                request = self.pending.pop(message["id"], None)
                if request is None:
                    return
                if "pid" in message:
                    request.process = ForkedProcess(message["pid"], request.args, self)
                    self.live[message["pid"]] = request.process
                else:
                    request.error = message.get("error", "unknown error")
                request.done.set()
            elif op == "exit":  # in order after "forked" on the one stream, so a reused pid cannot confuse it
                process = self.live.pop(message["pid"], None)
                if process is not None:
                    process._set_exit(message["code"])

    def fork(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path, timeout: float) -> _Request:
        request = _Request(list(argv))
        with self.lock:
            if self.lost:
                request.error = "the launcher has exited"
                return request
            rid = next(self.ids)
            self.pending[rid] = request
        message = {"op": "fork", "id": rid, "argv": list(argv), "env": dict(env), "cwd": str(cwd), "log": str(log)}
        try:
            self.sock.send(json.dumps(message).encode())
        except OSError as exc:
            with self.lock:
                self.pending.pop(rid, None)
            request.error = f"cannot reach the launcher: {exc}"
            return request
        if not request.done.wait(timeout):
            request.error = f"no answer to a fork request within {timeout:.0f} s"
        return request

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


# --------------------------------------------------------------------------- the launcher service


@dataclass
class LauncherService(Service):
    """The cluster's preloaded worker launcher (a zygote); workers ask it through :meth:`fork`."""

    include: list[str] = field(default_factory=list)

    kind = "launcher"
    stop_timeout: float = 2.0

    def __post_init__(self) -> None:
        self._connection: _Connection | None = None
        self._ensure_lock = threading.Lock()

    # -- Service -------------------------------------------------------------------
    def command(self) -> list[str]:
        return [sys.executable, "-m", "labkit.services.zygote", ",".join(self.include)]

    def environment(self) -> dict[str, str]:
        return {"PYTHONUNBUFFERED": "1"}

    def launch(self, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**env, FD_ENV: str(child.fileno())}
        try:
            proc = spawn(command, log=self.log_path, env=env, cwd=self.run_dir, pass_fds=(child.fileno(),))
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        if self._connection is not None:
            self._connection.close()
        self._connection = _Connection(parent, env)
        return proc

    def probe(self) -> bool:
        return self._connection is not None and self._connection.hello is not None

    def describe(self) -> str:
        hello = self._connection.hello if self._connection is not None else None
        if not hello:
            return "preloading"
        text = f"forks workers; preloaded {len(hello['preloaded'])} module(s) in {hello['seconds']:.2f} s"
        if hello.get("failed"):
            text += f", {len(hello['failed'])} failed"
        return text

    def remedy(self) -> str:
        return ("read the launcher log above; set LABKIT_PRELOAD=0 to start every worker as a fresh "
                "interpreter instead")

    def finish(self, timeout: float | None = None) -> None:
        super().finish(timeout)
        if self._connection is not None:
            self._connection.close()

    # -- for workers ---------------------------------------------------------------
    def base_environment(self) -> dict[str, str]:
        """The environment the launcher runs (or would run) with: what a forked worker inherits."""
        if self._connection is not None and self.alive():
            return self._connection.base_env
        return self.full_environment()

    def reason(self, env: Mapping[str, str], *, clock_offset: float = 0.0, timeout: float | None = None,
               start: bool = True) -> str | None:
        """Why a worker with ``env`` must be a fresh interpreter (None: fork it).

        With ``start=False`` only what is known without the launcher running
        is checked (its environment, the include list it was asked for).
        """
        reason = fresh_reason(env, self.base_environment(), preloaded=self.include, clock_offset=clock_offset)
        if reason is not None or not start:
            return reason
        self.ensure_ready(timeout)
        hello = self._connection.hello
        return fresh_reason(env, self._connection.base_env, preloaded=hello["preloaded"],
                            env_read=hello["env_read"], clock_offset=clock_offset)

    def ensure_ready(self, timeout: float | None = None) -> None:
        """Start the launcher if it is not running, and wait until it has preloaded."""
        with self._ensure_lock:
            if not self.alive():
                self.proc = None
                self.spawn()
            if not self.probe():
                self.wait_ready(timeout)

    def fork(self, argv: Sequence[str], env: Mapping[str, str], *, cwd: Path, log: Path, name: str,
             timeout: float | None = None) -> ForkedProcess:
        """Fork a worker running ``argv`` (``python -m celery ...``) with ``env``; returns at once."""
        timeout = timeout or self.start_timeout
        self.ensure_ready(timeout)
        request = self._connection.fork(argv, env, cwd, log, timeout)
        if request.process is None:
            raise ServiceError(name, f"the cluster's launcher could not fork it: {request.error}",
                               command=list(argv), log=self.log_path, remedy=self.remedy())
        return request.process
