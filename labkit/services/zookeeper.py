"""ZooKeeper: one standalone JVM, or an N-node ensemble on loopback.

Discovery: ``$LABKIT_ZOOKEEPER_JAR`` (a jar whose manifest carries its
classpath, like Debian's), ``$ZOOKEEPER_HOME/lib/*`` (Apache's tarball), or
Debian's ``/usr/share/java/zookeeper.jar``; ``java`` from ``$JAVA_HOME`` or
``PATH``. Logs go through slf4j-simple when it is installed.

The client port opens *before* ZooKeeper serves requests, so readiness is
"the ``srvr`` four-letter word reports a Mode (standalone, leader or
follower) and a kazoo session can be established". The admin HTTP server is
off; every port is on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field

from ..status import Status
from . import class_archive
from .base import Service, ServiceError, free_port

REMEDY = (
    "install ZooKeeper and Java (`sudo apt-get install zookeeper default-jre-headless`), "
    "or set $ZOOKEEPER_HOME to an unpacked Apache ZooKeeper, or $LABKIT_ZOOKEEPER_JAR to its jar"
)
DEBIAN_JAR = "/usr/share/java/zookeeper.jar"
SLF4J_SIMPLE = "/usr/share/java/slf4j-simple.jar"

TICK_MS = 250
INIT_LIMIT = 40  # ticks a new leader waits for its followers to sync
SYNC_LIMIT = 20  # ticks a follower may lag before the leader drops it


def find_java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and os.access(os.path.join(home, "bin", "java"), os.X_OK):
        return os.path.join(home, "bin", "java")
    return shutil.which("java")


def find_zookeeper_classpath() -> str | None:
    """A Java classpath that runs ZooKeeper's server classes, or None."""
    jar = os.environ.get("LABKIT_ZOOKEEPER_JAR")
    if jar:
        return jar
    home = os.environ.get("ZOOKEEPER_HOME")
    if home and glob.glob(os.path.join(home, "lib", "*.jar")):
        return os.path.join(home, "lib", "*")
    if os.path.exists(DEBIAN_JAR):
        extra = [SLF4J_SIMPLE] if os.path.exists(SLF4J_SIMPLE) else []
        return ":".join([DEBIAN_JAR, *extra])
    return None


def zookeeper_version(classpath: str, java: str) -> str:
    out = subprocess.run(
        [java, "-cp", classpath, "org.apache.zookeeper.Version"],
        capture_output=True, text=True, timeout=30,
    )
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].split("-")[0].strip() if text else "unknown"


