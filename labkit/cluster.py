"""LocalCluster: real Redis, ZooKeeper and Celery workers, owned by one Python object.

    >>> from labkit import LocalCluster
    >>> with LocalCluster(workers=2) as c:          # doctest: +SKIP
    ...     c.kill("w1")                            # SIGKILL a worker
    ...     c.restart("w1")

What it promises (see the README's "Cluster contract"):

* every service is a real process on 127.0.0.1 on a free port, with its own
  log under ``run_dir/logs``; start-up is parallel and returns only when all
  are ready, or raises :class:`~labkit.services.base.ServiceError` naming the
  service, the command and its log tail;
* ``close()`` is idempotent, also runs at interpreter exit, and a per-cluster
  guard process kills everything if the owner dies without closing
  (SIGKILL of the kernel included);
* re-running a notebook cell ``LocalCluster(...)`` with the same arguments
  returns the cluster already running in this process;
* faults on demand: ``kill``/``pause``/``resume``/``restart`` any service by
  name (``"redis"``, ``"zk"`` or ``"zk2"``, ``"w1"``), or one of a worker's
  pool children with ``child=i``.
"""

from __future__ import annotations

import atexit
import contextlib
import html
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError

from .app import lesson_modules, make_app
from .services.base import Service, ServiceError, free_port, labkit_processes, log_tail, spawn
from .services.redis import RedisService
from .services.worker import WorkerService, WorkerSpec
from .services.zookeeper import ZooKeeperService, ensemble, kazoo_session_ok


