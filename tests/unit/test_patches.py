"""The kit's fixes to Celery (labkit.patches), each shown failing on Celery's own code first."""

from __future__ import annotations

import pytest
from celery.concurrency.asynpool import AsynPool
from kombu.asynchronous import Hub

from labkit import patches


@pytest.fixture
def pool_and_hub():
    pool = AsynPool(processes=1, threads=False)  # forks one real pool child
    hub = Hub()
    try:
        yield pool, hub
    finally:
        pool.terminate()
        pool.join()
        hub.close()


def test_an_exited_pool_child_does_not_crash_the_reconnect(pool_and_hub):
    """At a broker reconnect the pool re-registers every child; an exited one has no fd left."""
    pool, hub = pool_and_hub
    proc = pool._pool[0]
    proc._sentinel_poll = None  # what _untrack_child_process leaves on a child that exited
    with pytest.raises(ValueError, match="file descriptor is None"):
        patches._celery_track_child_process(pool, proc, hub)  # Celery's own code: the worker's crash
    patches.apply()
    pool._track_child_process(proc, hub)  # skipped: maintain_pool reaps it
    assert not hub.readers


def test_a_live_pool_child_is_still_watched(pool_and_hub):
    pool, hub = pool_and_hub
    patches.apply()
    proc = pool._pool[0]
    pool._track_child_process(proc, hub)
    assert proc._sentinel_poll in hub.readers, "the patched pool stopped watching a live child"
    pool._untrack_child_process(proc, hub)
