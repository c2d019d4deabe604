"""A TCP relay between one worker and Redis that can cut, slow or reset the link: partitions without root.

A real network partition needs ``iptables`` or a network namespace, i.e.
root. A relay needs neither: the worker is told to reach Redis at the
relay's port, and the relay copies bytes both ways until it is told not to.

Modes (``python -m labkit.services.relay LISTEN TARGET CONTROL`` runs it;
:class:`RelayService` owns it as a service of the cluster):

``forward``
    Copy bytes both ways (optionally ``delay`` seconds late per chunk).
``hold``
    A partition as TCP sees it: nothing crosses the link, connections stay
    open, new ones are accepted but carry nothing. Bytes already sent wait in
    socket buffers, exactly like unacknowledged segments that TCP keeps
    retransmitting; on ``forward`` they flow again in order, as after a
    short real partition.
``reset``
    The far side is gone: every connection is closed with a TCP reset and
    new ones are reset at once (what a client sees when a host reboots).

The control port (127.0.0.1) takes one line per connection and answers one
JSON line: ``mode forward|hold|reset``, ``delay SECONDS``, ``stats``,
``ping``. It imports only the standard library, so it starts in tens of
milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import select
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from .base import Service, ServiceError

MODES = ("forward", "hold", "reset")
_CHUNK = 65536


# --------------------------------------------------------------------------- the relay process
class Relay:
    """The relay's state: its mode, a delay, and every open connection pair."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "forward"
        self.delay = 0.0
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.pairs: set[tuple[socket.socket, socket.socket]] = set()
        self.accepted = 0
        self.resets = 0
        self.bytes = 0

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        if mode == "forward":
            self.gate.set()
            return
        self.gate.clear()
        if mode == "reset":
            with self.lock:
                pairs, self.pairs = list(self.pairs), set()
            for a, b in pairs:
                _reset(a)
                _reset(b)
                self.resets += 1

    def accept(self, client: socket.socket) -> None:
        self.accepted += 1
        if self.mode == "reset":
            _reset(client)
            self.resets += 1
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)  # Redis itself is down: the worker sees what it would see without us
            return
        upstream.settimeout(None)
        pair = (client, upstream)
        with self.lock:
            self.pairs.add(pair)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self.pump, args=(src, dst, pair), daemon=True).start()

    def pump(self, src: socket.socket, dst: socket.socket, pair: tuple) -> None:
        """Copy ``src`` -> ``dst``; while not forwarding, read nothing (bytes wait in the kernel)."""
        try:
            while True:
                self.gate.wait()
                ready, _, _ = select.select([src], [], [], 0.05)
                if not ready or not self.gate.is_set():
                    continue
                data = src.recv(_CHUNK)
                if not data:
                    break
                if self.delay:
                    time.sleep(self.delay)
                self.gate.wait()
                dst.sendall(data)
                self.bytes += len(data)
        except OSError:
            pass
        finally:
            with self.lock:
                live = pair in self.pairs
                self.pairs.discard(pair)
            if live:
                for s in pair:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                    s.close()

    def command(self, line: str) -> dict:
        words = line.split()
        if not words:
            return {"error": "empty command"}
        verb = words[0]
        if verb == "mode" and len(words) == 2:
            self.set_mode(words[1])
        elif verb == "delay" and len(words) == 2:
            self.delay = max(0.0, float(words[1]))
        elif verb not in ("stats", "ping"):
            return {"error": f"unknown command {line!r}; use mode|delay|stats|ping"}
        return {"mode": self.mode, "delay": self.delay, "connections": len(self.pairs),
                "accepted": self.accepted, "resets": self.resets, "bytes": self.bytes}


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), not FIN: the peer gets ECONNRESET."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    return s


def _serve_control(relay: Relay, control: socket.socket) -> None:
    while True:
        conn, _ = control.accept()
        with conn:
            conn.settimeout(2)
            try:
                line = conn.makefile("r").readline().strip()
                reply = relay.command(line)
            except (OSError, ValueError) as exc:
                reply = {"error": str(exc)}
            with contextlib.suppress(OSError):
                conn.sendall((json.dumps(reply) + "\n").encode())


def main(argv: list[str]) -> int:
    listen, target, control_port = int(argv[0]), int(argv[1]), int(argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    relay = Relay(("127.0.0.1", target))
    server, control = _listener(listen), _listener(control_port)
    threading.Thread(target=_serve_control, args=(relay, control), daemon=True).start()
    print(f"relay 127.0.0.1:{listen} -> 127.0.0.1:{target}, control on {control_port}", flush=True)
    while True:
        client, _ = server.accept()
        relay.accept(client)


# --------------------------------------------------------------------------- the service
def control(port: int, line: str, timeout: float = 2.0) -> dict:
    """Send one control command to a relay and return its JSON answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((line + "\n").encode())
        reply = s.makefile("r").readline()
    answer = json.loads(reply)
    if "error" in answer:
        raise ValueError(answer["error"])
    return answer


@dataclass
class RelayService(Service):
    """The relay process for one worker: ``url`` is what the worker uses instead of Redis's."""

    target_port: int = 0
    port: int = 0
    control_port: int = 0
    for_worker: str = ""
    mode: str = field(default="forward", init=False)

    kind = "relay"

    def prepare(self) -> None:
        if not self.target_port:
            raise ServiceError(self.name, "has no Redis port to relay to")
        self.port = self.claim_port(self.port)
        self.control_port = self.claim_port(self.control_port)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "labkit.services.relay",
                str(self.port), str(self.target_port), str(self.control_port)]

    @property
    def url(self) -> str:
        if not self.port:
            self.port = self.claim_port(0)
        return f"redis://127.0.0.1:{self.port}/0"

    def describe(self) -> str:
        return f"127.0.0.1:{self.port} -> :{self.target_port} ({self.mode})"

    def probe(self) -> bool:
        return control(self.control_port, "ping", timeout=0.5).get("mode") == self.mode

    def send(self, line: str) -> dict:
        """One control command (``mode hold``, ``delay 0.2``, ``stats``); a clear error if it fails."""
        if not self.alive():
            raise ServiceError(self.name, "is not running", log=self.log_path,
                               remedy=f"restart its worker: cluster.restart({self.for_worker!r})")
        try:
            return control(self.control_port, line)
        except (OSError, ValueError) as exc:
            raise ServiceError(self.name, f"did not take {line!r}: {exc}", log=self.log_path) from exc

    def set_mode(self, mode: str) -> dict:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        answer = self.send(f"mode {mode}")
        self.mode = mode
        return answer

    def set_delay(self, seconds: float) -> dict:
        if seconds < 0:
            raise ValueError(f"delay must be >= 0 seconds, not {seconds!r}")
        return self.send(f"delay {seconds}")

    def stats(self) -> dict:
        return self.send("stats")

    def restart(self, timeout: float | None = None) -> None:
        self.mode = "forward"  # a new relay process forwards
        super().restart(timeout)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
