"""A probe HTTP service that records every request it serves (lessons 12 and 13).

It stands in for "the client's server" or "the flaky service" that tasks
call. It runs in a thread of the process that created it (the notebook's
kernel), binds 127.0.0.1 on a free port, and is started and stopped by the
experiment code (``with ProbeServer() as probe: ...``). Everything a lesson
plots about the service comes from here: when each request arrived and
left, how many were in flight at once, and what it answered.

Workers are other processes on the same machine, so they reach it over
loopback and the service's ``time.time()`` is on the same clock as theirs.

Leading underscore: workers do not import it as a task module. The serving
machinery is :class:`labkit.loopback.LoopbackServer`, shared by every lesson.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from labkit.loopback import LoopbackServer, QuietHandler
from labkit.measure import concurrency_timeline


@dataclass
class Call:
    """One request as the service saw it (``time.time()`` seconds)."""

    tag: str
    attempt: int
    start: float
    end: float
    status: int


class ProbeServer(LoopbackServer):
    """A local HTTP service that counts in-flight requests and keeps a log of calls.

    ``GET /call?tag=t&attempt=0&hold=0.5`` is answered after ``hold`` seconds
    with the status :meth:`respond` returns (200 here; subclasses fail on
    purpose). ``peak`` is the largest number of requests in flight at once.
    """

    thread_name = "labkit-probe"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.in_flight = 0
        self.peak = 0
        self._lock = threading.Lock()

    def handler(self) -> type[QuietHandler]:
        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                params = dict(parse_qsl(urlsplit(self.path).query))
                status = self.server.owner._serve(params)
                body = b"ok\n" if status == 200 else b"unavailable\n"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    # -- serving ---------------------------------------------------------------------
    def _serve(self, params: dict[str, str]) -> int:
        start = time.time()
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        status = 500
        try:
            status = self.respond(params)
        finally:
            end = time.time()
            with self._lock:
                self.in_flight -= 1
                self.calls.append(Call(params.get("tag", ""), int(params.get("attempt", 0)), start, end, status))
        return status

    def respond(self, params: dict[str, str]) -> int:
        """Hold the request ``hold`` seconds, then answer 200. Override to misbehave."""
        time.sleep(float(params.get("hold", 0)))
        return 200

    # -- what it saw -----------------------------------------------------------------
    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def timeline(self, t0: float) -> list[tuple[float, float]]:
        """In-flight requests over time (a step line), seconds since ``t0``."""
        steps = concurrency_timeline([(c.start - t0, c.end - t0) for c in self.snapshot()])
        return [(0.0, 0.0), *steps]
