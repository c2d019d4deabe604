"""A real ``celery beat`` process: the scheduler, as a service of the cluster.

Beat sends scheduled tasks; like a worker it builds its app from the
cluster's environment (:mod:`labkit.worker_app`), so it publishes to the
same Redis with the same settings. Like a worker it can run with a skewed
wall clock (``clock_offset``, libfaketime), which is how lesson 11 shows a
beat firing early or late.

Readiness: beat has no control channel, so it is ready when Celery's
``beat_init`` signal has fired in it (``worker_app`` writes the ready file)
— the scheduler is loaded and the loop is about to tick.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .worker import CeleryService


@dataclass
class BeatService(CeleryService):
    """``celery beat`` with an optional custom scheduler class (``"module:Class"``)."""

    scheduler: str | None = None
    max_interval: float = 1.0  # seconds beat may sleep between checks: small, so ticks are punctual
    loglevel: str = "INFO"
    schedule_file: str = field(default="", init=False)

    kind = "beat"

    def prepare(self) -> None:
        super().prepare()
        self.schedule_file = str(self.run_dir / "beat" / f"{self.name}-schedule")
        (self.run_dir / "beat").mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "celery", "-A", "labkit.worker_app:app", "beat",
            "--max-interval", f"{self.max_interval:g}",
            "--loglevel", self.loglevel,
            "--schedule", self.schedule_file or str(self.run_dir / "beat" / f"{self.name}-schedule"),
        ]
        if self.scheduler:
            cmd += ["--scheduler", self.scheduler]
        return cmd

    def describe(self) -> str:
        extra = f" clock {self.clock_offset:+g} s" if self.clock_offset else ""
        return f"beat {self.scheduler or 'default scheduler'}{extra}"

    def probe(self) -> bool:
        return self.ready_file.exists()

    def remedy(self) -> str:
        return "read the beat log above; a custom scheduler must be importable as 'module:Class'"
