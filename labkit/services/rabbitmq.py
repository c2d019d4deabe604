"""RabbitMQ: an unprivileged node (or a cluster of nodes) per LocalCluster, with its own epmd.

A RabbitMQ node is an Erlang VM (``beam.smp``). Nodes find each other — and
the CLI tools find a node — through **epmd**, the Erlang port mapper, which
the stock ``rabbitmq-server`` script (and any VM started with ``-sname``)
launches as ``epmd -daemon`` when none answers: a daemon in a session of its
own, outside every process group labkit kills, that outlives the cluster
and keeps port 4369 for whoever comes next. So labkit does not use the
script; it starts the pieces itself:

* :class:`EpmdService` — ``epmd -port P -address 127.0.0.1`` in the
  foreground, on a free port, one per cluster, recorded with the guard like
  every other service;
* :class:`RabbitMQService` — ``erl ... -s rabbit boot`` with ``-sname`` (so
  distribution starts with the VM and RabbitMQ's own "ensure epmd" step,
  which spawns a throw-away VM just to start an epmd, is skipped),
  ``-start_epmd false`` and ``ERL_EPMD_PORT`` pointing at the kit's epmd.
  The AMQP listener, the distribution port and the management listener bind
  127.0.0.1 only; the node's mnesia directory, logs and ``HOME`` (where its
  Erlang cookie lives, readable by its owner only — the cookie is the key to
  the node: whoever holds it can run code there) are in the run directory.

What makes a node start in ~2–4 s instead of the script's ~6 s: no shell
scripts and no throw-away epmd-starter VM; no ``rabbitmq.conf`` (the
configuration is an Erlang-terms ``advanced.config``, so the Cuttlefish
schema of every plugin is never compiled); and a private library directory
holding links to only the Erlang applications RabbitMQ needs (plus the
management plugin's when asked). At boot RabbitMQ scans every module of
every loaded application for boot steps and feature flags, and Debian's
plugin directory holds ~70 of them.

Readiness is an AMQP handshake (``amqp.Connection``, the library kombu's
``pyamqp`` transport uses), attempted only once the port listens: a
``connect()`` to a port nobody listens on yet can, in the ephemeral range,
connect the socket to itself and then hold the very port the node wants.
A node of a cluster is ready when, in addition, every member runs
(``rabbit_nodes:all_running()`` through ``erl_call``).

Several nodes form a cluster through RabbitMQ's classic peer discovery:
the first node (the seed) starts alone, the others list it in
``cluster_nodes`` and join it. They are spawned once the seed answers AMQP:
spawned together, a joiner can reach the seed while the seed is still
enabling its feature flags, copy a half-migrated schema, and both crash
(``schema_integrity_check_failed``; seen once in a few dozen parallel starts).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..poll import poll_until
from ..status import Status
from .base import Service, ServiceError, free_port, port_in_use

REMEDY = (
    "install RabbitMQ (`sudo apt-get install rabbitmq-server`: it brings Erlang), "
    "or point $LABKIT_RABBITMQ_HOME at an unpacked rabbitmq_server-X.Y.Z directory (with plugins/)"
)
DEBIAN_HOMES = "/usr/lib/rabbitmq/lib/rabbitmq_server-*"
USER, PASSWORD = "guest", "guest"  # RabbitMQ's default user: it may log in from loopback only
#: Erlang VM flags. No busy-waiting schedulers (they burn a shared 2-core machine's CPU while
#: idle) and RabbitMQ's own allocator settings; everything else is the VM's default.
VM_FLAGS = [
    "+W", "w",
    "+MBas", "ageffcbf", "+MHas", "ageffcbf", "+MBlmbcs", "512", "+MHlmbcs", "512", "+MMmcs", "30",
    "+P", "1048576", "+t", "5000000", "+zdbbl", "128000",
    "+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none",
    "+B", "i",  # SIGINT does not stop the broker (a notebook's Ctrl-C is the kernel's)
]
MANAGEMENT_APPS = ("rabbitmq_management",)


# ----------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class RabbitInstall:
    """Where RabbitMQ and Erlang live on this machine."""

    home: Path  # rabbitmq_server-X.Y.Z, with plugins/
    version: str
    erl: str
    epmd: str
    erl_call: str | None

    @property
    def plugins(self) -> Path:
        return self.home / "plugins"


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", os.path.basename(path)))


def find_rabbitmq() -> RabbitInstall | None:
    """RabbitMQ's server directory and the Erlang programs it needs, or None if any is missing."""
    explicit = os.environ.get("LABKIT_RABBITMQ_HOME")
    homes = [explicit] if explicit else sorted(glob.glob(DEBIAN_HOMES), key=_version_key, reverse=True)
    home = next((Path(h) for h in homes if h and glob.glob(os.path.join(h, "plugins", "rabbit-*"))), None)
    erl = shutil.which("erl")
    if home is None or erl is None:
        return None
    erts = sorted(glob.glob(os.path.join(os.path.dirname(os.path.realpath(erl)), "..", "erts-*", "bin")))
    erts += sorted(glob.glob("/usr/lib/erlang/erts-*/bin"))

    def tool(name: str) -> str | None:
        return shutil.which(name) or next((os.path.join(d, name) for d in erts
                                           if os.access(os.path.join(d, name), os.X_OK)), None)

    epmd = tool("epmd")
    if epmd is None:
        return None
    rabbit = glob.glob(str(home / "plugins" / "rabbit-*"))[0]
    version = os.path.basename(rabbit).split("-", 1)[1]
    return RabbitInstall(home=home, version=version, erl=erl, epmd=epmd, erl_call=tool("erl_call"))


