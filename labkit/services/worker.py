"""A real ``celery worker`` subprocess (prefork by default) with per-worker options.

:class:`WorkerSpec` is what a lesson asks for (queues, concurrency, pool,
prefetch, limits, extra environment); :class:`WorkerService` turns it into the
exact ``celery worker`` command line and environment, and decides readiness:
the worker wrote its ready marker (Celery's ``worker_ready`` signal) *and*
answers a control ping addressed to its hostname.

Gossip, mingle and heartbeats are off: they cost about a second at start-up
and no lesson needs workers to discover each other. A worker that a monitor
must be able to declare dead asks for heartbeats (``heartbeat=2``: a
``worker-heartbeat`` event every 2 s; lesson 05).

Given the cluster's :class:`~labkit.services.launcher.LauncherService`, a
worker is forked from that preloaded interpreter instead of exec'ing a fresh
one; the same command line runs either way. A worker with a ``clock_offset``
(libfaketime needs ``LD_PRELOAD``), an environment that changes a variable
read at interpreter start-up or at import, or a narrower include list starts
as a fresh interpreter: :attr:`WorkerService.started_as` says which, and why.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import psutil

from ..faketime import skew_environment
from .base import Service, ServiceError
from .launcher import LauncherService

POOLS = ("prefork", "solo", "threads")


@dataclass
class WorkerSpec:
    """What one worker should look like. Every field maps to a ``celery worker`` option."""

    name: str = ""
    queues: tuple[str, ...] = ("celery",)
    concurrency: int = 2
    pool: str = "prefork"
    prefetch_multiplier: int | None = None
    disable_prefetch: bool = False
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None  # KiB of resident memory; checked after each task
    soft_time_limit: float | None = None
    time_limit: float | None = None
    autoscale: tuple[int, int] | None = None  # (min, max) pool processes; ``--autoscale max,min``
    optimization: str | None = None  # ``-O``: "default" or "fair" (the same strategy since Celery 4.0)
    events: bool = False
    heartbeat: int | None = None  # seconds between worker-heartbeat events; None: --without-heartbeat
    loglevel: str = "INFO"
    env: dict[str, str] = field(default_factory=dict)
    clock_offset: float = 0.0  # seconds this worker's wall clock is ahead (+) or behind (-); libfaketime
    relay: bool = False  # reach Redis through a relay the cluster can cut: cluster.partition(name)

    def __post_init__(self) -> None:
        if isinstance(self.queues, str):
            self.queues = tuple(q.strip() for q in self.queues.split(",") if q.strip())
        else:
            self.queues = tuple(self.queues)
        if not self.queues:
            raise ValueError("a worker needs at least one queue")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, not {self.pool!r}")
        if self.optimization not in (None, "default", "fair"):
            raise ValueError(f"optimization (-O) must be 'default' or 'fair', not {self.optimization!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, not {self.concurrency}")
        if self.name and not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"worker name {self.name!r}: use letters, digits, '-' and '_' only")
        if isinstance(self.clock_offset, bool) or not isinstance(self.clock_offset, int | float) \
                or not math.isfinite(self.clock_offset):
            raise ValueError(f"clock_offset must be a finite number of seconds, not {self.clock_offset!r}")
        self.clock_offset = float(self.clock_offset)
        if self.heartbeat is not None and (isinstance(self.heartbeat, bool) or not isinstance(self.heartbeat, int)
                                           or self.heartbeat < 1):
            raise ValueError(f"heartbeat must be None (off) or whole seconds >= 1, not {self.heartbeat!r}")

    @classmethod
    def from_options(cls, name: str, **options) -> WorkerSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown worker option(s) {sorted(unknown)}; known: {sorted(known - {'name'})}")
        return cls(name=name, **options)


@dataclass
class CeleryService(Service):
    """A Celery process (worker or beat) that builds its app from the cluster's environment.

    Everything a Celery process of the cluster must agree on travels in its
    environment (read back by :mod:`labkit.worker_app`): the Redis URL, the
    broker's URL when it is not Redis, the shared settings, the modules to import, ZooKeeper's address, a private
    "local disk", a ready-file path and an optional wall-clock skew.
    """

    redis_url: str = ""
    broker_url: str = ""  # empty: the broker is Redis (redis_url)
    zk_hosts: str = ""
    settings: dict = field(default_factory=dict)
    include: list[str] | None = None
    clock_offset: float = 0.0  # seconds this process's wall clock is ahead (+) or behind (-); libfaketime
    env: dict[str, str] = field(default_factory=dict)

    @property
    def local_dir(self) -> Path:
        """This process's private directory, standing in for its host's local disk."""
        return self.run_dir / "local" / self.name

    @property
    def ready_file(self) -> Path:
        return self.run_dir / "ready" / self.name

    def prepare(self) -> None:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)

    def environment(self) -> dict[str, str]:
        env = {
            "LABKIT_REDIS_URL": self.redis_url,
            "LABKIT_BROKER_URL": self.broker_url,
            "LABKIT_ZK_HOSTS": self.zk_hosts,
            "LABKIT_SETTINGS": json.dumps(self.settings),
            "LABKIT_LOCAL_DIR": str(self.local_dir),
            "LABKIT_WORKER_NAME": self.name,
            "LABKIT_READY_FILE": str(self.ready_file),
            "PYTHONUNBUFFERED": "1",
        }
        if self.include is not None:
            env["LABKIT_INCLUDE"] = ",".join(self.include)
        env.update(skew_environment(self.clock_offset))
        env.update(self.env)
        return env


@dataclass
class WorkerService(CeleryService):
    """One ``celery worker`` process; ``ping`` is the cluster's control-ping function."""

    spec: WorkerSpec = field(default_factory=WorkerSpec)
    ping: Callable[[str, float], bool] | None = field(default=None, repr=False)
    launcher: LauncherService | None = field(default=None, repr=False)
    #: "fork" (from the launcher) or "exec: <why a fresh interpreter>"; "" before the first start
    started_as: str = field(default="", init=False)

    kind = "worker"
    stop_signal = signal.SIGQUIT  # cold shutdown: do not wait for running tasks at close

    def __post_init__(self) -> None:
        self.clock_offset = self.spec.clock_offset
        self.env = {**self.env, **self.spec.env}

    def fresh_reason(self, env: dict[str, str] | None = None, *, start: bool = True) -> str | None:
        """Why this worker starts as a fresh interpreter (None: it is forked from the launcher).

        ``env`` defaults to the environment it would start with; ``start=False``
        answers without starting the launcher, from what is known before it
        has preloaded.
        """
        if self.launcher is None:
            return "the cluster has no launcher (LABKIT_PRELOAD=0)"
        return self.launcher.reason(self.full_environment() if env is None else env,
                                    clock_offset=self.clock_offset, timeout=self.start_timeout, start=start)

    def launch(self, command: list[str], env: dict[str, str]):
        reason = self.fresh_reason(env)
        if reason is not None:
            self.started_as = f"exec: {reason}"
            return super().launch(command, env)
        self.started_as = "fork"
        return self.launcher.fork(command, env, cwd=self.run_dir, log=self.log_path, name=self.name,
                                  timeout=self.start_timeout)

    @property
    def hostname(self) -> str:
        return f"{self.name}@{self.cluster_id or 'labkit'}"

    def describe(self) -> str:
        s = self.spec
        extra = f" -c{s.concurrency}" if s.pool != "solo" else ""
        if s.autoscale:
            extra = f" autoscale {s.autoscale[1]}..{s.autoscale[0]}"
        if s.clock_offset:
            extra += f" clock {s.clock_offset:+g} s"
        if s.max_memory_per_child:
            extra += f" max {s.max_memory_per_child} KiB/child"
        if s.events:
            extra += " events"
        if s.heartbeat:
            extra += f" heartbeat {s.heartbeat} s"
        if s.relay:
            extra += " via relay"
        return f"{self.hostname} [{','.join(s.queues)}] {s.pool}{extra}"

    def command(self) -> list[str]:
        s = self.spec
        cmd = [
            sys.executable, "-m", "celery", "-A", "labkit.worker_app:app", "worker",
            "--hostname", self.hostname,
            "--queues", ",".join(s.queues),
            "--pool", s.pool,
            "--loglevel", s.loglevel,
            "--without-gossip", "--without-mingle",
        ]
        cmd += ["--without-heartbeat"] if s.heartbeat is None else ["--heartbeat-interval", str(s.heartbeat)]
        if s.pool != "solo":
            cmd += ["--concurrency", str(s.concurrency)]
        if s.autoscale:
            cmd += ["--autoscale", f"{s.autoscale[1]},{s.autoscale[0]}"]
        if s.prefetch_multiplier is not None:
            cmd += ["--prefetch-multiplier", str(s.prefetch_multiplier)]
        if s.disable_prefetch:
            cmd += ["--disable-prefetch"]
        if s.optimization is not None:
            cmd += ["-O", s.optimization]
        if s.max_tasks_per_child is not None:
            cmd += ["--max-tasks-per-child", str(s.max_tasks_per_child)]
        if s.max_memory_per_child is not None:
            cmd += ["--max-memory-per-child", str(s.max_memory_per_child)]
        if s.soft_time_limit is not None:
            cmd += ["--soft-time-limit", str(s.soft_time_limit)]
        if s.time_limit is not None:
            cmd += ["--time-limit", str(s.time_limit)]
        if s.events:
            cmd += ["--task-events"]
        return cmd

    def probe(self) -> bool:
        if not self.ready_file.exists():
            return False
        return self.ping is not None and self.ping(self.hostname, 1.0)

    def remedy(self) -> str:
        text = "read the worker log above; `labkit doctor` checks the Python environment"
        if self.started_as == "fork":
            text += " (it was forked from the cluster's launcher: LABKIT_PRELOAD=0 starts it as a fresh interpreter)"
        return text

    def status(self) -> dict:
        info = super().status()
        info["started_as"] = self.started_as.split(":", 1)[0]
        return info

    # -- pool children ---------------------------------------------------------------
    def children(self) -> list[int]:
        """PIDs of the worker's pool processes (prefork children), oldest first."""
        if not self.alive():
            return []
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.Error:
            return []
        kids = [k for k in kids if _safe_status(k) != psutil.STATUS_ZOMBIE]
        return [k.pid for k in sorted(kids, key=lambda k: (_safe_create(k), k.pid))]

    def child_pid(self, index: int) -> int:
        kids = self.children()
        if not kids:
            raise ServiceError(self.name, "has no pool children (solo/threads pool, or not running)")
        if not -len(kids) <= index < len(kids):
            raise ServiceError(self.name, f"has {len(kids)} pool children; index {index} is out of range")
        return kids[index]

    def signal_child(self, index: int, sig: int) -> int:
        pid = self.child_pid(index)
        os.kill(pid, sig)
        return pid


def _safe_status(p: psutil.Process) -> str:
    try:
        return p.status()
    except psutil.Error:
        return psutil.STATUS_ZOMBIE


def _safe_create(p: psutil.Process) -> float:
    try:
        return p.create_time()
    except psutil.Error:
        return 0.0