def four_letter(port: int, word: str = "srvr", timeout: float = 0.5) -> str:
    """Send a ZooKeeper four-letter word to 127.0.0.1:port and return the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(word.encode())
        chunks = []
        while True:
            data = s.recv(4096)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


def zk_mode(port: int) -> str | None:
    """``standalone``, ``leader``, ``follower`` — or None while not serving."""
    with contextlib.suppress(OSError):
        for line in four_letter(port).splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
    return None


def kazoo_session_ok(hosts: str, timeout: float = 2.0) -> bool:
    """True when a kazoo client can open (and then close) a session on ``hosts``."""
    from kazoo.client import KazooClient  # noqa: PLC0415 - heavy import, only when probing

    quiet = logging.getLogger("labkit.probe")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    client = KazooClient(hosts=hosts, timeout=5, logger=quiet)
    try:
        client.start(timeout=timeout)
        return client.connected
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            client.stop()
            client.close()


@dataclass
class ZooKeeperService(Service):
    """One ZooKeeper server. With ``peers`` it is node ``myid`` of an ensemble."""

    port: int = 0
    myid: int = 0
    peers: list[tuple[int, int, int, int]] = field(default_factory=list)  # (id, client, quorum, election)
    heap_mb: int = 128
    java: str | None = None
    classpath: str | None = None
    jvm_cds: list[str] = field(default_factory=list, init=False, repr=False)  # class-data sharing flags
    _cds_building: object = field(default=None, init=False, repr=False)  # the archive this run writes at exit

    kind = "zookeeper"

    @property
    def data_dir(self):
        return self.run_dir / self.name

    @property
    def config_path(self):
        return self.data_dir / "zoo.cfg"

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def describe(self) -> str:
        return self.hosts

    def remedy(self) -> str:
        return REMEDY

    def leader_loss_bound_s(self) -> float:
        """Seconds this node's ensemble, keeping a quorum, may take to serve again after its leader dies.

        The survivors see the leader's socket close and elect a new one in a
        fraction of a second (``finalizeWait`` is 200 ms); the new leader then
        waits up to ``initLimit`` ticks for a quorum of followers to sync before
        it serves. A client adds its reconnect and one round trip (a second or
        two on a loaded laptop). Idle, the whole gap is about half a second.
        """
        return INIT_LIMIT * TICK_MS / 1000 + 2.0

    def prepare(self) -> None:
        self.java = self.java or find_java()
        self.classpath = self.classpath or find_zookeeper_classpath()
        if not self.java:
            raise ServiceError(self.name, "no `java` found on PATH or in $JAVA_HOME", remedy=REMEDY)
        if not self.classpath:
            raise ServiceError(self.name, "no ZooKeeper jar found", remedy=REMEDY)
        self.port = self.claim_port(self.port)
        self.jvm_cds, self._cds_building = class_archive.jvm_flags(self.java, self.classpath)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"tickTime={TICK_MS}",
            "minSessionTimeout=500",
            "maxSessionTimeout=30000",
            f"initLimit={INIT_LIMIT}",
            f"syncLimit={SYNC_LIMIT}",
            f"dataDir={self.data_dir}",
            f"clientPort={self.port}",
            "clientPortAddress=127.0.0.1",
            "admin.enableServer=false",
            "4lw.commands.whitelist=srvr,ruok,stat,mntr,cons",
            "maxClientCnxns=0",
            "autopurge.purgeInterval=0",
        ]
        if self.peers:
            lines += ["cnxTimeout=1000", "electionPortBindRetry=20"]
            lines += [f"server.{i}=127.0.0.1:{q}:{e}" for i, _c, q, e in self.peers]
            (self.data_dir / "myid").write_text(f"{self.myid}\n")
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        main = (
            "org.apache.zookeeper.server.quorum.QuorumPeerMain"
            if self.peers
            else "org.apache.zookeeper.server.ZooKeeperServerMain"
        )
        return [
            self.java or "java",
            f"-Xmx{self.heap_mb}m",
            # start-up CPU of a tiny server (bench/zookeeper_jvm.py measures each flag): one GC thread,
            # the C1 compiler only, classes mapped from an AppCDS archive (services/class_archive.py)
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            *self.jvm_cds,
            "-Dzookeeper.admin.enableServer=false",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-cp", self.classpath or DEBIAN_JAR,
            main,
            str(self.config_path),
        ]

    def finish(self, timeout: float | None = None) -> None:
        super().finish(timeout)
        if self._cds_building is not None and self.proc is not None:  # this run wrote the archive at exit
            class_archive.adopt(self._cds_building, self.proc.returncode)
            self._cds_building = None

    def mode(self) -> str | None:
        return zk_mode(self.port)

    def probe(self) -> bool:
        mode = self.mode()
        if mode is None:
            return False
        if self.peers:  # an ensemble node: serving as leader/follower is the node's readiness
            return mode in ("leader", "follower")
        return kazoo_session_ok(self.hosts, timeout=1.0)

    def status(self) -> dict:
        info = super().status()
        if self.alive() and self.state == Status.RUNNING:
            info["mode"] = self.mode() or "not serving"
        return info


def ensemble(size: int, run_dir, cluster_id: str, base_name: str = "zk") -> list[ZooKeeperService]:
    """``size`` ZooKeeper services configured as one ensemble (size 1 = standalone)."""
    if size < 1:
        raise ValueError("zookeeper ensemble size must be at least 1")
    if size == 1:
        return [ZooKeeperService(name=base_name, run_dir=run_dir, cluster_id=cluster_id, port=free_port())]
    ports = [(i, free_port(), free_port(), free_port()) for i in range(1, size + 1)]
    return [
        ZooKeeperService(
            name=f"{base_name}{i}", run_dir=run_dir, cluster_id=cluster_id,
            port=client, myid=i, peers=ports,
        )
        for i, client, _q, _e in ports
    ]

