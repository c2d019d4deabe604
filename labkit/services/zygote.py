"""The preloaded worker launcher's own process: import Celery once, fork a worker on demand.

Run as ``python -m labkit.services.zygote MODULE,MODULE...`` by
:class:`~labkit.services.launcher.LauncherService`, with one end of a
``SOCK_SEQPACKET`` socket pair on the file descriptor named by
``$LABKIT_LAUNCHER_FD``. It

1. imports Celery's worker machinery, kombu's Redis transport and the given
   lesson modules, recording every environment variable those imports read
   (a module that reads ``os.environ`` at import time would keep the
   launcher's value in a forked worker; the owner starts a worker whose value
   differs as a fresh interpreter instead);
2. checks that it is still single-threaded (a thread does not survive a fork,
   and a lock it held stays held in the child), then says hello: its pid, the
   modules it preloaded or failed to, the variables read, the seconds spent;
3. serves ``fork`` requests, one JSON message each, and reports each child's
   exit status when it ends (it is their parent, so it reaps them).

A forked child makes itself a worker the way ``subprocess.Popen(...,
start_new_session=True, preexec_fn=<parent-death signal>, close_fds=True)``
then ``exec`` would: a new session, ``PR_SET_PDEATHSIG`` (SIGKILL when the
launcher dies), stdin from /dev/null, stdout and stderr appended to its own
log, every other descriptor closed, its working directory and its *whole*
environment (the request's) in place. Then it leaves the serving loop and
runs ``celery.__main__.main()`` with the request's arguments, so Celery parses
the same command line, creates the app (``labkit.worker_app``, never imported
here) and exits the interpreter as a ``python -m celery`` would: atexit
handlers and all.

This module imports only the standard library at the top, so nothing is
imported before the recording starts.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

#: What a ``celery worker`` imports on its way to ready, minus what depends on
#: the worker's own options: ``celery.worker.autoscale`` reads
#: ``AUTOSCALE_KEEPALIVE`` at import (lesson 03 sets it per worker), so it is
#: left for the child to import.
PRELOAD = (
    "celery",
    "celery.__main__",
    "celery.bin.celery",
    "celery.apps.worker",
    "celery.worker.worker",
    "celery.worker.components",
    "celery.worker.consumer",
    "celery.worker.control",
    "celery.worker.pidbox",
    "celery.worker.loops",
    "celery.worker.request",
    "celery.worker.strategy",
    "celery.app.trace",
    "celery.app.control",
    "celery.concurrency.prefork",
    "celery.concurrency.solo",
    "celery.concurrency.thread",
    "celery.backends.redis",
    "celery.events.dispatcher",
    "celery.app.log",
    "celery.app.events",
    "celery.fixups.django",
    "celery.worker.consumer.delayed_delivery",
    "kombu.transport.redis",
    "billiard.pool",
    "billiard.popen_fork",
    "billiard.synchronize",
    "billiard.sharedctypes",
    "encodings.idna",
    "redis",
    "psutil",
    "labkit.define",  # what labkit.worker_app needs besides the app
)
#: Never preloaded: builds the app from the environment, which must happen after the fork.
NEVER = ("labkit.worker_app",)

_PR_SET_PDEATHSIG = 1


class EnvReads:
    """Records which environment variables imports read through ``os.environ`` while active.

    ``names``: variables read one by one (``os.environ[...]``, ``get``, ``in``,
    ``os.getenv``) — settings a module keeps from import time. ``snapshots``:
    modules that copied the *whole* environment (iterating its items, e.g.
    ``wsgiref.handlers``, which Celery's command line pulls in through
    Flower's plugin); a copy is not a setting, so it is reported, not compared.
    """

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.snapshots: set[str] = set()
        self._cls = type(os.environ)
        self._original = self._cls.__getitem__

    def __enter__(self) -> EnvReads:
        original, names, snapshots = self._original, self.names, self.snapshots

        def recording(environ, key):
            caller = sys._getframe(1)
            if caller.f_code.co_name == "__iter__" or (caller.f_code.co_name == "copy"
                                                       and caller.f_globals.get("__name__") == "os"):
                snapshots.add(_importer(caller))
            else:
                names.add(key)
            return original(environ, key)

        self._cls.__getitem__ = recording
        return self

    def __exit__(self, *exc) -> None:
        self._cls.__getitem__ = self._original


def _importer(frame) -> str:
    """The module whose code is running in ``frame`` or below it (skipping the mapping's own frames)."""
    while frame is not None:
        name = frame.f_globals.get("__name__", "?")
        if name not in ("os", "_collections_abc", "collections.abc") and not name.startswith("importlib"):
            return name
        frame = frame.f_back
    return "?"


def preload(modules: list[str]) -> dict:
    """Import Celery and ``modules``; return what the hello message reports."""
    t0 = time.perf_counter()
    failed: dict[str, str] = {}
    with EnvReads() as reads:
        for name in PRELOAD:
            importlib.import_module(name)  # a broken Celery install: the launcher fails, quoting this
        for name in modules:
            if name in NEVER:
                continue
            try:
                importlib.import_module(name)
            except BaseException as exc:  # the worker that includes it will import it again and fail loudly
                failed[name] = f"{type(exc).__name__}: {exc}"
    # Collect once, then move every object that exists now out of the collector's sight: a worker's
    # collections (Celery runs one before forking each pool process) no longer walk the preloaded
    # modules' objects, nor write to their pages (which a fork shares copy-on-write).
    gc.collect()
    gc.freeze()
    return {
        "preloaded": [m for m in modules if m not in failed and m not in NEVER],
        "failed": failed,
        "env_read": sorted(reads.names),
        "env_snapshots": sorted(reads.snapshots),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def threads() -> list[str]:
    """Every thread of this process (from /proc, so threads started by C code count too)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        tids = [str(threading.get_native_id())]
    names = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                names.append(f"{tid} {fh.read().strip()}")
        except OSError:
            names.append(tid)
    return names


def _send(sock: socket.socket, message: dict) -> None:
    sock.send(json.dumps(message).encode())


def _exit_code(status: int) -> int:
    """``subprocess.Popen.returncode`` style: the exit code, or minus the signal number."""
    return os.waitstatus_to_exitcode(status)


class Zygote:
    """The serving loop: fork on request, reap children, report their exits."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self.children: dict[int, int] = {}  # pidfd (or -pid without pidfds) -> pid
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        self.has_pidfd = hasattr(os, "pidfd_open")

    def serve(self) -> dict | None:
        """Serve until the owner hangs up (returns None) or, in a forked child, return its job."""
        while True:
            timeout = None if self.has_pidfd else 50
            try:
                events = self.poller.poll(timeout)
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
                continue
            for fd, _mask in events:
                if fd == self.sock.fileno():
                    data = self.sock.recv(1 << 20)
                    if not data:
                        return None
                    job = self.handle(json.loads(data))
                    if job is not None:
                        return job
                elif fd in self.children:
                    self.reap(fd)
            if not self.has_pidfd:
                self.reap_any()

    def handle(self, request: dict) -> dict | None:
        if request.get("op") != "fork":
            _send(self.sock, {"op": "error", "id": request.get("id"), "error": f"unknown request {request!r}"})
            return None
        alive = threads()
        if len(alive) != 1:
            _send(self.sock, {"op": "forked", "id": request["id"],
                              "error": f"the launcher is not single-threaded: {alive}"})
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            _send(self.sock, {"op": "forked", "id": request["id"], "error": f"fork failed: {exc}"})
            return None
        if pid == 0:
            self.become_child(request)
            return request
        key = -pid
        if self.has_pidfd:
            try:
                key = os.pidfd_open(pid)
            except OSError:  # cannot happen for an unreaped child; fall back to polling
                self.has_pidfd = False
        self.children[key] = pid
        if key >= 0:
            self.poller.register(key, select.POLLIN)
        _send(self.sock, {"op": "forked", "id": request["id"], "pid": pid})
        return None

    def reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        _send(self.sock, {"op": "exit", "pid": pid, "code": _exit_code(status)})

    def reap_any(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.pop(-pid, None)
            _send(self.sock, {"op": "exit", "pid": pid, "code": _exit_code(status)})

    def become_child(self, request: dict) -> None:
        """In the child, right after the fork: turn into the worker's own process (see module docstring)."""
        try:
            os.setsid()
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != self.pid:  # the launcher died before the prctl: the signal never comes
                os._exit(1)
            self.sock.close()
            for fd in self.children:
                if fd >= 0:
                    os.close(fd)
            self.children.clear()
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.closerange(3, _max_fd())
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
        except BaseException:  # pragma: no cover - reported in the worker's log, if it got that far
            traceback.print_exc()
            os._exit(70)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):  # pragma: no cover
        return 65536


def run_celery(request: dict) -> None:
    """In a forked child: ``python -m celery <args>``, in this already-warm interpreter."""
    import celery.__main__  # noqa: PLC0415 - preloaded; the name only

    argv = list(request["argv"])
    if argv[1:3] != ["-m", "celery"]:
        print(f"labkit launcher: can only run `python -m celery ...`, not {argv!r}", flush=True)
        raise SystemExit(2)
    sys.argv = [celery.__main__.__file__, *argv[3:]]  # what a fresh `python -m celery ARGS` would see
    celery.__main__.main()  # parses the command line, runs the worker, raises SystemExit


def main(argv: list[str]) -> int:
    modules = [m for m in (argv[0] if argv else "").split(",") if m]
    sock = socket.socket(fileno=int(os.environ["LABKIT_LAUNCHER_FD"]))
    info = preload(modules)
    alive = threads()
    if len(alive) != 1:
        print(f"labkit launcher: importing the preload list started threads {alive}; a fork would not "
              "carry them. Start threads lazily (after the fork), or set LABKIT_PRELOAD=0.", flush=True)
        return 3
    print(f"labkit launcher: preloaded {len(info['preloaded'])} module(s) in {info['seconds']:.2f} s; "
          f"variables read at import: {', '.join(info['env_read']) or 'none'}"
          + (f"; whole environment copied by {', '.join(info['env_snapshots'])}" if info["env_snapshots"] else "")
          + (f"; could not import {info['failed']}" if info["failed"] else ""), flush=True)
    _send(sock, {"op": "hello", "pid": os.getpid(), **info})
    job = Zygote(sock).serve()
    if job is None:
        return 0
    run_celery(job)
    return 0  # pragma: no cover - celery's main exits


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