def run_root() -> Path:
    """Where clusters keep their run directories (``$LABKIT_RUN_ROOT`` or /tmp/labkit-UID)."""
    root = os.environ.get("LABKIT_RUN_ROOT") or os.path.join(tempfile.gettempdir(), f"labkit-{os.getuid()}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


class LocalCluster:
    """A Redis broker, an optional ZooKeeper (1 node or an ensemble) and Celery workers.

    Parameters
    ----------
    workers:
        How many default workers (``w1``, ``w2``, ...), or a list of
        :class:`WorkerSpec` / dicts of worker options (``{"name": "fast",
        "queues": ["short"], "concurrency": 1}``).
    zookeeper:
        0 for none, 1 for a standalone server, 3 (or any N >= 2) for an ensemble.
    worker_options:
        Options applied to every default worker (``concurrency=1``, ...).
    settings:
        Celery settings shared by ``cluster.app`` and every worker.
    include:
        Modules whose tasks the workers import (default: every lesson module).
    redis_port, appendonly:
        Pin Redis to a port (default: a free one); turn on its append-only file.
    reuse:
        Return the cluster already running in this process with the same
        arguments instead of starting a second one (default True).
    """

    _instances: ClassVar[dict[str, LocalCluster]] = {}
    _atexit_registered: ClassVar[bool] = False
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __new__(cls, *args: Any, reuse: bool = True, **kwargs: Any) -> LocalCluster:
        key = cls._key(args, kwargs)
        if reuse:
            existing = cls._instances.get(key)
            if existing is not None and existing.state == "running":
                existing._reused = True
                return existing
        self = super().__new__(cls)
        self._key_value = key
        self._initialised = False
        return self

    @staticmethod
    def _key(args: tuple, kwargs: dict) -> str:
        return repr((args, sorted(kwargs.items(), key=lambda kv: kv[0])))

    def __init__(
        self,
        workers: int | list[WorkerSpec | dict] = 2,
        *,
        zookeeper: int = 1,
        worker_options: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        include: list[str] | None = None,
        redis_port: int = 0,
        appendonly: bool = False,
        start: bool = True,
        start_timeout: float = 60.0,
        reuse: bool = True,
        name: str | None = None,
    ) -> None:
        if self._initialised:
            return
        self._initialised = True
        self._reused = False
        if isinstance(zookeeper, bool) or not isinstance(zookeeper, int) or zookeeper < 0:
            raise ValueError(f"zookeeper must be 0 (none), 1 (standalone) or N >= 2 (ensemble), not {zookeeper!r}")
        self.id = name or f"lk{uuid.uuid4().hex[:6]}"
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{self.id}-", dir=run_root()))
        self.settings = dict(settings or {})
        self.include = list(include) if include is not None else lesson_modules()
        self.start_timeout = start_timeout
        self.state = "new"
        self.started_in: float | None = None
        self._worker_options = dict(worker_options or {})
        self._guard = None
        self._kernel_zk = None

        self.redis = RedisService(
            name="redis", run_dir=self.run_dir, cluster_id=self.id, port=redis_port or free_port(),
            appendonly=appendonly, on_spawn=self._record,
        )
        self.zookeepers: list[ZooKeeperService] = (
            ensemble(zookeeper, self.run_dir, self.id) if zookeeper else []
        )
        for zk in self.zookeepers:
            zk.on_spawn = self._record
        self.workers: dict[str, WorkerService] = {}
        specs = self._initial_specs(workers)
        self.app: Celery = make_app(self.redis.url, settings=self.settings, include=self.include)
        for spec in specs:
            self._make_worker(spec)
        if start:
            self.start()

    # ------------------------------------------------------------------ construction
    def _initial_specs(self, workers: int | list) -> list[WorkerSpec]:
        if isinstance(workers, bool) or not isinstance(workers, int | list | tuple):
            raise ValueError(f"workers must be a count or a list of worker specs, not {workers!r}")
        if isinstance(workers, int):
            if workers < 0:
                raise ValueError(f"workers must be >= 0, not {workers}")
            return [WorkerSpec.from_options(f"w{i}", **self._worker_options) for i in range(1, workers + 1)]
        specs = []
        for i, item in enumerate(workers, start=1):
            if isinstance(item, WorkerSpec):
                spec = item
            elif isinstance(item, dict):
                opts = {**self._worker_options, **item}
                spec = WorkerSpec.from_options(opts.pop("name", f"w{i}"), **opts)
            else:
                raise ValueError(f"worker spec must be a WorkerSpec or dict, not {item!r}")
            spec.name = spec.name or f"w{i}"
            specs.append(spec)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"worker names must be unique: {names}")
        return specs

    def _make_worker(self, spec: WorkerSpec) -> WorkerService:
        if spec.name in self.workers or spec.name == "redis" or spec.name.startswith("zk"):
            raise ValueError(f"a service named {spec.name!r} already exists in this cluster")
        worker = WorkerService(
            name=spec.name, run_dir=self.run_dir, cluster_id=self.id, spec=spec,
            redis_url=self.redis.url, zk_hosts=self.zk_hosts, settings=self.settings,
            include=self.include, ping=self._ping_one, on_spawn=self._record,
        )
        self.workers[spec.name] = worker
        return worker

    def _record(self, service: Service) -> None:
        """Tell the guard about a new process group (and refresh the state file)."""
        with open(self.run_dir / "pgids", "a") as fh:
            fh.write(f"{service.pid}\n")
        self._write_state()

    # ------------------------------------------------------------------ addresses
    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def zk_hosts(self) -> str:
        """The kazoo connection string (``""`` when the cluster has no ZooKeeper)."""
        return ",".join(zk.hosts for zk in self.zookeepers)

    @property
    def services(self) -> list[Service]:
        return [self.redis, *self.zookeepers, *self.workers.values()]

    # ------------------------------------------------------------------ life cycle
    def start(self) -> LocalCluster:
        """Start every service (in parallel) and return when all are ready."""
        if self.state == "running":
            return self
        if self.state == "closed":
            raise RuntimeError(f"cluster {self.id} is closed; create a new LocalCluster")
        t0 = time.monotonic()
        self.state = "starting"
        self._register()
        try:
            self._start_guard()
            self.redis.spawn()
            for zk in self.zookeepers:
                zk.spawn()
            self.redis.wait_ready(self.start_timeout)
            for worker in self.workers.values():
                worker.spawn()
            self._wait_all([*self.zookeepers, *self.workers.values()])
            if len(self.zookeepers) > 1 and not kazoo_session_ok(self.zk_hosts, timeout=10):
                raise ServiceError("zookeeper", "ensemble nodes are up but no kazoo session could be opened",
                                   log=self.zookeepers[0].log_path)
        except BaseException:
            self.close(keep_run_dir=True)
            raise
        self.state = "running"
        self.started_in = time.monotonic() - t0
        self.app.set_current()
        self.app.set_default()
        self._write_state()
        return self

    def _wait_all(self, services: list[Service]) -> None:
        if not services:
            return
        with ThreadPoolExecutor(max_workers=len(services), thread_name_prefix="labkit-ready") as pool:
            futures = [pool.submit(s.wait_ready, self.start_timeout) for s in services]
            errors = [f.exception() for f in futures]
        errors = [e for e in errors if e is not None]
        if errors:
            raise errors[0]

    def _start_guard(self) -> None:
        env = dict(os.environ, LABKIT_CLUSTER=self.id)
        self._guard = spawn(
            [sys.executable, "-m", "labkit.services.guard", str(os.getpid()), self.id, str(self.run_dir)],
            log=self.run_dir / "logs" / "guard.log", env=env, pdeathsig=False,
        )

    def _register(self) -> None:
        with LocalCluster._lock:
            LocalCluster._instances[self._key_value] = self
            if not LocalCluster._atexit_registered:
                atexit.register(LocalCluster.close_all)
                LocalCluster._atexit_registered = True

    def close(self, keep_run_dir: bool = False) -> None:
        """Stop every service (workers first) and remove the run directory. Idempotent."""
        if self.state == "closed":
            return
        self.state = "closing"
        if self._kernel_zk is not None:
            with contextlib.suppress(Exception):
                self._kernel_zk.stop()
                self._kernel_zk.close()
        with contextlib.suppress(Exception):
            self.app.close()
        ordered = [*self.workers.values(), *self.zookeepers, self.redis]
        for s in ordered:
            s.terminate()
        for s in ordered:
            s.finish()
        if self._guard is not None and self._guard.poll() is None:
            self._guard.terminate()
            with contextlib.suppress(Exception):
                self._guard.wait(5)
        # anything a task started that escaped its group (a detached subprocess)
        for p in labkit_processes(self.id):
            with contextlib.suppress(Exception):
                p.kill()
        self.state = "closed"
        with LocalCluster._lock:
            if LocalCluster._instances.get(self._key_value) is self:
                del LocalCluster._instances[self._key_value]
        if not keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    @classmethod
    def close_all(cls) -> None:
        """Close every cluster this process started (runs at interpreter exit)."""
        for cluster in list(cls._instances.values()):
            with contextlib.suppress(Exception):
                cluster.close()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ workers
    def add_worker(self, name: str | None = None, *, start: bool = True, **options: Any) -> WorkerService:
        """Start one more worker; ``options`` are :class:`WorkerSpec` fields."""
        if name is None:
            i = len(self.workers) + 1
            while f"w{i}" in self.workers:
                i += 1
            name = f"w{i}"
        spec = WorkerSpec.from_options(name, **{**self._worker_options, **options})
        worker = self._make_worker(spec)
        if start and self.state == "running":
            try:
                worker.start(self.start_timeout)
            except BaseException:
                worker.stop()
                del self.workers[name]
                raise
        return worker

    def remove_worker(self, name: str) -> None:
        """Stop a worker and forget it."""
        worker = self._worker(name)
        worker.stop()
        del self.workers[name]

    def _worker(self, name: str) -> WorkerService:
        try:
            return self.workers[name]
        except KeyError:
            raise KeyError(f"no worker {name!r}; workers: {sorted(self.workers)}") from None

    def service(self, name: str) -> Service:
        """The service called ``name``: ``redis``, ``zk`` / ``zk1``..., or a worker name."""
        for s in self.services:
            if s.name == name:
                return s
        if name == "zk" and self.zookeepers:
            return self.zookeepers[0]
        raise KeyError(f"no service {name!r}; services: {[s.name for s in self.services]}")

    # ------------------------------------------------------------------ faults
    def kill(self, name: str, sig: int = signal.SIGKILL, *, child: int | None = None) -> int:
        """Send ``sig`` (SIGKILL by default) to a service, or to pool child ``child`` of a worker.

        Returns the PID that received it.
        """
        if child is not None:
            return self._worker(name).signal_child(child, sig)
        service = self.service(name)
        pid = service.pid
        service.kill(sig)
        return pid

    def pause(self, name: str, *, child: int | None = None) -> int:
        """SIGSTOP a service (or one worker child): it keeps its sockets but answers nothing."""
        if child is not None:
            return self.kill(name, signal.SIGSTOP, child=child)
        service = self.service(name)
        service.pause()
        return service.pid

    def resume(self, name: str, *, child: int | None = None) -> int:
        """SIGCONT what :meth:`pause` stopped."""
        if child is not None:
            return self.kill(name, signal.SIGCONT, child=child)
        service = self.service(name)
        service.resume()
        return service.pid

    def restart(self, name: str) -> Service:
        """Stop (if needed) and start a service again on the same port; waits until ready."""
        service = self.service(name)
        service.restart(self.start_timeout)
        if service is self.redis:
            self._after_broker_restart()
        return service

    def _after_broker_restart(self) -> None:
        """Drop pooled connections to the old Redis and wait until live workers reconnect.

        Workers retry the broker every ~2 s, and the kernel's pooled sockets are
        dead: without this, the next ping or publish fails once at random.
        """
        self.app.close()  # Celery rebuilds its connection pools on next use
        live = [w for w in self.workers.values() if w.alive() and w.state == "running"]
        deadline = time.monotonic() + self.start_timeout
        pending = {w.hostname for w in live}
        while pending and time.monotonic() < deadline:
            try:
                replies = self.app.control.ping(destination=list(pending), timeout=0.5)
            except (OSError, ConnectionError, RedisConnectionError, OperationalError):
                continue  # a pooled socket to the old server: kombu drops it on the error
            pending -= {h for r in replies for h in r}
        if pending:
            raise ServiceError("redis", f"restarted, but workers {sorted(pending)} did not reconnect "
                               f"within {self.start_timeout:.0f} s", log=self.redis.log_path)

    def children(self, name: str) -> list[int]:
        """PIDs of a worker's pool processes."""
        return self._worker(name).children()

    # ------------------------------------------------------------------ clients
    def _ping_one(self, hostname: str, timeout: float) -> bool:
        replies = self.app.control.ping(destination=[hostname], timeout=timeout, limit=1)
        return any(hostname in r for r in replies)

    def ping(self, timeout: float = 1.0) -> dict[str, bool]:
        """Control-ping every worker: ``{"w1": True, ...}``.

        Asks again for the missing ones until ``timeout``: a reply left over
        from an earlier ping (a worker that was paused answers every ping it
        missed) can end one ``control.ping(limit=...)`` round early.
        """
        hosts = {w.hostname: n for n, w in self.workers.items()}
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while True:
            pending = [h for h in hosts if h not in seen]
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                break
            replies = self.app.control.ping(destination=pending, timeout=remaining, limit=len(pending))
            seen |= {h for r in replies for h in r if h in hosts}
        return {n: h in seen for h, n in hosts.items()}

    def redis_client(self, **kwargs: Any):
        """A redis-py client for the cluster's Redis (a new one per call)."""
        return self.redis.client(**kwargs)

    def zk(self):
        """The kernel's kazoo client for this cluster (started once, closed with the cluster)."""
        if not self.zookeepers:
            raise RuntimeError("this cluster has no ZooKeeper: LocalCluster(zookeeper=1)")
        if self._kernel_zk is None or not self._kernel_zk.connected:
            from kazoo.client import KazooClient  # noqa: PLC0415

            self._kernel_zk = KazooClient(hosts=self.zk_hosts, timeout=10)
            self._kernel_zk.start(timeout=15)
        return self._kernel_zk

    def task(self, task_or_name: Any):
        """The cluster app's instance of a task (pass the function or its name)."""
        name = task_or_name if isinstance(task_or_name, str) else task_or_name.name
        return self.app.tasks[name]

    def logs(self, name: str, lines: int = 20) -> str:
        """The last ``lines`` lines of a service's log."""
        return "\n".join(log_tail(self.service(name).log_path, lines))

    # ------------------------------------------------------------------ reporting
    def status(self) -> list[dict]:
        return [s.status() for s in self.services]

    def _write_state(self) -> None:
        state = {
            "id": self.id,
            "owner_pid": os.getpid(),
            "state": self.state,
            "redis_url": self.redis_url,
            "zk_hosts": self.zk_hosts,
            "run_dir": str(self.run_dir),
            "services": self.status(),
        }
        tmp = self.run_dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.run_dir / "cluster.json")

    def __repr__(self) -> str:
        head = f"<LocalCluster {self.id} {self.state}: redis {self.redis_url}"
        if self.zookeepers:
            head += f", zookeeper {self.zk_hosts}"
        head += f", {len(self.workers)} worker(s)>"
        rows = [f"  {s['name']:<8} {s['kind']:<9} {s['state']:<8} pid={s['pid']}  {s['address']}" for s in self.status()]
        return "\n".join([head, *rows])

    def _repr_html_(self) -> str:
        colours = {"running": "#2e7d32", "paused": "#ef6c00", "starting": "#1565c0"}
        rows = []
        for s in self.status():
            colour = colours.get(s["state"], "#c62828")
            rows.append(
                "<tr>" + "".join(
                    f"<td style='text-align:left'>{html.escape(str(v))}</td>"
                    for v in (s["name"], s["kind"]) )
                + f"<td style='text-align:left;color:{colour}'><b>{html.escape(s['state'])}</b></td>"
                + "".join(
                    f"<td style='text-align:left'>{html.escape(str(v))}</td>"
                    for v in (s["pid"], s["address"], "" if s["ready_s"] is None else f"{s['ready_s']} s"))
                + "</tr>"
            )
        started = f" — ready in {self.started_in:.2f} s" if self.started_in else ""
        return (
            f"<div><b>LocalCluster {html.escape(self.id)}</b> ({html.escape(self.state)}{started})<br>"
            f"<code>redis_url = {html.escape(self.redis_url)}</code><br>"
            + (f"<code>zk_hosts = {html.escape(self.zk_hosts)}</code><br>" if self.zookeepers else "")
            + f"<small>run dir: {html.escape(str(self.run_dir))}</small>"
            "<table><thead><tr><th>service</th><th>kind</th><th>state</th><th>pid</th>"
            "<th>address</th><th>ready after</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></div>"
        )



