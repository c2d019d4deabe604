"""Entry point for ``celery -A labkit.worker_app worker``: the app, built from the environment.

The cluster passes ``LABKIT_REDIS_URL``, ``LABKIT_BROKER_URL`` (set when the
broker is not Redis), ``LABKIT_SETTINGS`` (JSON) and
``LABKIT_INCLUDE`` (comma-separated modules) to every worker it starts, and
builds the notebook's own app from the same values. When a worker is ready
(``worker_ready``) or a beat has loaded its schedule (``beat_init``) it writes
``LABKIT_READY_FILE``, so the cluster knows when a control ping is worth
sending (a worker) or that the scheduler runs (a beat).
"""

from __future__ import annotations

import os
from pathlib import Path

from celery.signals import beat_init, worker_ready

from labkit.app import broker_url, env_settings, make_app, redis_url

_include = os.environ.get("LABKIT_INCLUDE")
app = make_app(
    redis_url(),
    settings=env_settings(),
    include=[m for m in _include.split(",") if m] if _include is not None else None,
    broker_url=broker_url(),
)


@worker_ready.connect
@beat_init.connect
def _mark_ready(**_kwargs) -> None:
    marker = os.environ.get("LABKIT_READY_FILE")
    if marker:
        Path(marker).write_text(str(os.getpid()))
