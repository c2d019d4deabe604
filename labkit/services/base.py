"""One process-control layer for every real process labkit starts.

A :class:`Service` owns one long-running OS process (``redis-server``, a
ZooKeeper JVM, a ``celery worker``) and makes three promises:

* **It is findable.** The process runs in its own session/process group (so a
  signal can reach it *and* everything it forks), writes to one log file in
  the cluster's run directory, and carries ``LABKIT_CLUSTER`` in its
  environment so leak checks and ``labkit down`` can find it.
* **Ready means ready.** :meth:`Service.start` returns only after a
  service-specific probe succeeds (Redis answers PING, ZooKeeper serves a
  session, a worker answers a control ping) or raises :class:`ServiceError`
  naming the service, the exact command, the last lines of its log and a
  remedy.
* **It never outlives its owner.** Each child gets a parent-death signal
  (``PR_SET_PDEATHSIG``) and is recorded with the cluster's :mod:`guard`
  process, which kills every recorded process group when the owning Python
  process disappears — even by SIGKILL, when no ``atexit`` hook can run.

``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not
the process. Children are therefore always forked from one long-lived
spawner thread (:func:`spawn`), never from short-lived helper threads. The
exception is a worker the cluster's launcher forks (:meth:`Service.launch`
is where a subclass starts its process otherwise): its parent is the
single-threaded launcher, whose own parent-death signal points here
(:mod:`labkit.services.launcher`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ..poll import poll_until
from ..status import Status

ENV_MARK = "LABKIT_CLUSTER"

_PR_SET_PDEATHSIG = 1


class ServiceError(RuntimeError):
    """A service failed to start or to answer: names what, why and the remedy."""

    def __init__(
        self,
        service: str,
        problem: str,
        *,
        command: Sequence[str] | None = None,
        log: Path | None = None,
        remedy: str = "",
    ) -> None:
        self.service = service
        self.problem = problem
        self.command = list(command) if command else None
        self.log = log
        self.remedy = remedy
        lines = [f"{service}: {problem}"]
        if command:
            lines.append(f"  command: {shlex.join(command)}")
        if log is not None:
            lines.append(f"  log: {log}")
            tail = log_tail(log)
            if tail:
                lines.append("  last lines of the log:")
                lines.extend(f"    | {line}" for line in tail)
        if remedy:
            lines.append(f"  remedy: {remedy}")
        super().__init__("\n".join(lines))


def log_tail(path: Path, lines: int = 15) -> list[str]:
    """The last ``lines`` non-empty lines of a log file (empty if unreadable)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    """True when something on this machine already listens on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: connections lingering in TIME_WAIT after a restart do not count,
        # only a live listener does (servers set the same option themselves).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def port_holder(port: int) -> str:
    """A short description of the process listening on ``port``, if visible."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid:
                    with contextlib.suppress(psutil.Error):
                        p = psutil.Process(conn.pid)
                        return f"pid {conn.pid} ({' '.join(p.cmdline()[:3])})"
                return "another process"
    return "another process"


# --------------------------------------------------------------------------- spawning


