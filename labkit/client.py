"""The client side of a cluster: what a lesson may use, whoever runs the processes.

Two kinds of cluster exist. A :class:`~labkit.cluster.LocalCluster` owns its
processes and can break them on purpose. An :class:`AttachedCluster` is
somebody else's (a workshop's docker compose, ``labkit up`` in a terminal):
this kernel may send it tasks and read its state, never kill it.

Both share one implementation of the client side, :class:`ClusterClient`,
and a lesson that injects no faults types its ``cluster`` parameter as
:class:`ClusterLike`, so it runs on either.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .app import make_app
from .status import Status

if TYPE_CHECKING:  # pragma: no cover
    import redis
    from celery import Celery, Task
    from kazoo.client import KazooClient

    from .dashboard import Dashboard
    from .define import Defined


def short_name(hostname: str) -> str:
    """``"w1@lk3f2a"`` -> ``"w1"``: the name lessons use for a worker."""
    return hostname.split("@", 1)[0]


def _forget_results(app: Celery) -> None:
    """Detach the kernel's result consumer, so results collected later leave the stopped Redis alone.

    An ``AsyncResult`` unsubscribes from its result channel when it is
    garbage-collected (``AsyncResult.__del__``). Once the cluster's Redis is
    gone, Celery's Redis backend retries that for up to 20 s — inside the
    garbage collector, in whatever the kernel happens to be running. With
    nothing subscribed and no pub/sub connection, a late ``__del__`` is a no-op.
    (Celery keeps one backend per thread; this is the calling thread's.)
    """
    backend = getattr(app._local, "backend", None)
    consumer = getattr(backend, "result_consumer", None)
    if consumer is None:
        return
    with contextlib.suppress(Exception):  # private attributes of Celery 5.x's ResultConsumer
        consumer.subscribed_to.clear()
        consumer._pending_unsubscribe.clear()
        pubsub, consumer._pubsub = consumer._pubsub, None
        if pubsub is not None:
            pubsub.close()


def _reconnect_results(app: Celery) -> None:
    """Move the kernel's result consumer to a fresh Redis connection, after Redis restarted.

    Its pub/sub socket still points at the old server. A ``SUBSCRIBE`` for the
    next task's result written to that socket can succeed (the kernel buffers
    it; the reset arrives later), so the result is published to nobody and
    ``get()`` times out although the task succeeded: one restart in about ten
    did that. Celery's own recovery re-subscribes every pending result and
    reads those that finished meanwhile.
    """
    backend = getattr(app._local, "backend", None)
    consumer = getattr(backend, "result_consumer", None)
    if consumer is None or getattr(consumer, "_pubsub", None) is None:
        return  # nothing subscribed yet: the first get() connects afresh
    consumer._reconnect_pubsub()  # private API of Celery 5.x's Redis ResultConsumer


@runtime_checkable
class ClusterLike(Protocol):
    """What a lesson may use of a cluster without owning its processes."""

    id: str
    app: Celery

    @property
    def redis_url(self) -> str: ...

    @property
    def zk_hosts(self) -> str: ...

    def task(self, task_or_name: Any) -> Task: ...

    def ping(self, timeout: float = 1.0) -> dict[str, bool]: ...

    def redis_client(self, **kwargs: Any) -> redis.Redis: ...

    def zk(self) -> KazooClient: ...

    def close(self) -> None: ...


class ClusterClient:
    """The client side shared by local and attached clusters.

    Subclasses set ``id``, ``app`` and ``state`` and provide ``redis_url`` and
    ``zk_hosts``; they may override :meth:`_worker_hostnames` when they know
    which workers to expect (then :meth:`ping` reports the silent ones too).
    """

    id: str
    app: Celery
    state: Status
    _kernel_zk: KazooClient | None = None
    _dashboard: Dashboard | None = None

    # -- addresses -------------------------------------------------------------
    @property
    def redis_url(self) -> str:
        raise NotImplementedError

    @property
    def zk_hosts(self) -> str:
        raise NotImplementedError

    # -- clients ---------------------------------------------------------------
    def task(self, task_or_name: Any) -> Task:
        """This cluster's instance of a task (pass the task, its function, or its name)."""
        name = task_or_name if isinstance(task_or_name, str) else task_or_name.name
        try:
            return self.app.tasks[name]
        except KeyError:
            raise KeyError(
                f"no task {name!r} in this cluster's app; is its module in `include`?"
            ) from None

    def redis_client(self, **kwargs: Any) -> redis.Redis:
        """A new redis-py client for the cluster's Redis (short timeouts: faults are expected)."""
        from .app import redis_from_url  # noqa: PLC0415

        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 2)
        master = self.app.conf.broker_transport_options.get("master_name")
        return redis_from_url(self.redis_url, master, **kwargs)

    def zk(self) -> KazooClient:
        """The kernel's kazoo client (started on first use, restarted if its session was lost)."""
        if not self.zk_hosts:
            raise RuntimeError(
                "this cluster has no ZooKeeper: start it with LocalCluster(zookeeper=1), "
                "or attach with zk_hosts= / $LABKIT_ZK_HOSTS"
            )
        client = self._kernel_zk
        if client is None or not client.connected:
            from kazoo.client import KazooClient  # noqa: PLC0415

            if client is not None:
                with contextlib.suppress(Exception):
                    client.stop()
                    client.close()
            client = KazooClient(hosts=self.zk_hosts, timeout=10)
            client.start(timeout=15)
            self._kernel_zk = client
        return client

    def define(self, source: str, module: str | None = None, *, line_offset: int = 0,
               timeout: float = 10.0) -> Defined:
        """Load a module's source into this kernel and every worker, now and later; returns its tasks.

        The module is named ``cell_<first function>`` unless ``module`` is
        given; defining it again replaces its tasks everywhere. See
        :mod:`labkit.define` for how it travels and what errors say.
        """
        from .define import define_on  # noqa: PLC0415

        return define_on(self, source, module, line_offset=line_offset, timeout=timeout)

    def _worker_hostnames(self) -> list[str] | None:
        """Hostnames of the workers this cluster expects, or None when it cannot know."""
        return None

    def ping(self, timeout: float = 1.0) -> dict[str, bool]:
        """Control-ping the workers: ``{"w1": True, "w2": False, ...}`` (keys: short names).

        When the expected workers are known, it asks again for the missing
        ones until ``timeout``: a reply left over from an earlier ping (a
        worker that was paused answers every ping it missed) can end one
        ``control.ping(limit=...)`` round early. Otherwise it broadcasts once
        and lists whoever answered.
        """
        expected = self._worker_hostnames()
        if expected is None:
            replies = self.app.control.ping(timeout=timeout)
            return {short_name(h): True for r in replies for h in r}
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while True:
            pending = [h for h in expected if h not in seen]
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                break
            replies = self.app.control.ping(destination=pending, timeout=remaining, limit=len(pending))
            seen |= {h for r in replies for h in r if h in expected}
        return {short_name(h): h in seen for h in expected}

    def _dashboard_options(self) -> dict[str, Any]:
        """What a dashboard cannot ask the workers cheaply (a LocalCluster knows queues and pools)."""
        return {}

    def dashboard(self, *, interval: float = 0.5, window: float = 30.0) -> Dashboard:
        """A live view of this cluster fed by Celery events (see :mod:`labkit.dashboard`).

        Display it (last line of a cell) for a view that refreshes itself while
        other cells run; ``snapshot()`` returns the numbers. One per cluster:
        calling again returns the running one. It stops when the cluster closes.
        Workers send task events only when started with ``-E``
        (``LocalCluster(events=True)``).
        """
        from .dashboard import Dashboard  # noqa: PLC0415

        if self._dashboard is not None and self._dashboard.running:
            return self._dashboard
        self._dashboard = Dashboard(self.app, self.redis_url, title=self.id, interval=interval, window=window,
                                    **self._dashboard_options()).start()
        return self._dashboard

    def _close_clients(self) -> None:
        if self._dashboard is not None:
            with contextlib.suppress(Exception):
                self._dashboard.stop()
            self._dashboard = None
        if self._kernel_zk is not None:
            with contextlib.suppress(Exception):
                self._kernel_zk.stop()
                self._kernel_zk.close()
            self._kernel_zk = None
        _forget_results(self.app)
        with contextlib.suppress(Exception):
            self.app.close()

    def close(self) -> None:
        """Close this kernel's clients (subclasses also stop what they own)."""
        self._close_clients()
        self.state = Status.CLOSED

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AttachedCluster(ClusterClient):
    """A cluster somebody else runs: tasks and state, no fault injection.

    ``close()`` closes only this kernel's clients; the processes are not ours.
    """

    def __init__(self, redis_url: str, zk_hosts: str = "", settings: dict[str, Any] | None = None,
                 include: list[str] | None = None, broker_url: str | None = None) -> None:
        if not redis_url.startswith(("redis://", "rediss://", "sentinel://")):
            raise ValueError(f"redis_url must look like redis://host:port/db, not {redis_url!r}")
        self._redis_url, self._zk_hosts = redis_url, zk_hosts
        self.id = "attached:" + redis_url.split("://", 1)[1]
        self.app = make_app(redis_url, settings=settings, include=include, broker_url=broker_url)
        self.broker_url = broker_url or redis_url
        self.state = Status.ATTACHED

    @property
    def redis_url(self) -> str:
        return self._redis_url

    @property
    def zk_hosts(self) -> str:
        return self._zk_hosts

    def __repr__(self) -> str:
        return f"<AttachedCluster redis {self.redis_url}, zookeeper {self.zk_hosts or '-'}>"


def attach(redis_url: str | None = None, zk_hosts: str | None = None,
           settings: dict[str, Any] | None = None, broker_url: str | None = None) -> AttachedCluster:
    """Use a running cluster: arguments, else ``$LABKIT_REDIS_URL`` / ``$LABKIT_ZK_HOSTS`` / ``$LABKIT_BROKER_URL``.

    ``broker_url`` is needed only when the broker is not Redis (``labkit up --broker rabbitmq``).
    """
    url = redis_url or os.environ.get("LABKIT_REDIS_URL")
    if not url:
        raise RuntimeError(
            "attach() needs a Redis URL: pass redis_url= or set LABKIT_REDIS_URL "
            "(`labkit up --json` prints one; docker compose sets it in the lab container)"
        )
    hosts = zk_hosts if zk_hosts is not None else os.environ.get("LABKIT_ZK_HOSTS", "")
    broker = broker_url or os.environ.get("LABKIT_BROKER_URL") or None
    return AttachedCluster(url, hosts, settings=settings, broker_url=broker)
