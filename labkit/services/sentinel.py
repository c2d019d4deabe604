"""Redis Sentinel from the same ``redis-server`` binary: a primary, a replica, three sentinels.

Sentinel removes Redis as a *single* point of failure, not as a point of
failure: when the primary stops answering for ``down_after_ms``, the
sentinels agree (``quorum`` of them) that it is down, elect one of
themselves as leader, and promote the replica. Clients ask a sentinel
"who is the primary of ``labkit``?" (kombu's ``sentinel://`` transport and
redis-py's :class:`redis.sentinel.Sentinel` do) and reconnect there.

Replication is asynchronous: the primary answers a write before the replica
has it. A write acknowledged in the last moments before the primary dies
may never reach the replica that replaces it.

Readiness is strict: the replica's link to the primary is up, and every
sentinel sees the primary, the replica and the other sentinels, and
``SENTINEL CKQUORUM`` says a failover could be authorised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from .base import Service, ServiceError
from .redis import REMEDY, RedisService, find_redis_server

MASTER_NAME = "labkit"


@dataclass
class ReplicaService(RedisService):
    """A ``redis-server --replicaof`` the primary; ready once its replication link is up."""

    primary_port: int = 0

    kind = "replica"

    def command(self) -> list[str]:
        return [*super().command(), "--replicaof", "127.0.0.1", str(self.primary_port)]

    def probe(self) -> bool:
        client = self.client(socket_timeout=0.5, socket_connect_timeout=0.2)
        try:
            return client.info("replication").get("master_link_status") == "up"
        finally:
            client.close()


@dataclass
class SentinelService(Service):
    """One ``redis-server --sentinel`` watching the primary ``master_name``."""

    port: int = 0
    primary_port: int = 0
    sentinels: int = 3
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 5000
    master_name: str = MASTER_NAME
    binary: str | None = None
    replicas: int = 1

    kind = "sentinel"

    @property
    def config_path(self):
        return self.run_dir / self.name / "sentinel.conf"

    def prepare(self) -> None:
        self.binary = self.binary or find_redis_server()
        if self.binary is None:
            raise ServiceError(self.name, "no redis-server binary found (Sentinel is a mode of it)", remedy=REMEDY)
        self.port = self.claim_port(self.port)
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        # Sentinel rewrites this file as it learns; it must be writable and private.
        self.config_path.write_text("\n".join([
            "bind 127.0.0.1",
            f"port {self.port}",
            f"dir {self.config_path.parent}",
            "protected-mode no",
            "daemonize no",
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.primary_port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
            f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.master_name} 1",
        ]) + "\n")

    def command(self) -> list[str]:
        return [self.binary or "redis-server", str(self.config_path), "--sentinel"]

    def describe(self) -> str:
        return f"sentinel://127.0.0.1:{self.port} ({self.master_name})"

    def remedy(self) -> str:
        return REMEDY

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=0.5)

    def probe(self) -> bool:
        client = self.client()
        try:
            master = client.execute_command("SENTINEL", "MASTER", self.master_name)
            info = dict(zip(master[::2], master[1::2], strict=False)) if isinstance(master, list) else master
            info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in info.items()}
            others = int(info.get("num-other-sentinels", 0))
            replicas = int(info.get("num-slaves", 0))
            if others < self.sentinels - 1 or replicas < self.replicas:
                return False
            client.execute_command("SENTINEL", "CKQUORUM", self.master_name)
            return True
        finally:
            client.close()

    def primary(self) -> tuple[str, int] | None:
        """The primary's address as this sentinel sees it now."""
        client = self.client()
        try:
            addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        finally:
            client.close()
        if not addr:
            return None
        host, port = (a.decode() if isinstance(a, bytes) else a for a in addr)
        return host, int(port)


@dataclass
class SentinelGroup:
    """The replica and the sentinels that make one primary highly available."""

    replica: ReplicaService
    sentinels: list[SentinelService] = field(default_factory=list)
    master_name: str = MASTER_NAME

    @property
    def services(self) -> list[Service]:
        return [self.replica, *self.sentinels]

    @property
    def url(self) -> str:
        """kombu's and Celery's form: ``sentinel://h:p1/0;sentinel://h:p2/0;...``."""
        return ";".join(f"sentinel://127.0.0.1:{s.port}/0" for s in self.sentinels)

    def settings(self) -> dict:
        """The Celery settings that make the broker and the result backend follow the primary."""
        options = {"master_name": self.master_name}
        return {"broker_transport_options": options, "result_backend_transport_options": options}

    def primary(self) -> tuple[str, int] | None:
        """The primary's address according to the first sentinel that answers."""
        for s in self.sentinels:
            if s.alive():
                try:
                    return s.primary()
                except redis.RedisError:
                    continue
        return None


def sentinel_group(primary: RedisService, run_dir, cluster_id: str, *, sentinels: int = 3, quorum: int = 2,
                   down_after_ms: int = 1000) -> SentinelGroup:
    """A replica of ``primary`` and ``sentinels`` sentinels watching it (ports chosen now)."""
    replica = ReplicaService(name="replica", run_dir=run_dir, cluster_id=cluster_id,
                             port=primary.claim_port(0), primary_port=primary.port)
    group = SentinelGroup(replica)
    for i in range(1, sentinels + 1):
        group.sentinels.append(SentinelService(
            name=f"sentinel{i}", run_dir=run_dir, cluster_id=cluster_id, port=primary.claim_port(0),
            primary_port=primary.port, sentinels=sentinels, quorum=quorum, down_after_ms=down_after_ms,
        ))
    return group
