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
    """A ``redis-server --replicaof`` the primary; ready once the primary streams its writes to it.

    Its own link being up is not enough: after a diskless full sync the
    primary holds back the write stream until the replica's first
    acknowledgement arrives, so a write in that window would not reach the
    replica. Ready means the primary lists this replica as online and has an
    acknowledgement from it (a non-zero acknowledged offset).
    """

    primary_port: int = 0

    kind = "replica"

    def command(self) -> list[str]:
        return [*super().command(), "--replicaof", "127.0.0.1", str(self.primary_port)]

    def probe(self) -> bool:
        client = self.client(socket_timeout=0.5, socket_connect_timeout=0.2)
        try:
            if client.info("replication").get("master_link_status") != "up":
                return False
        finally:
            client.close()
        primary = redis.Redis(host="127.0.0.1", port=self.primary_port, socket_timeout=0.5,
                              socket_connect_timeout=0.2)
        try:
            info = primary.info("replication")
        finally:
            primary.close()
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return any(int(r.get("port", 0)) == self.port and r.get("state") == "online" and int(r.get("offset", 0)) > 0
                   for r in replicas)


@dataclass
class SentinelService(Service):
    """One ``redis-server --sentinel`` watching the primary ``master_name``."""

    port: int = 0
    primary_port: int = 0
    sentinels: int = 3
    quorum: int = 2
    down_after_ms: int = 1000
    #: Also the election timeout; a failover that failed (a split vote, a
    #: promotion not confirmed in time) is tried again after twice this.
    failover_timeout_ms: int = 2500
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
        """The primary this sentinel would hand a client now; None while it considers it down.

        ``GET-MASTER-ADDR-BY-NAME`` already names the promoted replica in the
        middle of a failover, while ``SENTINEL MASTER`` (what redis-py's and
        kombu's clients ask) still shows the old primary as down: a client
        told "the primary moved" at that moment finds no primary at all.
        """
        client = self.client()
        try:
            master = client.execute_command("SENTINEL", "MASTER", self.master_name)
        finally:
            client.close()
        info = dict(zip(master[::2], master[1::2], strict=False)) if isinstance(master, list) else master
        info = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in info.items()}
        flags = set(str(info.get("flags", "")).split(","))
        if "master" not in flags or flags & {"s_down", "o_down"}:
            return None
        return str(info["ip"]), int(info["port"])


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

    def failover_bound_s(self) -> float:
        """Seconds from the primary's death to a promoted replica, allowing one failed attempt.

        Detection takes ``down_after_ms``; an election that fails is retried
        after twice ``failover_timeout_ms``; the retry's election and the
        promotion itself take about a second (INFO is polled every second
        during a failover).
        """
        s = self.sentinels[0]
        return s.down_after_ms / 1000 + 2 * s.failover_timeout_ms / 1000 + 1.0

    def primary(self) -> tuple[str, int] | None:
        """The primary a client would be given now (by the first sentinel that has one); None mid-failover."""
        for s in self.sentinels:
            if s.alive():
                try:
                    found = s.primary()
                except redis.RedisError:
                    continue
                if found is not None:
                    return found
        return None


def sentinel_group(primary: RedisService, run_dir, cluster_id: str, *, sentinels: int = 3, quorum: int = 2,
                   down_after_ms: int = 1000) -> SentinelGroup:
    """A replica of ``primary`` and ``sentinels`` sentinels watching it (ports chosen now).

    Both servers start a full sync at once (Redis waits 5 s by default for more
    replicas to share one diskless transfer; there is only one), whichever of
    them is the primary after a failover.
    """
    no_wait = ["--repl-diskless-sync-delay", "0"]
    primary.extra_args = [*primary.extra_args, *no_wait]
    replica = ReplicaService(name="replica", run_dir=run_dir, cluster_id=cluster_id,
                             port=primary.claim_port(0), primary_port=primary.port, extra_args=list(no_wait))
    group = SentinelGroup(replica)
    for i in range(1, sentinels + 1):
        group.sentinels.append(SentinelService(
            name=f"sentinel{i}", run_dir=run_dir, cluster_id=cluster_id, port=primary.claim_port(0),
            primary_port=primary.port, sentinels=sentinels, quorum=quorum, down_after_ms=down_after_ms,
        ))
    return group
