"""LocalCluster: real Redis, ZooKeeper and Celery workers, owned by one Python object.

    >>> from labkit import LocalCluster
    >>> with LocalCluster(workers=2) as c:          # doctest: +SKIP
    ...     c.kill("w1")                            # SIGKILL a worker
    ...     c.restart("w1")

What it promises (see the README's "Architecture"):

* every service is a real process on 127.0.0.1 on a free port, with its own
  log under ``run_dir/logs``; start-up is parallel and returns only when all
  are ready, or raises :class:`~labkit.services.base.ServiceError` naming
  every service that failed, the command and its log tail;
* arguments are checked before anything touches the disk;
* ``close()`` is idempotent, also runs at interpreter exit, and a per-cluster
  guard process kills everything if the owner dies without closing
  (SIGKILL of the kernel included);
* re-running a notebook cell ``LocalCluster(...)`` with the same arguments
  returns the cluster already running in this process;
* faults on demand: ``kill``/``pause``/``resume``/``restart`` any service by
  name (``"redis"``, ``"zk"`` or ``"zk2"``, ``"w1"``, a beat's name), or one
  of a worker's pool children with ``child=i``; ``partition``/``heal`` a
  worker started with ``relay=True`` (:mod:`~labkit.services.relay`);
  ``redis="sentinel"`` adds a replica and three sentinels
  (:mod:`~labkit.services.sentinel`) so the primary can fail over;
* ``broker="rabbitmq"`` makes a RabbitMQ node the broker (Redis stays the
  result backend), ``rabbitmq_nodes=3`` a three-node RabbitMQ cluster with
  quorum queues (:mod:`~labkit.services.rabbitmq`).

The client side (``app``, ``task``, ``ping``, ``redis_client``, ``zk``) is
:class:`~labkit.client.ClusterClient`, shared with
:class:`~labkit.client.AttachedCluster`.
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

from celery import _state as celery_state
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError

from .app import lesson_modules, make_app, merge_settings
from .client import AttachedCluster, ClusterClient, _reconnect_results, attach
from .poll import poll_until
from .services.base import (
    Service,
    ServiceError,
    free_port,
    kill_group,
    labkit_processes,
    log_tail,
    spawn,
)
from .services.beat import BeatService
from .services.flower import FlowerService
from .services.guard import keep_logs
from .services.launcher import LauncherService, preload_enabled
from .services.rabbitmq import (
    QueueDepths,
    RabbitMQGroup,
    RabbitMQService,
    amqp_url,
    broker_settings,
    rabbitmq_group,
)
from .services.redis import RedisService
from .services.relay import RelayService
from .services.sentinel import SentinelGroup, sentinel_group
from .services.worker import WorkerService, WorkerSpec
from .services.zookeeper import ZooKeeperService, ensemble, kazoo_session_ok
from .status import Status

__all__ = ["AttachedCluster", "LocalCluster", "attach", "run_root"]

_RESERVED = ("redis", "zk", "guard", "replica", "launcher", "epmd", "rabbit")
_RESERVED_PREFIXES = ("zk", "sentinel", "rabbit")
REDIS_MODES = ("single", "sentinel")
BROKERS = ("redis", "rabbitmq")


def run_root() -> Path:
    """Where clusters keep their run directories (``$LABKIT_RUN_ROOT`` or /tmp/labkit-UID)."""
    root = os.environ.get("LABKIT_RUN_ROOT") or os.path.join(tempfile.gettempdir(), f"labkit-{os.getuid()}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


class LocalCluster(ClusterClient):
    """A broker (Redis or RabbitMQ), Redis, an optional ZooKeeper (1 node or an ensemble), workers and beats.

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
    events:
        Turn on task events (``-E``) on every worker, also those added later
        (a worker's own ``events=False`` wins). Off by default: events cost
        the workers a little (lesson 05 measures it), and a monitor
        (:meth:`dashboard`, :meth:`add_flower`) needs them.
    settings:
        Celery settings shared by ``cluster.app`` and every worker and beat.
    include:
        Modules whose tasks the workers import (default: every lesson module).
    redis_port, appendonly:
        Pin Redis to a port (default: a free one); turn on its append-only file.
    redis:
        ``"single"`` (one server) or ``"sentinel"``: a primary, a replica and
        three sentinels; every client reaches the primary through the
        sentinels (``sentinel://`` URLs), so it follows a failover.
    broker:
        ``"redis"`` (the default: Redis is broker and result backend) or
        ``"rabbitmq"``: a RabbitMQ node is the broker, Redis stays the result
        backend and the store lessons count in.
    rabbitmq_nodes:
        With ``broker="rabbitmq"``: 1 node, or N >= 2 clustered nodes whose
        queues are quorum queues (replicated; Celery's settings for them are
        added, see :func:`~labkit.services.rabbitmq.broker_settings`).
    management:
        With ``broker="rabbitmq"``: start RabbitMQ's management plugin (web UI
        and HTTP API) on a free loopback port; or later, ``add_management()``.
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
            if existing is not None and existing.state == Status.RUNNING:
                existing._reused = True
                return existing
        self = super().__new__(cls)
        # reuse=False: a key of its own, or it would take a running twin's place in the
        # registry, and close_all() (at exit) would miss the twin
        self._key_value = key if reuse else f"{key}#{uuid.uuid4().hex}"
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
        events: bool = False,
        settings: dict[str, Any] | None = None,
        include: list[str] | None = None,
        redis_port: int = 0,
        appendonly: bool = False,
        redis: str = "single",
        broker: str = "redis",
        rabbitmq_nodes: int = 1,
        management: bool = False,
        start: bool = True,
        start_timeout: float = 60.0,
        reuse: bool = True,
        name: str | None = None,
    ) -> None:
        if self._initialised:
            return
        # every argument is checked before anything touches the disk
        specs = self.check_options(workers, zookeeper=zookeeper, worker_options=worker_options,
                                   events=events, settings=settings, include=include, redis_port=redis_port,
                                   start_timeout=start_timeout, name=name, redis=redis, broker=broker,
                                   rabbitmq_nodes=rabbitmq_nodes, management=management)
        self._initialised = True
        self._reused = False
        self.id = name or f"lk{uuid.uuid4().hex[:6]}"
        self.settings = dict(settings or {})
        self.include = list(include) if include is not None else lesson_modules()
        self.start_timeout = start_timeout
        self.state = Status.NEW
        self.started_in: float | None = None
        self.events = events
        self._worker_options = {"events": True, **(worker_options or {})} if events else dict(worker_options or {})
        self._guard = None
        self._kernel_zk = None
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{self.id}-", dir=run_root()))

        self.redis = RedisService(
            name="redis", run_dir=self.run_dir, cluster_id=self.id, port=redis_port or free_port(),
            appendonly=appendonly, on_spawn=self._record,
        )
        self.sentinel: SentinelGroup | None = None
        if redis == "sentinel":
            self.sentinel = sentinel_group(self.redis, self.run_dir, self.id)
            for s in self.sentinel.services:
                s.on_spawn = self._record
            self.settings = merge_settings(self.sentinel.settings(), self.settings)
        self.broker = broker
        self.rabbitmq: RabbitMQGroup | None = None
        if broker == "rabbitmq":
            self.rabbitmq = rabbitmq_group(self.run_dir, self.id, rabbitmq_nodes, management=management)
            for s in self.rabbitmq.services:
                s.on_spawn = self._record
            self.settings = merge_settings(broker_settings(rabbitmq_nodes), self.settings)
        self.relays: dict[str, RelayService] = {}
        self.zookeepers: list[ZooKeeperService] = (
            ensemble(zookeeper, self.run_dir, self.id) if zookeeper else []
        )
        for zk in self.zookeepers:
            zk.on_spawn = self._record
        # workers are forked from one preloaded interpreter (see services/launcher.py), started on demand
        self.launcher: LauncherService | None = (
            LauncherService(name="launcher", run_dir=self.run_dir, cluster_id=self.id, include=self.include,
                            start_timeout=start_timeout, on_spawn=self._record)
            if preload_enabled() else None
        )
        self.workers: dict[str, WorkerService] = {}
        self.beats: dict[str, BeatService] = {}
        self.flowers: dict[str, FlowerService] = {}
        self.app = make_app(self.redis_url, settings=self.settings, include=self.include,
                            broker_url=self._broker_override)
        for spec in specs:
            self._make_worker(spec)
        if start:
            self.start()

    # ------------------------------------------------------------------ construction
    @classmethod
    def check_options(
        cls,
        workers: int | list[WorkerSpec | dict] = 2,
        *,
        zookeeper: int = 1,
        worker_options: dict[str, Any] | None = None,
        events: bool = False,
        settings: dict[str, Any] | None = None,
        include: list[str] | None = None,
        redis_port: int = 0,
        start_timeout: float = 60.0,
        name: str | None = None,
        redis: str = "single",
        broker: str = "redis",
        rabbitmq_nodes: int = 1,
        management: bool = False,
        **_ignored: Any,
    ) -> list[WorkerSpec]:
        """Validate ``LocalCluster`` arguments without starting anything; returns the worker specs.

        Raises ``ValueError`` / ``TypeError`` naming the bad argument. Lessons'
        ``CLUSTER`` dicts are checked with it by the contract test.
        """
        if isinstance(zookeeper, bool) or not isinstance(zookeeper, int) or zookeeper < 0:
            raise ValueError(f"zookeeper must be 0 (none), 1 (standalone) or N >= 2 (ensemble), not {zookeeper!r}")
        if settings is not None and not isinstance(settings, dict):
            raise TypeError(f"settings must be a dict of Celery settings, not {settings!r}")
        if include is not None and (isinstance(include, str) or not all(isinstance(m, str) for m in include)):
            raise TypeError(f"include must be a list of module names, not {include!r}")
        if isinstance(redis_port, bool) or not isinstance(redis_port, int) or not 0 <= redis_port < 65536:
            raise ValueError(f"redis_port must be 0 (a free port) or a TCP port number, not {redis_port!r}")
        if not isinstance(start_timeout, int | float) or start_timeout <= 0:
            raise ValueError(f"start_timeout must be a positive number of seconds, not {start_timeout!r}")
        if name is not None and (not isinstance(name, str) or not name.replace("-", "").isalnum()):
            raise ValueError(f"name must be letters, digits and '-', not {name!r}")
        if redis not in REDIS_MODES:
            raise ValueError(f"redis must be one of {REDIS_MODES}, not {redis!r}")
        if not isinstance(events, bool):
            raise TypeError(f"events must be True or False, not {events!r}")
        if broker not in BROKERS:
            raise ValueError(f"broker must be one of {BROKERS}, not {broker!r}")
        if isinstance(rabbitmq_nodes, bool) or not isinstance(rabbitmq_nodes, int) or rabbitmq_nodes < 1:
            raise ValueError(f"rabbitmq_nodes must be 1 (one node) or N >= 2 (a cluster), not {rabbitmq_nodes!r}")
        if broker != "rabbitmq" and (rabbitmq_nodes != 1 or management):
            raise ValueError("rabbitmq_nodes and management need broker='rabbitmq'")
        if not isinstance(management, bool):
            raise TypeError(f"management must be True or False, not {management!r}")
        options = {"events": True, **(worker_options or {})} if events else dict(worker_options or {})
        if redis == "sentinel" and options.get("relay"):
            raise ValueError("relay=True needs redis='single': a relay points at one fixed server")
        if rabbitmq_nodes > 1 and options.get("relay"):
            raise ValueError("relay=True needs one broker node: a relay points at one fixed server")
        if isinstance(workers, bool) or not isinstance(workers, int | list | tuple):
            raise ValueError(f"workers must be a count or a list of worker specs, not {workers!r}")
        if isinstance(workers, int):
            if workers < 0:
                raise ValueError(f"workers must be >= 0, not {workers}")
            return [WorkerSpec.from_options(f"w{i}", **options) for i in range(1, workers + 1)]
        specs = []
        for i, item in enumerate(workers, start=1):
            if isinstance(item, WorkerSpec):
                spec = item
            elif isinstance(item, dict):
                opts = {**options, **item}
                spec = WorkerSpec.from_options(opts.pop("name", f"w{i}"), **opts)
            else:
                raise ValueError(f"worker spec must be a WorkerSpec or dict, not {item!r}")
            spec.name = spec.name or f"w{i}"
            specs.append(spec)
        if redis == "sentinel" and any(s.relay for s in specs):
            raise ValueError("relay=True needs redis='single': a relay points at one fixed server")
        if rabbitmq_nodes > 1 and any(s.relay for s in specs):
            raise ValueError("relay=True needs one broker node: a relay points at one fixed server")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"worker names must be unique: {names}")
        clash = [n for n in names if n in _RESERVED or n.startswith(_RESERVED_PREFIXES)]
        if clash:
            raise ValueError(f"worker names {clash} are reserved for the cluster's own services")
        return specs

    def _check_new_name(self, name: str) -> None:
        taken = {s.name for s in self.services}
        if name in taken or name in _RESERVED or name.startswith(_RESERVED_PREFIXES):
            raise ValueError(f"a service named {name!r} already exists in this cluster (or the name is reserved)")

    def _celery_env(self) -> dict[str, Any]:
        """What every Celery process of this cluster is told (see CeleryService)."""
        return {"run_dir": self.run_dir, "cluster_id": self.id, "redis_url": self.redis_url,
                "broker_url": self._broker_override or "", "zk_hosts": self.zk_hosts,
                "settings": self.settings, "on_spawn": self._record}

    def _make_worker(self, spec: WorkerSpec) -> WorkerService:
        self._check_new_name(spec.name)
        env = self._celery_env()
        if spec.relay:
            if self.sentinel is not None and self.rabbitmq is None:
                raise ValueError("relay=True needs redis='single': a relay points at one fixed server")
            if self.rabbitmq is not None and len(self.rabbitmq.nodes) > 1:
                raise ValueError("relay=True needs one broker node: a relay points at one fixed server")
            # the relay carries the worker's link to the broker (RabbitMQ's node, else Redis)
            target = self.rabbitmq.nodes[0].port if self.rabbitmq is not None else self.redis.port
            relay = RelayService(name=f"{spec.name}-relay", run_dir=self.run_dir, cluster_id=self.id,
                                 target_port=target, for_worker=spec.name, on_spawn=self._record)
            self.relays[spec.name] = relay
            if self.rabbitmq is not None:
                _ = relay.url  # picks the relay's port
                env["broker_url"] = amqp_url(relay.port)
            else:
                env["redis_url"] = relay.url
        worker = WorkerService(name=spec.name, spec=spec, include=self.include, ping=self._ping_one,
                               launcher=self.launcher, **env)
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
        """What every client of the cluster uses: Redis's URL, or the sentinels' with ``redis="sentinel"``."""
        return self.sentinel.url if self.sentinel is not None else self.redis.url

    @property
    def broker_url(self) -> str:
        """The Celery broker URL: RabbitMQ's node(s) (``;``-separated for a cluster), else :attr:`redis_url`."""
        return self._broker_override or self.redis_url

    @property
    def _broker_override(self) -> str | None:
        return self.rabbitmq.url if self.rabbitmq is not None else None

    @property
    def rabbitmq_nodes(self) -> list[RabbitMQService]:
        """The RabbitMQ node services (empty when Redis is the broker)."""
        return list(self.rabbitmq.nodes) if self.rabbitmq is not None else []

    @property
    def management_url(self) -> str:
        """RabbitMQ's management UI (``http://127.0.0.1:PORT``; user and password ``guest``), or ``""``."""
        return self.rabbitmq.management_url if self.rabbitmq is not None else ""

    @property
    def zk_hosts(self) -> str:
        """The kazoo connection string (``""`` when the cluster has no ZooKeeper)."""
        return ",".join(zk.hosts for zk in self.zookeepers)

    @property
    def services(self) -> list[Service]:
        ha = self.sentinel.services if self.sentinel is not None else []
        rabbit = self.rabbitmq.services if self.rabbitmq is not None else []
        launcher = [self.launcher] if self.launcher is not None and self.launcher.proc is not None else []
        return [self.redis, *ha, *rabbit, *self.zookeepers, *self.relays.values(), *launcher,
                *self.workers.values(),
                *self.beats.values(), *self.flowers.values()]

    # ------------------------------------------------------------------ life cycle
    def start(self) -> LocalCluster:
        """Start every service (in parallel) and return when all are ready.

        After :meth:`start_soon`, waits for that start to finish (and raises its error).
        """
        if self.state == Status.RUNNING:
            return self
        if self.state == Status.CLOSED:
            raise RuntimeError(f"cluster {self.id} is closed; create a new LocalCluster")
        background, self._background = getattr(self, "_background", None), None
        if background is not None:
            thread, box = background
            thread.join()
            if "error" in box:
                raise box["error"]
        else:
            self._start_services()
        self.app.set_current()
        self.app.set_default()
        return self

    def start_soon(self) -> LocalCluster:
        """Begin starting the services in a background thread and return at once.

        For a cluster that a notebook needs only later (a RabbitMQ cluster takes
        seconds to boot): its start-up overlaps with the cells before.
        :meth:`start` waits for it to be ready (or raises what went wrong).
        """
        if self.state != Status.NEW or getattr(self, "_background", None) is not None:
            return self
        box: dict[str, BaseException] = {}

        def run() -> None:
            try:
                self._start_services()
            except BaseException as exc:  # handed to start()
                box["error"] = exc

        thread = threading.Thread(target=run, name=f"labkit-start-{self.id}", daemon=True)
        self._background = (thread, box)
        thread.start()
        return self

    def _start_services(self) -> None:
        t0 = time.monotonic()
        self.state = Status.STARTING
        self._register()
        try:
            self._start_guard()
            if self.launcher is not None and any(w.fresh_reason(start=False) is None
                                                 for w in self.workers.values()):
                self.launcher.spawn()  # first: its imports are the longest part of a worker's start
            self.redis.spawn()
            for zk in self.zookeepers:
                zk.spawn()
            rabbit = self.rabbitmq.nodes if self.rabbitmq is not None else []
            if self.rabbitmq is not None:
                self.rabbitmq.epmd.spawn()
                self._wait_all([self.rabbitmq.epmd])  # a node registers with it as it boots
                self.rabbitmq.spawn_nodes(self.start_timeout)  # a cluster's seed first
            self._wait_all([self.redis])
            ha = self.sentinel.services if self.sentinel is not None else []
            for s in [*ha, *self.relays.values()]:
                s.spawn()
            # a worker's first connection goes through its relay, to a broker that answers
            self._wait_all([*self.relays.values(), *rabbit])
            for worker in self.workers.values():
                worker.spawn()
            for beat in self.beats.values():
                beat.spawn()
            self._wait_all([*ha, *self.zookeepers, *self.workers.values(), *self.beats.values()])
            if len(self.zookeepers) > 1 and not kazoo_session_ok(self.zk_hosts, timeout=10):
                raise ServiceError("zookeeper", "ensemble nodes are up but no kazoo session could be opened",
                                   log=self.zookeepers[0].log_path)
        except BaseException:
            self.close(keep_run_dir=True)
            raise
        self.state = Status.RUNNING
        self.started_in = time.monotonic() - t0
        self._write_state()

    def _wait_all(self, services: list[Service]) -> None:
        """Wait for every service at once; report *all* that failed, not the first."""
        if not services:
            return
        pool = ThreadPoolExecutor(max_workers=len(services), thread_name_prefix="labkit-ready")
        try:
            futures = [pool.submit(s.wait_ready, self.start_timeout) for s in services]
            errors = [f.exception() for f in futures]
        finally:
            # not shutdown(wait=True): an interrupt (Ctrl-C, nbval's timeout) must reach the
            # caller now, whose clean-up stops the services, and that ends their probes
            pool.shutdown(wait=False, cancel_futures=True)
        errors = [e for e in errors if e is not None]
        if len(errors) == 1:
            raise errors[0]
        if errors:
            names = [getattr(e, "service", "?") for e in errors]
            raise ServiceError(
                ", ".join(names), f"{len(errors)} services failed to start:\n\n"
                + "\n\n".join(str(e) for e in errors),
            ) from errors[0]

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
        """Stop every service (beats and workers first) and remove the run directory. Idempotent."""
        background, self._background = getattr(self, "_background", None), None
        if background is not None:  # a start_soon() under way: let it finish (or fail) first
            background[0].join()
        if self.state == Status.CLOSED:
            return
        self.state = Status.CLOSING
        self._close_clients()
        # clients of the broker first, the broker (and its relays) last: a worker that sends
        # heartbeats publishes worker-offline on its way out, and hangs until SIGKILL if Redis is gone
        ha = self.sentinel.services[::-1] if self.sentinel is not None else []
        rabbit = self.rabbitmq.nodes if self.rabbitmq is not None else []
        # epmd last: a node whose epmd vanished would try to start another one (``epmd -daemon``)
        epmd = [self.rabbitmq.epmd] if self.rabbitmq is not None else []
        for group in ([*self.flowers.values(), *self.beats.values(), *self.workers.values()],
                      [*self.relays.values(), *self.zookeepers, *ha, self.redis, *rabbit], epmd):
            for s in group:
                if isinstance(s, WorkerService | ZooKeeperService | RabbitMQService) \
                        and not keep_run_dir and s.alive():
                    # Nothing a clean stop saves outlives the cluster: the data of a RabbitMQ
                    # node or a ZooKeeper goes with the run directory (a node's clean stop
                    # takes 1 s, 6 s with the management plugin; a JVM's 0.2 s), and so does
                    # every message a worker holds, with its broker. Celery's cold shutdown of
                    # even an idle worker takes 1.5 s, all of it two fixed sleeps (billiard's
                    # exiting pool child sleeps 1 s; the prefork pool then joins a timer
                    # thread that polls every 0.5 s).
                    kill_group(s.proc.pid)
                else:
                    s.terminate()
            for s in group:
                s.finish()
            if self.launcher is not None:  # after the workers: it reports their exits until they are gone
                self.launcher.stop()
        if self._guard is not None and self._guard.poll() is None:
            self._guard.terminate()
            with contextlib.suppress(Exception):
                self._guard.wait(5)
        # anything a task started that escaped its group (a detached subprocess)
        for p in labkit_processes(self.id):
            with contextlib.suppress(Exception):
                p.kill()
        self.state = Status.CLOSED
        with LocalCluster._lock:
            if LocalCluster._instances.get(self._key_value) is self:
                del LocalCluster._instances[self._key_value]
        self._hand_over_current_app()
        keep_logs(self.run_dir, self.id)
        if not keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _hand_over_current_app(self) -> None:
        """Stop being Celery's current and default app; the latest running cluster's app takes over.

        A closed cluster's app left current made every ``@shared_task`` object
        resolve its attributes there: a module imported later (a lesson, in a
        test session) raised ``NotRegistered`` at import. With no cluster
        running, Celery creates a fresh default app on demand.
        """
        with LocalCluster._lock:
            running = [c.app for c in LocalCluster._instances.values() if c.state == Status.RUNNING]
        successor = running[-1] if running else None
        if celery_state._tls.current_app is self.app:
            celery_state._set_current_app(successor)
        if celery_state.default_app is self.app:
            celery_state.set_default_app(successor)

    @classmethod
    def close_all(cls) -> None:
        """Close every cluster this process started (runs at interpreter exit)."""
        for cluster in list(cls._instances.values()):
            with contextlib.suppress(Exception):
                cluster.close()

    def __enter__(self) -> LocalCluster:
        return self.start()

    # ------------------------------------------------------------------ workers and beats
    def add_worker(self, name: str | None = None, *, start: bool = True, **options: Any) -> WorkerService:
        """Start one more worker; ``options`` are :class:`WorkerSpec` fields."""
        if name is None:
            i = len(self.workers) + 1
            while f"w{i}" in self.workers:
                i += 1
            name = f"w{i}"
        spec = WorkerSpec.from_options(name, **{**self._worker_options, **options})
        worker = self._make_worker(spec)
        relay = self.relays.get(name)
        if relay is not None and start and self.state == Status.RUNNING:
            try:
                relay.start(self.start_timeout)
            except BaseException:
                relay.stop()
                del self.relays[name], self.workers[name]
                raise
        self._start_added(worker, self.workers, start)
        return worker

    def remove_worker(self, name: str) -> None:
        """Stop a worker (and its relay) and forget it."""
        self._worker(name).stop()
        del self.workers[name]
        relay = self.relays.pop(name, None)
        if relay is not None:
            relay.stop()

    def add_beat(self, name: str = "beat", *, scheduler: str | None = None, clock_offset: float = 0.0,
                 env: dict[str, str] | None = None, include: list[str] | None = None,
                 max_interval: float = 1.0, start: bool = True) -> BeatService:
        """Start a ``celery beat`` (the scheduler) as a service of this cluster.

        ``scheduler`` is a ``"module:Class"`` scheduler (default: Celery's,
        reading ``beat_schedule`` from the cluster's settings);
        ``clock_offset`` skews its wall clock like a worker's; ``env`` adds
        environment variables (a custom scheduler's configuration). Beats are
        listed in :meth:`status`, recorded with the guard and stopped first
        on :meth:`close`.
        """
        self._check_new_name(name)
        beat = BeatService(name=name, scheduler=scheduler, clock_offset=clock_offset, env=dict(env or {}),
                           include=list(include) if include is not None else self.include,
                           max_interval=max_interval, **self._celery_env())
        self.beats[name] = beat
        self._start_added(beat, self.beats, start)
        return beat

    def remove_beat(self, name: str) -> None:
        """Stop a beat and forget it."""
        beat = self.service(name)
        if not isinstance(beat, BeatService):
            raise KeyError(f"{name!r} is not a beat; beats: {sorted(self.beats)}")
        beat.stop()
        del self.beats[name]

    def add_flower(self, name: str = "flower", *, port: int = 0, enable_events: bool = False) -> FlowerService:
        """Start Flower (Celery's web monitor) on 127.0.0.1; returns the service (``.url``, ``.auth``).

        Basic auth is on with a generated password (``flower.auth``); Flower's
        periodic ``enable_events`` broadcast is off unless ``enable_events=True``
        (see :mod:`labkit.services.flower`). Listed in :meth:`status` and the
        HTML repr; stopped first on :meth:`close`.
        """
        if self.state != Status.RUNNING:
            raise RuntimeError(f"cluster {self.id} is {self.state}: start it before adding Flower")
        self._check_new_name(name)
        flower = FlowerService(name=name, port=port, enable_events=enable_events, **self._celery_env())
        self.flowers[name] = flower
        self._start_added(flower, self.flowers, True)
        return flower

    def add_management(self) -> str:
        """Start RabbitMQ's management plugin on every node (a free loopback port each); returns the first URL.

        The web UI and HTTP API log in as ``guest`` / ``guest`` (RabbitMQ lets that
        user in from loopback only). Already started (``management=True``): just the URL.
        """
        if self.rabbitmq is None:
            raise ServiceError("management", "this cluster's broker is Redis; RabbitMQ's management plugin "
                               "needs a RabbitMQ broker", remedy="LocalCluster(broker='rabbitmq', management=True)")
        if self.state != Status.RUNNING:
            raise RuntimeError(f"cluster {self.id} is {self.state}: start it before adding the management plugin")
        for node in self.rabbitmq.nodes:
            node.enable_management()
        for node in self.rabbitmq.nodes:
            if not poll_until(node._safe_probe, self.start_timeout, 0.1):
                raise ServiceError(node.name, "the management plugin did not answer", log=node.log_path,
                                   remedy="read the node's log above")
        self._write_state()
        return self.management_url

    def management_api(self, path: str) -> Any:
        """``GET`` RabbitMQ's management HTTP API on the first node that serves it (JSON decoded)."""
        node = next((n for n in self.rabbitmq_nodes if n.management_port and n.alive()), None)
        if node is None:
            raise ServiceError("management", "no RabbitMQ node of this cluster runs the management plugin",
                               remedy="LocalCluster(broker='rabbitmq', management=True), or cluster.add_management()")
        return node.api(path)

    def _start_added(self, service: Service, registry: dict[str, Any], start: bool) -> None:
        if start and self.state == Status.RUNNING:
            try:
                service.start(self.start_timeout)
            except BaseException:
                service.stop()
                del registry[service.name]
                raise

    def _worker(self, name: str) -> WorkerService:
        try:
            return self.workers[name]
        except KeyError:
            raise KeyError(f"no worker {name!r}; workers: {sorted(self.workers)}") from None

    def service(self, name: str) -> Service:
        """The service called ``name``: ``redis``, ``zk`` / ``zk1``..., a worker or a beat."""
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
        if service is self.redis or service in self.rabbitmq_nodes:
            self._after_broker_restart(service.name)
        return service

    def _after_broker_restart(self, name: str = "redis") -> None:
        """Drop pooled connections to the old broker and wait until live workers reconnect.

        Workers retry the broker every ~2 s, and the kernel's pooled sockets are
        dead: without this, the next ping or publish fails once at random.
        """
        self.app.close()  # Celery rebuilds its connection pools on next use
        if name == self.redis.name:  # also the result backend
            _reconnect_results(self.app)
        pending = {w.hostname for w in self.workers.values() if w.alive() and w.state == Status.RUNNING}

        def reconnected() -> bool:
            try:
                replies = self.app.control.ping(destination=list(pending), timeout=0.5)
            except (OSError, ConnectionError, RedisConnectionError, OperationalError):
                return False  # a pooled socket to the old server: kombu drops it on the error
            pending.difference_update(h for r in replies for h in r)
            return not pending

        if pending and not poll_until(reconnected, self.start_timeout, interval=0):
            raise ServiceError(name, f"restarted, but workers {sorted(pending)} did not reconnect "
                               f"within {self.start_timeout:.0f} s", log=self.service(name).log_path)

    def partition(self, name: str, mode: str = "hold") -> dict:
        """Cut worker ``name`` off from Redis (it must have been started with ``relay=True``).

        ``mode="hold"``: nothing crosses, connections stay open and bytes wait
        (TCP during a partition); ``"reset"``: every connection is reset and
        new ones are refused (the far side rebooted). Returns the relay's stats.
        """
        return self._relay(name).set_mode(mode)

    def heal(self, name: str) -> dict:
        """Undo :meth:`partition` (and any :meth:`slow_link`): bytes flow again, held ones first."""
        relay = self._relay(name)
        relay.set_delay(0)
        return relay.set_mode("forward")

    def slow_link(self, name: str, seconds: float) -> dict:
        """Delay every chunk between worker ``name`` and Redis by ``seconds`` (both ways)."""
        return self._relay(name).set_delay(seconds)

    def _relay(self, name: str) -> RelayService:
        self._worker(name)
        try:
            return self.relays[name]
        except KeyError:
            raise ServiceError(name, "has no relay, so it cannot be partitioned",
                               remedy=f"start it with cluster.add_worker({name!r}, relay=True) "
                                      "or a worker spec with relay=True") from None

    def children(self, name: str) -> list[int]:
        """PIDs of a worker's pool processes."""
        return self._worker(name).children()

    # ------------------------------------------------------------------ clients
    def _ping_one(self, hostname: str, timeout: float) -> bool:
        """A worker's readiness ping, safe to run from one thread per worker.

        A control call from the pool holds two pooled broker connections at once:
        one to read the replies, and one under the producer that publishes the
        command. With ``broker_pool_limit`` (10) threads inside at once, each holds
        its first and waits for a second that never frees: kombu's pool blocks
        forever. The replies are read on a connection of the ping's own instead.
        """
        with self.app.connection_for_write() as conn:
            replies = self.app.control.ping(destination=[hostname], timeout=timeout, limit=1, connection=conn)
        return any(hostname in r for r in replies)

    def _worker_hostnames(self) -> list[str]:
        return [w.hostname for w in self.workers.values()]

    def _dashboard_options(self) -> dict[str, Any]:
        def queues() -> list[str]:  # workers may be added later: read them at every refresh
            return sorted({q for w in self.workers.values() for q in w.spec.queues})

        def pools() -> dict[str, int]:
            return {w.hostname: 1 if w.spec.pool == "solo" else w.spec.concurrency for w in self.workers.values()}

        options: dict[str, Any] = {"queues": queues, "pools": pools}
        if self.rabbitmq is not None:
            options["depths"] = QueueDepths(self.broker_url)
        return options

    def logs(self, name: str, lines: int = 20) -> str:
        """The last ``lines`` lines of a service's log."""
        return "\n".join(log_tail(self.service(name).log_path, lines))

    # ------------------------------------------------------------------ reporting
    def status(self) -> list[dict]:
        """One dict per service: name, kind, state, pid, address, ready_s, log."""
        return [s.status() for s in self.services]

    def _write_state(self) -> None:
        state = {
            "id": self.id,
            "owner_pid": os.getpid(),
            "state": self.state,
            "redis_url": self.redis_url,
            "broker_url": self.broker_url,
            "zk_hosts": self.zk_hosts,
            "run_dir": str(self.run_dir),
            "services": self.status(),
        }
        tmp = self.run_dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.run_dir / "cluster.json")

    def __repr__(self) -> str:
        head = f"<LocalCluster {self.id} {self.state}: redis {self.redis_url}"
        if self.rabbitmq is not None:
            head += f", rabbitmq {len(self.rabbitmq.nodes)} node(s)"
        if self.zookeepers:
            head += f", zookeeper {self.zk_hosts}"
        head += f", {len(self.workers)} worker(s)"
        if self.beats:
            head += f", {len(self.beats)} beat(s)"
        rows = [f"  {s['name']:<8} {s['kind']:<9} {s['state']:<8} pid={s['pid']}  {s['address']}"
                for s in self.status()]
        return "\n".join([head + ">", *rows])

    def _repr_html_(self) -> str:
        colours = {"running": "#2e7d32", "paused": "#ef6c00", "starting": "#1565c0"}
        rows = []
        for s in self.status():
            colour = colours.get(s["state"], "#c62828")
            cells = [html.escape(str(v)) for v in (s["name"], s["kind"])]
            rest = [html.escape(str(v)) for v in
                    (s["pid"], s["address"], "" if s["ready_s"] is None else f"{s['ready_s']} s")]
            if s["kind"] == "flower":  # the address is a web UI: make it a link
                url = html.escape(s["address"].split(" ", 1)[0])
                rest[1] = f"<a href='{url}' target='_blank'>{rest[1]}</a>"
            if s.get("management"):  # RabbitMQ's management UI
                url = html.escape(s["management"])
                rest[1] += f" <a href='{url}' target='_blank'>management UI</a>"
            rows.append(
                "<tr>" + "".join(f"<td style='text-align:left'>{c}</td>" for c in cells)
                + f"<td style='text-align:left;color:{colour}'><b>{html.escape(s['state'])}</b></td>"
                + "".join(f"<td style='text-align:left'>{c}</td>" for c in rest) + "</tr>"
            )
        started = f" — ready in {self.started_in:.2f} s" if self.started_in else ""
        return (
            f"<div><b>LocalCluster {html.escape(self.id)}</b> ({html.escape(str(self.state))}{started})<br>"
            f"<code>redis_url = {html.escape(self.redis_url)}</code><br>"
            + (f"<code>broker_url = {html.escape(self.broker_url)}</code><br>" if self.rabbitmq else "")
            + (f"management UI: <a href='{html.escape(self.management_url)}' target='_blank'>"
               f"{html.escape(self.management_url)}</a> (user/password guest)<br>" if self.management_url else "")
            + (f"<code>zk_hosts = {html.escape(self.zk_hosts)}</code><br>" if self.zookeepers else "")
            + f"<small>run dir: {html.escape(str(self.run_dir))}</small>"
            "<table><thead><tr><th>service</th><th>kind</th><th>state</th><th>pid</th>"
            "<th>address</th><th>ready after</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></div>"
        )
