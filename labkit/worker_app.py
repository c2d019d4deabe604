"""Entry point for ``celery -A labkit.worker_app worker``: the app, built from the environment.

The cluster passes ``LABKIT_REDIS_URL``, ``LABKIT_BROKER_URL`` (set when the
broker is not Redis), ``LABKIT_SETTINGS`` (JSON) and
``LABKIT_INCLUDE`` (comma-separated modules) to every worker it starts, and
builds the notebook's own app from the same values. When a worker is ready
(``worker_ready``) or a beat has loaded its schedule (``beat_init``) it writes
``LABKIT_READY_FILE``, so the cluster knows when a control ping is worth
sending (a worker) or that the scheduler runs (a beat).

Tasks defined at run time (:mod:`labkit.define`) reach a worker two ways: it
loads every module stored in the cluster's Redis at ``worker_init`` (in its
main process, before the pool forks, however the process was launched), and
a running worker answers the ``labkit_define`` remote-control command.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery.signals import beat_init, worker_init, worker_ready
from celery.worker.control import control_command

from labkit import define, patches
from labkit.app import broker_url, env_settings, make_app, redis_url

patches.apply()
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


@worker_init.connect
def _load_defined(**_kwargs) -> None:
    define.load_all(app)


@control_command(args=[("module", str), ("digest", str)], signature="<module> [digest]")
def labkit_define(state, module: str, digest: str = "", **_kwargs) -> dict:
    """Load a module defined with cluster.define() from the cluster's Redis; renew the pool."""
    return define.handle_define(state, module, digest)