class AttachedCluster:
    """A cluster somebody else runs (a workshop's docker compose, ``labkit up``).

    It offers the client side of :class:`LocalCluster` — ``app``, ``task()``,
    ``ping()``, ``redis_client()``, ``zk()`` — but no fault injection: the
    processes are not ours to kill. ``close()`` closes only our clients.
    """

    def __init__(self, redis_url: str, zk_hosts: str = "", settings: dict[str, Any] | None = None) -> None:
        if not redis_url.startswith("redis://"):
            raise ValueError(f"redis_url must look like redis://host:port/db, not {redis_url!r}")
        self.redis_url, self.zk_hosts = redis_url, zk_hosts
        self.app: Celery = make_app(redis_url, settings=settings)
        self._kernel_zk = None
        self.state = "attached"

    def task(self, task_or_name: Any):
        name = task_or_name if isinstance(task_or_name, str) else task_or_name.name
        return self.app.tasks[name]

    def ping(self, timeout: float = 1.0) -> dict[str, bool]:
        """Every worker that answers: ``{"w1@host": True, ...}``."""
        return {h: True for r in self.app.control.ping(timeout=timeout) for h in r}

    def redis_client(self, **kwargs: Any):
        import redis  # noqa: PLC0415

        return redis.Redis.from_url(self.redis_url, **kwargs)

    def zk(self):
        if not self.zk_hosts:
            raise RuntimeError("no ZooKeeper address: set LABKIT_ZK_HOSTS or pass zk_hosts=")
        if self._kernel_zk is None:
            from kazoo.client import KazooClient  # noqa: PLC0415

            self._kernel_zk = KazooClient(hosts=self.zk_hosts, timeout=10)
            self._kernel_zk.start(timeout=15)
        return self._kernel_zk

    def __getattr__(self, name: str):
        if name in ("kill", "pause", "resume", "restart", "add_worker", "remove_worker", "children"):
            raise RuntimeError(
                f"{name}() needs a LocalCluster: this cluster is attached ({self.redis_url}) and its "
                "processes are not this kernel's to control"
            )
        raise AttributeError(name)

    def close(self) -> None:
        if self._kernel_zk is not None:
            with contextlib.suppress(Exception):
                self._kernel_zk.stop()
                self._kernel_zk.close()
        with contextlib.suppress(Exception):
            self.app.close()
        self.state = "closed"

    def __enter__(self) -> AttachedCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AttachedCluster redis {self.redis_url}, zookeeper {self.zk_hosts or '-'}>"


def attach(redis_url: str | None = None, zk_hosts: str | None = None) -> AttachedCluster:
    """Use a running cluster: arguments, else ``$LABKIT_REDIS_URL`` / ``$LABKIT_ZK_HOSTS``."""
    url = redis_url or os.environ.get("LABKIT_REDIS_URL")
    if not url:
        raise RuntimeError(
            "attach() needs a Redis URL: pass redis_url= or set LABKIT_REDIS_URL "
            "(`labkit up --json` prints one; docker compose sets it in the lab container)"
        )
    return AttachedCluster(url, zk_hosts if zk_hosts is not None else os.environ.get("LABKIT_ZK_HOSTS", ""))