def _preexec_pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _Spawner:
    """A single long-lived thread that forks every child (see module docstring)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _run(self) -> None:
        while True:
            fn, box, done = self._jobs.get()
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed back to the caller
                box["error"] = exc
            done.set()

    def call(self, fn: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="labkit-spawner", daemon=True)
                self._thread.start()
        box: dict = {}
        done = threading.Event()
        self._jobs.put((fn, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]


_spawner = _Spawner()


def spawn(
    command: Sequence[str],
    *,
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    pdeathsig: bool = True,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen:
    """Start ``command`` in a new session, output appended to ``log`` (``pass_fds`` stay open in it)."""
    log.parent.mkdir(parents=True, exist_ok=True)

    def _start() -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_preexec_pdeathsig if pdeathsig else None,
                close_fds=True,
                pass_fds=tuple(pass_fds),
            )

    return _spawner.call(_start)


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group led by ``pid`` (ignores a gone group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# --------------------------------------------------------------------------- Service


@dataclass
class Service:
    """A real process: subclasses say how to build its command and how to probe it.

    Life cycle: ``spawn()`` (fork, non-blocking) -> ``wait_ready()`` (probe with a
    deadline) -> ``stop()`` (SIGTERM the group, wait, SIGKILL). ``start()`` does
    the first two. ``kill``/``pause``/``resume``/``restart`` are the fault
    injection verbs lessons use.
    """

    name: str
    run_dir: Path
    cluster_id: str = ""
    start_timeout: float = 30.0
    stop_timeout: float = 5.0
    on_spawn: Callable[[Service], None] | None = field(default=None, repr=False)
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    state: Status = field(default=Status.NEW, init=False)
    started_at: float | None = field(default=None, init=False)
    ready_seconds: float | None = field(default=None, init=False)
    last_probe_error: BaseException | None = field(default=None, init=False, repr=False)

    kind = "service"

    # -- to override ---------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {}

    def prepare(self) -> None:
        """Write config files, check binaries and ports; raise ServiceError early."""

    def probe(self) -> bool:
        """True once the service really serves clients."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short address, e.g. ``redis://127.0.0.1:6379/0``."""
        return ""

    def remedy(self) -> str:
        return ""

    def claim_port(self, port: int) -> int:
        """``port`` if it is free (a free one when 0); else a ServiceError naming its holder."""
        if not port:
            return free_port()
        if port_in_use(port):
            raise ServiceError(
                self.name,
                f"port 127.0.0.1:{port} is already in use by {port_holder(port)}",
                remedy="stop that process, or leave the port unset so labkit picks a free one",
            )
        return port

    # -- common ----------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.run_dir / "logs" / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def full_environment(self) -> dict[str, str]:
        """The whole environment the process starts with: ours, its own variables, the cluster mark."""
        env = dict(os.environ)
        env.update(self.environment())
        env[ENV_MARK] = self.cluster_id or "-"
        return env

    def launch(self, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start the process (fork + exec from the spawner thread); a subclass may start it otherwise."""
        return spawn(command, log=self.log_path, env=env, cwd=self.run_dir)

    def spawn(self) -> None:
        """Fork the process (returns at once; call :meth:`wait_ready` next)."""
        if self.alive():
            return
        self.prepare()
        env = self.full_environment()
        cmd = self.command()
        try:
            self.proc = self.launch(cmd, env)
        except FileNotFoundError as exc:
            raise ServiceError(
                self.name, f"cannot execute {cmd[0]!r}: {exc.strerror}", command=cmd,
                remedy=self.remedy() or "install it, or run `labkit doctor`",
            ) from exc
        self.started_at = time.monotonic()
        self.last_probe_error = None
        self.state = Status.STARTING
        if self.on_spawn is not None:
            self.on_spawn(self)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until :meth:`probe` succeeds; raise ServiceError with the log tail.

        A probe that raises counts as "not ready yet"; if the deadline passes,
        its last exception is quoted in the error, so a bug in a probe does not
        read as a slow service.
        """
        assert self.proc is not None and self.started_at is not None, "spawn() first"
        limit = timeout or self.start_timeout
        if poll_until(self._safe_probe, limit, alive=self.alive):
            self.state = Status.RUNNING
            self.ready_seconds = time.monotonic() - self.started_at
            return
        cmd = self.command()
        self.state = Status.FAILED
        if not self.alive():
            problem = f"exited with code {self.proc.returncode} during start-up"
        else:
            problem = f"did not become ready within {limit:.0f} s"
            if self.last_probe_error is not None:
                err = self.last_probe_error
                problem += f" (its readiness probe last raised {type(err).__name__}: {err})"
            self.stop()
            self.state = Status.FAILED
        raise ServiceError(self.name, problem, command=cmd, log=self.log_path, remedy=self.remedy())

    def _safe_probe(self) -> bool:
        try:
            ok = bool(self.probe())
        except Exception as exc:  # not ready yet; remembered for the error message
            self.last_probe_error = exc
            return False
        if ok:
            self.last_probe_error = None
        return ok

    def start(self, timeout: float | None = None) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def send_signal(self, sig: int, *, group: bool = True) -> None:
        """Send ``sig`` to the service (its whole process group by default)."""
        if not self.alive():
            raise ServiceError(self.name, "is not running", remedy=f"restart it: cluster.restart({self.name!r})")
        if group:
            kill_group(self.proc.pid, sig)
        else:
            os.kill(self.proc.pid, sig)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Deliver ``sig`` like a crash would; the service is left dead (SIGKILL) or dying."""
        self.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(self.stop_timeout if sig != signal.SIGKILL else 5)
            self.state = Status.KILLED if not self.alive() else Status.STOPPING

    def pause(self) -> None:
        self.send_signal(signal.SIGSTOP)
        self.state = Status.PAUSED

    def resume(self) -> None:
        self.send_signal(signal.SIGCONT)
        self.state = Status.RUNNING

    stop_signal = signal.SIGTERM

    def terminate(self) -> None:
        """Ask the service to exit (``stop_signal`` to its group); does not wait."""
        if self.alive():
            kill_group(self.proc.pid, signal.SIGCONT)  # a paused process cannot exit
            kill_group(self.proc.pid, self.stop_signal)

    def finish(self, timeout: float | None = None) -> None:
        """Wait for the exit begun by :meth:`terminate`, then SIGKILL what is left."""
        if self.proc is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(self.stop_timeout if timeout is None else timeout)
        # the leader may be gone while its children linger: always sweep the group
        kill_group(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.state = Status.STOPPED

    def stop(self) -> None:
        """Terminate, wait ``stop_timeout``, then SIGKILL the group. Idempotent."""
        self.terminate()
        self.finish()

    def restart(self, timeout: float | None = None) -> None:
        self.stop()
        self.proc = None
        self.start(timeout)

    def observed_state(self) -> Status:
        """``state``, corrected for a process that died on its own (then ``EXITED``)."""
        if self.state in (Status.STARTING, Status.RUNNING, Status.PAUSED) and not self.alive():
            return Status.EXITED
        return self.state

    def status(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.observed_state().value,
            "pid": self.pid,
            "address": self.describe(),
            "ready_s": None if self.ready_seconds is None else round(self.ready_seconds, 2),
            "log": str(self.log_path),
        }


def labkit_processes(cluster_id: str | None = None) -> list[psutil.Process]:
    """Every live process carrying labkit's environment mark (optionally of one cluster)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            mark = p.environ().get(ENV_MARK)
        except (psutil.Error, OSError):
            continue
        if mark and (cluster_id is None or mark == cluster_id):
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
    return found
