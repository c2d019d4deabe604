"""The Celery app every worker and every notebook shares, and per-process clients.

One function, :func:`make_app`, builds the app from a Redis URL (the result
backend, and the broker unless a ``broker_url`` is given: RabbitMQ's, with
``LocalCluster(broker="rabbitmq")``) and a dict of settings. The notebook's ``cluster.app`` and each ``celery worker`` (through
:mod:`labkit.worker_app`, which reads the same values from the environment)
call it with the same arguments, so the producer and the consumers can never
disagree about serializers, queues or time limits.

Lesson tasks are declared with ``@shared_task`` in ``labkit/lessons/*.py``;
workers import every lesson module at start (``LABKIT_INCLUDE`` narrows it).

Inside a task, use :func:`redis_client`, :func:`zk_client` and
:func:`local_dir` instead of creating clients at import time: each returns an
object private to the current process, created after the prefork pool forked
it (a socket or a kazoo session shared across ``fork()`` is a bug).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from celery import Celery

DEFAULT_SETTINGS: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_expires": 3600,
    "broker_connection_retry_on_startup": True,
    "broker_connection_timeout": 2,
    "worker_redirect_stdouts_level": "INFO",
    "worker_log_color": False,
    # lets cluster.define() renew prefork children so they run newly defined code (labkit.define)
    "worker_pool_restarts": True,
    "task_track_started": True,
    "result_extended": True,
    "broker_transport_options": {"socket_connect_timeout": 2},
    "result_backend_transport_options": {"socket_connect_timeout": 2},
}


def lesson_modules() -> list[str]:
    """Dotted names of every module in :mod:`labkit.lessons` (what workers import by default)."""
    from labkit.lessons import module_names  # noqa: PLC0415

    return module_names()


def merge_settings(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Later layers win; nested dicts (transport options) merge one level deep."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


def make_app(
    redis_url: str,
    settings: dict[str, Any] | None = None,
    include: list[str] | None = None,
    main: str = "labkit",
    broker_url: str | None = None,
) -> Celery:
    """A Celery app with ``redis_url`` as result backend and broker (``broker_url`` overrides the broker)."""
    conf = merge_settings(DEFAULT_SETTINGS, settings)
    app = Celery(main, broker=broker_url or redis_url, backend=redis_url,
                 include=include if include is not None else lesson_modules())
    app.conf.update(conf)
    return app


def redis_from_url(url: str, master_name: str | None = None, **kwargs: Any):
    """A redis-py client for ``redis://`` or for the primary behind ``sentinel://h:p;sentinel://h:p``.

    A sentinel URL (the form kombu and Celery take) yields a client that asks
    the sentinels for the current primary on every (re)connect, so it follows
    a failover. ``master_name`` defaults to the one in the broker transport
    options, else ``"labkit"``.
    """
    import redis  # noqa: PLC0415

    if not url.startswith("sentinel://"):
        return redis.Redis.from_url(url, **kwargs)
    from redis.sentinel import Sentinel  # noqa: PLC0415

    if master_name is None:
        master_name = env_settings().get("broker_transport_options", {}).get("master_name", "labkit")
    hosts = []
    for part in url.split(";"):
        host, _, port = part.split("://", 1)[1].split("/", 1)[0].rpartition(":")
        hosts.append((host, int(port)))
    probe = {"socket_timeout": 1, "socket_connect_timeout": 0.5}
    return Sentinel(hosts, sentinel_kwargs=probe, **probe).master_for(master_name, **kwargs)


# --------------------------------------------------------------------------- worker side

_local = threading.local()
_clients: dict[str, tuple[int, Any]] = {}
_clients_lock = threading.Lock()


def env_settings() -> dict[str, Any]:
    return json.loads(os.environ.get("LABKIT_SETTINGS", "{}"))


def redis_url() -> str:
    """The cluster's Redis URL, in a worker or anywhere ``LABKIT_REDIS_URL`` is set."""
    url = os.environ.get("LABKIT_REDIS_URL")
    if not url:
        raise RuntimeError("LABKIT_REDIS_URL is not set: this runs inside a labkit worker only")
    return url


def broker_url() -> str | None:
    """The cluster's broker URL when it is not Redis (``LABKIT_BROKER_URL``), else None."""
    return os.environ.get("LABKIT_BROKER_URL") or None


def _per_process(key: str, factory):
    pid = os.getpid()
    with _clients_lock:
        cached = _clients.get(key)
        if cached is None or cached[0] != pid:
            _clients[key] = (pid, factory())
        return _clients[key][1]


def redis_client():
    """A redis-py client private to this process (created lazily after fork)."""
    return _per_process("redis", lambda: redis_from_url(redis_url(), socket_timeout=10))


def zk_client():
    """A started kazoo client private to this process (created lazily after fork)."""
    hosts = os.environ.get("LABKIT_ZK_HOSTS")
    if not hosts:
        raise RuntimeError("LABKIT_ZK_HOSTS is not set: start the cluster with ZooKeeper")

    def _make():
        from kazoo.client import KazooClient  # noqa: PLC0415

        client = KazooClient(hosts=hosts, timeout=float(os.environ.get("LABKIT_ZK_SESSION_TIMEOUT", "10")))
        client.start(timeout=10)
        return client

    return _per_process("zk", _make)


def local_dir() -> Path:
    """This worker's private "local disk" (stands in for a host's own disk)."""
    path = os.environ.get("LABKIT_LOCAL_DIR")
    if not path:
        raise RuntimeError("LABKIT_LOCAL_DIR is not set: this runs inside a labkit worker only")
    return Path(path)


def worker_name() -> str:
    """The short name (``w1``) of the worker this process belongs to, or ``""``."""
    return os.environ.get("LABKIT_WORKER_NAME", "")
