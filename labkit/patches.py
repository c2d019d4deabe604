"""Fixes for Celery bugs the kit's clusters hit, applied in every worker (:mod:`labkit.worker_app`).

Each one is a crash no lesson is about; each is named here, with the test
that shows it, so nothing the lessons measure is quietly changed.

**A worker dies at a broker reconnect if a pool child has just exited**
(Celery 5.7.0 with kombu 5.7.0; Celery's main branch still has it). After a
child exits, the pool stops watching it (``_untrack_child_process`` sets its
``_sentinel_poll`` to ``None``) and reaps it at the next ``maintain_pool``,
within 5 s. A broker reconnect in between re-registers every child of the
pool with the event loop, the exited one too, with ``None`` as its file
descriptor: kombu 5.7 raises ``ValueError`` for that, Celery's
``iterate_file_descriptors_safely`` catches only ``OSError`` and
``AttributeError``, and the worker stops with "Unrecoverable error:
ValueError('file descriptor is None')". Seen in lesson 10: a pool child
killed for not starting within ``worker_proc_alive_timeout`` on a loaded
laptop, then a Redis restart. The fix skips a child the pool has already
stopped watching; ``maintain_pool`` reaps it as before.
"""

from __future__ import annotations

from typing import Any

from celery.concurrency import asynpool

_UNTRACKED = object()


def _track_child_process(self: asynpool.AsynPool, proc: Any, hub: Any) -> None:
    if getattr(proc, "_sentinel_poll", _UNTRACKED) is None:  # exited and untracked: maintain_pool reaps it
        return
    _celery_track_child_process(self, proc, hub)


# Celery's own method (a reloaded module must not wrap its own wrapper)
_celery_track_child_process = getattr(asynpool.AsynPool._track_child_process, "__wrapped__",
                                      asynpool.AsynPool._track_child_process)
_track_child_process.__wrapped__ = _celery_track_child_process  # type: ignore[attr-defined]


def apply() -> None:
    """Install the fixes (idempotent)."""
    asynpool.AsynPool._track_child_process = _track_child_process
