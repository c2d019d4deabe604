"""Loopback HTTP servers that live inside the notebook's own process.

Several lessons need "the other side" of a network call — a client's fragile
server (12), a flaky service (13), an emulated NAS (02), a download source
(01). Each is a :class:`LoopbackServer` subclass: it says how to answer
(:meth:`~LoopbackServer.handler`), and the base class does the rest the same
way every time — bind 127.0.0.1 on a free port, serve from a thread of this
process, a deep accept backlog (Python's default of 5 drops connections when
dozens of tasks call at once), and a deterministic, idempotent ``close()``.

Workers are other processes on the same machine, so they reach it over
loopback, and its ``time.time()`` is the same clock as theirs (unless a
lesson skews a worker's clock on purpose).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    request_queue_size = 256
    owner: Any = None


class LoopbackServer:
    """Base class: ``with MyServer() as s: requests.get(s.url + "/...")``.

    A handler reaches the object that owns it as ``self.server.owner``.
    ``join_handlers = True`` makes ``close()`` wait for requests in progress
    (their handlers should then set a socket ``timeout``).
    """

    thread_name = "labkit-loopback"
    join_handlers = False

    def __init__(self) -> None:
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """The request handler class (subclasses override)."""
        raise NotImplementedError

    def start(self):
        """Bind a free port on 127.0.0.1 and serve in a background thread; returns self."""
        if self._httpd is not None:
            return self
        httpd = _Server(("127.0.0.1", 0), self.handler())
        httpd.owner = self
        httpd.daemon_threads = not self.join_handlers
        httpd.block_on_close = self.join_handlers
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=self.thread_name, daemon=True,
        )
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` while serving."""
        if self._httpd is None:
            raise RuntimeError(f"{type(self).__name__} is not running: use it in a `with` block")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        """Stop serving and free the port (idempotent)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that does not write an access log into the notebook."""

    def log_message(self, *args: object) -> None:
        pass