def _app_dirs(plugins: Path) -> dict[str, Path]:
    """Erlang application name -> its directory in RabbitMQ's plugins directory (newest version)."""
    found: dict[str, Path] = {}
    for app_file in sorted(glob.glob(str(plugins / "*" / "ebin" / "*.app")), key=_version_key):
        found[Path(app_file).stem] = Path(app_file).parent.parent
    return found


def _app_deps(app_dir: Path, name: str) -> list[str]:
    """The ``applications`` and ``included_applications`` of an ``.app`` file."""
    text = (app_dir / "ebin" / f"{name}.app").read_text(errors="replace")
    deps: list[str] = []
    for key in ("applications", "included_applications"):
        m = re.search(r"\{\s*" + key + r"\s*,\s*\[([^\]]*)\]", text)
        if m:
            deps += [a.strip() for a in m.group(1).split(",") if a.strip()]
    return deps


def needed_apps(plugins: Path, roots: tuple[str, ...] = ("rabbit",)) -> dict[str, Path]:
    """The applications ``roots`` need, found in ``plugins`` (OTP's own are on the VM's path already)."""
    available = _app_dirs(plugins)
    seen: dict[str, Path] = {}
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name not in available:
            continue
        seen[name] = available[name]
        stack += _app_deps(available[name], name)
    return seen


def link_library(install: RabbitInstall, target: Path, management: bool) -> Path:
    """A directory of links to just the applications a node needs (see the module docstring)."""
    target.mkdir(parents=True, exist_ok=True)
    roots = ("rabbit", *MANAGEMENT_APPS) if management else ("rabbit",)
    for path in needed_apps(install.plugins, roots).values():
        link = target / path.name
        if not link.exists():
            with contextlib.suppress(FileExistsError):
                link.symlink_to(path)
    if "rabbit" not in {p.name.split("-", 1)[0] for p in target.iterdir()}:
        raise ServiceError("rabbitmq", f"no `rabbit` application in {install.plugins}", remedy=REMEDY)
    return target


