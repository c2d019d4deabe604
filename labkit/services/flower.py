"""Flower, Celery's web monitor, as a service of the cluster.

Flower is a Tornado server that consumes the cluster's events (its own
``EventReceiver`` + ``State``), asks workers for their state with control
commands (``inspect stats``, ``active_queues``...), and serves a web UI and a
JSON API (``/api/workers``, ``/api/tasks``...).

Two defaults are changed here, on purpose:

* **Basic auth is on**, with a password generated per cluster. Since 2.0
  Flower refuses its API to unauthenticated callers unless
  ``FLOWER_UNAUTHENTICATED_API`` is set, but its web pages still show task
  arguments, results and tracebacks to whoever reaches the port — and on a
  shared machine, any local user can reach 127.0.0.1. The credentials travel
  in the environment (``FLOWER_BASIC_AUTH``), not on the command line, where
  ``ps`` would show them to everyone.
* **``--enable_events=False``**: by default Flower broadcasts
  ``enable_events`` to every worker every 5 s, silently turning on task
  events (and their cost) on a cluster that was started without them. Here
  the cluster decides (``LocalCluster(events=True)``); pass
  ``enable_events=True`` to get Flower's behaviour.

Ready means its HTTP API answers an authenticated ``GET /api/workers`` *and*
one of its Redis connections is subscribed to the event channel (``CLIENT
LIST`` shows it in pub/sub mode). The API answers a moment before Flower
subscribes; tasks run in that moment would never reach it. On a RabbitMQ
broker the second check is weaker: Flower holds a connection to the broker
(its event consumer opens one; RabbitMQ offers no cheap per-client view
like ``CLIENT LIST`` without the management plugin).
"""

from __future__ import annotations

import base64
import secrets
import sys
import urllib.request
from dataclasses import dataclass, field

import psutil

from .worker import CeleryService

USER = "labkit"


@dataclass
class FlowerService(CeleryService):
    """``celery flower`` on 127.0.0.1, a free port, with generated basic-auth credentials."""

    port: int = 0
    enable_events: bool = False
    inspect_timeout: float = 1.0  # seconds Flower waits for workers' replies to inspect commands
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12), repr=False)

    kind = "flower"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the web UI; the API is under ``/api/``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> tuple[str, str]:
        """``(user, password)`` for basic auth, e.g. ``requests.get(url, auth=flower.auth)``."""
        return USER, self.password

    def prepare(self) -> None:
        super().prepare()
        self.port = self.claim_port(self.port)

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["FLOWER_BASIC_AUTH"] = f"{USER}:{self.password}"
        return env

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "labkit.worker_app:app", "flower",
            "--address=127.0.0.1", f"--port={self.port}",
            f"--enable_events={self.enable_events}",
            f"--inspect_timeout={self.inspect_timeout * 1000:g}",
            "--persistent=False",
        ]

    def describe(self) -> str:
        return f"{self.url} (user {USER})"

    def get(self, path: str, timeout: float = 5.0) -> bytes:
        """``GET path`` with the service's credentials; returns the body (raises on HTTP errors)."""
        token = base64.b64encode(f"{USER}:{self.password}".encode()).decode()
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def probe(self) -> bool:
        # a refused connection or an HTTP error counts as "not yet"; the last one is quoted on timeout
        self.get("/api/workers", timeout=2.0)
        return self.subscribed()

    def subscribed(self) -> bool:
        """True when a Redis connection of this process is subscribed (Flower receives events).

        With a RabbitMQ broker: when this process holds a connection to a broker node.
        """
        from ..app import redis_from_url  # noqa: PLC0415

        conns = psutil.Process(self.pid).net_connections("tcp")
        if self.broker_url:
            brokers = {int(u.rsplit(":", 1)[1].split("/", 1)[0]) for u in self.broker_url.split(";")}
            return any(c.raddr and c.raddr.port in brokers and c.status == psutil.CONN_ESTABLISHED for c in conns)
        ports = {c.laddr.port for c in conns if c.raddr}
        master = self.settings.get("broker_transport_options", {}).get("master_name")
        client = redis_from_url(self.redis_url, master, socket_timeout=2, socket_connect_timeout=2)
        try:
            return any(int(c["addr"].rsplit(":", 1)[1]) in ports and (int(c.get("sub", 0)) or int(c.get("psub", 0)))
                       for c in client.client_list())
        finally:
            client.close()

    def remedy(self) -> str:
        return "read Flower's log above; `pip install flower` (a labkit dependency) if it is missing"