# ----------------------------------------------------------------------------- epmd
def epmd_names(port: int, timeout: float = 0.5) -> list[str]:
    """Node names registered with the epmd on 127.0.0.1:port (its NAMES_REQ; raises OSError when down)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(struct.pack(">HB", 1, 110))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    if len(data) < 4:
        raise OSError(f"epmd on port {port} sent a short reply")
    return re.findall(r"name (\S+) at port", data[4:].decode("latin-1"))


@dataclass
class EpmdService(Service):
    """The Erlang port mapper, in the foreground, on 127.0.0.1 and a free port (not 4369)."""

    port: int = 0
    binary: str | None = None

    kind = "epmd"

    def prepare(self) -> None:
        install = find_rabbitmq()
        self.binary = self.binary or (install.epmd if install else shutil.which("epmd"))
        if not self.binary:
            raise ServiceError(self.name, "no `epmd` found (it comes with Erlang)", remedy=REMEDY)
        self.port = self.claim_port(self.port)

    def command(self) -> list[str]:
        return [self.binary or "epmd", "-port", str(self.port), "-address", "127.0.0.1"]

    def environment(self) -> dict[str, str]:
        return {"ERL_EPMD_PORT": str(self.port), "ERL_EPMD_ADDRESS": "127.0.0.1"}

    def describe(self) -> str:
        return f"epmd 127.0.0.1:{self.port}"

    def probe(self) -> bool:
        if not port_in_use(self.port):
            return False
        epmd_names(self.port)
        return True

    def names(self) -> list[str]:
        return epmd_names(self.port)

    def remedy(self) -> str:
        return REMEDY


# ----------------------------------------------------------------------------- a node
def _erl_term(value: object) -> str:
    """A Python value as an Erlang term (atoms are written ``Atom("x")``-free: only what configs need)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, _Atom):
        return f"'{value}'"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "{" + ", ".join(_erl_term(v) for v in value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_erl_term(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as an Erlang term")


class _Atom(str):
    """A string written as an Erlang atom."""


def amqp_url(port: int, vhost: str = "/") -> str:
    """kombu's URL for a node on 127.0.0.1 (``pyamqp``: the pure-Python client Celery uses)."""
    path = "/" if vhost == "/" else vhost
    return f"pyamqp://{USER}:{PASSWORD}@127.0.0.1:{port}/{path}"


def amqp_handshake(port: int, timeout: float = 1.0) -> dict:
    """Open (and close) an AMQP connection to 127.0.0.1:port; returns the server's properties."""
    import amqp  # noqa: PLC0415 - kombu's dependency

    conn = amqp.Connection(f"127.0.0.1:{port}", userid=USER, password=PASSWORD,
                           connect_timeout=timeout, read_timeout=timeout, write_timeout=timeout)
    try:
        conn.connect()
        return dict(conn.server_properties or {})
    finally:
        with contextlib.suppress(Exception):
            conn.close()


@dataclass
class RabbitMQService(Service):
    """One RabbitMQ node (an Erlang VM) on 127.0.0.1 with its own ports, data and cookie.

    ``seeds``: node names to join at first boot (empty: start alone);
    ``members``: every node of its cluster (readiness waits for all);
    ``management_port``: 0 for none, else the management plugin's HTTP port.
    """

    port: int = 0
    dist_port: int = 0
    epmd_port: int = 0
    node: str = ""
    cookie: str = ""
    library: Path | None = None
    seeds: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    management_port: int = 0
    install: RabbitInstall | None = field(default=None, repr=False)

    kind = "rabbitmq"
    stop_timeout: float = 2.0  # a clean stop takes ~1 s (6 s with the management plugin): then SIGKILL

    # -- layout ---------------------------------------------------------------------
    @property
    def base(self) -> Path:
        return self.run_dir / self.name

    @property
    def home(self) -> Path:
        return self.base / "home"

    @property
    def advanced_config(self) -> Path:
        return self.base / "advanced.config"

    @property
    def url(self) -> str:
        return amqp_url(self.port)

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}" if self.management_port else ""

    def describe(self) -> str:
        extra = f", management {self.management_url}" if self.management_port else ""
        return f"amqp://127.0.0.1:{self.port} ({self.node}{extra})"

    def remedy(self) -> str:
        return REMEDY

    # -- start ----------------------------------------------------------------------
    def prepare(self) -> None:
        self.install = self.install or find_rabbitmq()
        if self.install is None:
            raise ServiceError(self.name, "RabbitMQ or Erlang (`erl`, `epmd`) not found", remedy=REMEDY)
        if not self.epmd_port:
            raise ServiceError(self.name, "no epmd port: a node needs the cluster's epmd")
        self.port = self.claim_port(self.port)
        self.dist_port = self.claim_port(self.dist_port)
        if self.management_port:
            self.management_port = self.claim_port(self.management_port)
        self.cookie = self.cookie or secrets.token_hex(16)
        for d in (self.base / "mnesia", self.base / "log", self.home):
            d.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
            with os.fdopen(fd, "w") as fh:
                fh.write(self.cookie)
        if self.library is None:
            # management's applications are linked too (unloaded, they cost nothing): add_management() needs them
            self.library = link_library(self.install, self.run_dir / "rabbitmq-lib", management=True)
        plugins = ", ".join(MANAGEMENT_APPS) if self.management_port else ""
        (self.base / "enabled_plugins").write_text(f"[{plugins}].\n")
        self.advanced_config.write_text(self._config())

    def _config(self) -> str:
        rabbit: list[tuple] = [
            (_Atom("tcp_listeners"), [("127.0.0.1", self.port)]),
            (_Atom("collect_statistics_interval"), 500),  # the management statistics refresh, in ms
        ]
        if self.seeds:
            rabbit += [
                (_Atom("cluster_nodes"), ([_Atom(n) for n in self.seeds], _Atom("disc"))),
                # the seed starts at the same moment: retry every 0.2 s for up to 60 s
                (_Atom("cluster_formation"), [(_Atom("discovery_retry_limit"), 300),
                                              (_Atom("discovery_retry_interval"), 200)]),
            ]
        apps: list[tuple] = [(_Atom("rabbit"), rabbit)]
        if self.management_port:
            apps.append((_Atom("rabbitmq_management"),
                         [(_Atom("tcp_config"), [(_Atom("ip"), "127.0.0.1"), (_Atom("port"), self.management_port)])]))
        return _erl_term(apps) + ".\n"

    def environment(self) -> dict[str, str]:
        base = self.base
        return {
            "HOME": str(self.home),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_LIBS": str(self.library),
            "ERL_MAX_ETS_TABLES": "50000",
            "ERL_CRASH_DUMP_SECONDS": "0",  # a dying node exits at once instead of writing a dump
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_LOGS": "-",  # to standard output: the service's log file
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),  # no such .conf: no Cuttlefish pass
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.advanced_config),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),  # not /etc/rabbitmq's
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PLUGINS_DIR": str(self.library),
            "RABBITMQ_PID_FILE": str(base / "pid"),
        }

    def command(self) -> list[str]:
        install = self.install or find_rabbitmq()
        return [
            install.erl if install else "erl",
            "-sname", self.node,
            "-start_epmd", "false",
            "-kernel", "inet_dist_listen_min", str(self.dist_port),
            "-kernel", "inet_dist_listen_max", str(self.dist_port),
            "-kernel", "inet_dist_use_interface", "{127,0,0,1}",
            "-kernel", "prevent_overlapping_partitions", "false",
            "-noshell", "-noinput",
            "-boot", "start_sasl",
            "-s", "rabbit", "boot",
            *VM_FLAGS,
            "-syslog", "logger", "[]",
            "-syslog", "syslog_error_logger", "false",
        ]

    def amqp_ready(self) -> bool:
        """True once the node completes an AMQP handshake (never raises)."""
        if not port_in_use(self.port):  # listening yet? (see the module docstring: no self-connect)
            return False
        try:
            amqp_handshake(self.port)
        except Exception as exc:
            self.last_probe_error = exc
            return False
        return True

    def probe(self) -> bool:
        if not port_in_use(self.port):  # listening yet? (see the module docstring: no self-connect)
            return False
        amqp_handshake(self.port)
        if len(self.members) > 1:
            running = self.running_nodes()
            if sorted(running) != sorted(self.members):
                raise ServiceError(self.name, f"cluster members running: {sorted(running)} of {sorted(self.members)}")
        if self.management_port:
            return self.management_ready()
        return True

    def management_ready(self) -> bool:
        """True when the management plugin's HTTP API answers ``/api/overview``."""
        if not port_in_use(self.management_port):
            return False
        self.api("/api/overview", timeout=2.0)
        return True

    def api(self, path: str, timeout: float = 5.0):
        """``GET`` the management HTTP API (JSON decoded); raises on HTTP errors."""
        import base64  # noqa: PLC0415
        import json  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request = urllib.request.Request(self.management_url + path, headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def enable_management(self, port: int = 0) -> str:
        """Start the management plugin on the running node (``port`` 0: a free one); returns its URL."""
        if self.management_port and self.management_ready():
            return self.management_url
        port = self.claim_port(port)
        assert self.install is not None
        self.erl_call("application", "set_env",
                      f"[rabbitmq_management, tcp_config, [{{ip, \"127.0.0.1\"}}, {{port, {port}}}]]")
        plugins = self.base / "enabled_plugins"
        plugins.write_text(f"[{', '.join(MANAGEMENT_APPS)}].\n")
        self.erl_call("rabbit_plugins", "ensure", f"[{_erl_term(str(plugins))}]", timeout=60)
        self.management_port = port
        return self.management_url

    # -- asking the node --------------------------------------------------------------
    def erl_call(self, module: str, function: str, args: str = "[]", timeout: float = 10.0) -> str:
        """Call ``module:function(args...)`` on the node through ``erl_call``; returns the printed result."""
        assert self.install is not None
        if not self.install.erl_call:
            raise ServiceError(self.name, "no `erl_call` found (it comes with Erlang)", remedy=REMEDY)
        env = dict(os.environ, HOME=str(self.home), ERL_EPMD_PORT=str(self.epmd_port))
        out = subprocess.run([self.install.erl_call, "-sname", self.node, "-a", f"{module} {function} {args}"],
                             capture_output=True, text=True, timeout=timeout, env=env)
        if out.returncode != 0:
            raise ServiceError(self.name, f"erl_call {module}:{function} failed: {(out.stderr or out.stdout).strip()}")
        return out.stdout.strip()

    def erl_eval(self, expression: str, timeout: float = 10.0) -> str:
        """Evaluate Erlang ``expression`` (ending in ``.``) on the node through ``erl_call -e``."""
        assert self.install is not None
        if not self.install.erl_call:
            raise ServiceError(self.name, "no `erl_call` found (it comes with Erlang)", remedy=REMEDY)
        env = dict(os.environ, HOME=str(self.home), ERL_EPMD_PORT=str(self.epmd_port))
        out = subprocess.run([self.install.erl_call, "-sname", self.node, "-e"], input=expression + "\n",
                             capture_output=True, text=True, timeout=timeout, env=env)
        if out.returncode != 0:
            raise ServiceError(self.name, f"erl_call -e failed: {(out.stderr or out.stdout).strip()}")
        return out.stdout.strip()

    def queue_types(self) -> dict[str, str]:
        """Queue name -> type (``classic``, ``quorum``...) of every queue in vhost ``/``."""
        text = self.erl_eval('[{binary_to_list(N), T} || [{name, {resource, _, queue, N}}, {type, T}] '
                             '<- rabbit_amqqueue:info_all(<<"/">>, [name, type])].')
        return {name: kind.removeprefix("rabbit_").removesuffix("_queue")
                for name, kind in re.findall(r'\{"([^"]*)", ?(\w+)\}', text)}

    def queue_leaders(self) -> dict[str, str]:
        """Quorum queue name -> the Erlang node that leads it now."""
        text = self.erl_eval('[{binary_to_list(N), L} || [{name, {resource, _, queue, N}}, {type, quorum}, '
                             '{leader, L}] <- rabbit_amqqueue:info_all(<<"/">>, [name, type, leader])].')
        return dict(re.findall(r"\{\"([^\"]*)\", ?'?([\w.@-]+)'?\}", text))

    def running_nodes(self, timeout: float = 10.0) -> list[str]:
        """Names of the cluster's nodes that run RabbitMQ now, as this node sees them."""
        return re.findall(r"'?([\w.-]+@[\w.-]+)'?", self.erl_call("rabbit_nodes", "all_running", timeout=timeout))

    def status(self) -> dict:
        info = super().status()
        info["node"] = self.node
        if self.management_port:
            info["management"] = self.management_url
        if self.alive() and self.state == Status.RUNNING and len(self.members) > 1:
            with contextlib.suppress(Exception):
                info["cluster"] = self.running_nodes(timeout=2.0)
        return info


@dataclass
class RabbitMQGroup:
    """A cluster's epmd and its RabbitMQ node(s): one node, or N clustered (the first is the seed)."""

    epmd: EpmdService
    nodes: list[RabbitMQService]

    @property
    def services(self) -> list[Service]:
        return [self.epmd, *self.nodes]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """The broker URL Celery and kombu take: the nodes in order, ``;``-separated (kombu fails over)."""
        return ";".join(self.urls)

    @property
    def management_url(self) -> str:
        return next((n.management_url for n in self.nodes if n.management_port), "")

    def spawn_nodes(self, timeout: float) -> None:
        """Spawn the nodes: the seed first and, for a cluster, the others once it answers AMQP.

        Returns without waiting for the last ones (``wait_ready`` them); raises
        the seed's ServiceError if it never answers.
        """
        seed, rest = self.nodes[0], self.nodes[1:]
        seed.spawn()
        if rest:
            if not poll_until(seed.amqp_ready, timeout, 0.05, alive=seed.alive):
                seed.state = Status.FAILED
                problem = (f"exited with code {seed.proc.returncode} during start-up" if not seed.alive()
                           else f"did not answer AMQP within {timeout:.0f} s (the other nodes wait to join it)")
                raise ServiceError(seed.name, problem, command=seed.command(), log=seed.log_path,
                                   remedy=seed.remedy())
            for node in rest:
                node.spawn()


def rabbitmq_group(run_dir: Path, cluster_id: str, nodes: int = 1, *, management: bool = False,
                   base_name: str = "rabbit") -> RabbitMQGroup:
    """An epmd and ``nodes`` RabbitMQ services named ``rabbit`` (one) or ``rabbit1``... (a cluster)."""
    if nodes < 1:
        raise ValueError("a RabbitMQ cluster needs at least one node")
    epmd = EpmdService(name="epmd", run_dir=run_dir, cluster_id=cluster_id, port=free_port())
    cookie = secrets.token_hex(16)
    tag = re.sub(r"[^A-Za-z0-9-]", "-", cluster_id)
    names = [base_name] if nodes == 1 else [f"{base_name}{i}" for i in range(1, nodes + 1)]
    members = [f"labkit-{tag}-{n}@localhost" for n in names]
    services = [
        RabbitMQService(
            name=name, run_dir=run_dir, cluster_id=cluster_id, port=free_port(), dist_port=free_port(),
            epmd_port=epmd.port, node=members[i], cookie=cookie, seeds=members[:1] if i else [],
            members=members, management_port=free_port() if management else 0,
        )
        for i, name in enumerate(names)
    ]
    return RabbitMQGroup(epmd=epmd, nodes=services)


def broker_settings(nodes: int) -> dict:
    """Celery settings a RabbitMQ broker of ``nodes`` nodes needs (the cluster's own settings win).

    One node: none — Celery's defaults are what a team starts with. A cluster:
    quorum queues (replicated by Raft to every node; classic queues live on
    one node and die with it) for the default queue and for every queue a
    worker's ``-Q`` creates, and publisher confirms, so a publish returns only
    once a majority of the nodes has the message. Celery 5.5+ then turns
    global QoS off by itself (``worker_detect_quorum_queues``: quorum queues
    reject it, the prefetch limit becomes per consumer). Workers run
    :class:`labkit.quorum.Consumer`: Celery's consumer without its native
    delayed-delivery step, which stalls a worker for ~17 s after a node dies,
    and waiting out a remote-control queue a survivor still holds for the
    dead node's connection, which otherwise makes the worker exit (see
    :mod:`labkit.quorum`).
    """
    if nodes <= 1:
        return {}
    return {
        "task_default_queue_type": "quorum",
        "task_create_missing_queue_type": "quorum",
        "broker_transport_options": {"confirm_publish": True},
        "worker_consumer": "labkit.quorum:Consumer",
    }


class QueueDepths:
    """Messages ready in RabbitMQ queues (a passive ``queue.declare`` each), over one kept connection.

    Like Redis's ``LLEN`` of a Celery queue, it counts messages no consumer
    holds: delivered but unacknowledged ones (prefetched, running under
    ``acks_late``) are not "ready". A queue that does not exist yet is 0.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn = None

    def __call__(self, names: list[str]) -> dict[str, int]:
        from kombu import Connection  # noqa: PLC0415

        out: dict[str, int] = {}
        try:
            if self._conn is None:
                self._conn = Connection(self.url, connect_timeout=2)
                self._conn.ensure_connection(max_retries=1)
            for name in names:
                channel = self._conn.channel()  # a passive declare of a missing queue closes its channel
                try:
                    out[name] = int(channel.queue_declare(name, passive=True).message_count)
                except self._conn.channel_errors:
                    out[name] = 0
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
        except Exception:
            self.close()
            return {name: out.get(name, -1) for name in names}
        return out

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
            self._conn = None


def stray_erlang(cluster_id: str) -> list[int]:
    """PIDs of ``beam.smp``/``epmd`` processes carrying this cluster's mark (a leak check)."""
    from .base import labkit_processes  # noqa: PLC0415

    found = []
    for p in labkit_processes(cluster_id):
        with contextlib.suppress(Exception):
            if p.name() in ("beam.smp", "epmd", "erl_child_setup", "inet_gethost"):
                found.append(p.pid)
    return found

