"""Lesson 12's claims, asserted through the API on a real cluster.

Two "host" workers with 12 threads each run the callers; ``limited`` (3
threads) serves the dedicated queue. Counts come from the probe server
(in-flight requests) and from Redis (failed acquires), never from logs.
"""

from __future__ import annotations

import pytest

from labkit import LocalCluster
from labkit.lessons import semaphore
from labkit.lessons._probe import ProbeServer

pytestmark = pytest.mark.cluster  # every test here starts real processes

N, LEASES = 12, 3
HOST = {"pool": "threads", "concurrency": 12, "prefetch_multiplier": 1}


@pytest.fixture(scope="module")
def cluster():
    workers = [{"name": "h1", **HOST}, {"name": "h2", **HOST},
               {"name": "limited", "queues": ["client"], "pool": "threads",
                "concurrency": LEASES, "prefetch_multiplier": 1}]
    with LocalCluster(workers=workers, zookeeper=1, settings={"task_acks_late": True},
                      reuse=False) as c:
        yield c


def test_probe_server_counts_in_flight_and_stops():
    import threading
    import urllib.request

    with ProbeServer() as probe:
        url = probe.url
        threads = [threading.Thread(target=urllib.request.urlopen, args=(f"{url}/call?hold=0.3",))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert probe.peak == 4
        assert len(probe.snapshot()) == 4
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/call", timeout=2)


def test_semaphore_caps_the_client_at_the_limit(cluster):
    comparison = semaphore.compare(cluster, n=N, leases=LEASES, hold=0.4)
    assert comparison.before.value >= 2 * LEASES, comparison
    assert comparison.after.value <= LEASES, comparison
    assert comparison.after.meta["completed"] == N
    comparison.check(factor=2, after_at_most=LEASES)


def test_nonblocking_acquire_leaves_free_leases_unused(cluster):
    nonblocking = semaphore.first_try(cluster, "nonblocking", n=N, leases=LEASES)
    timeout = semaphore.first_try(cluster, "timeout", n=N, leases=LEASES, wait=0.5, trials=2)
    assert nonblocking.value < LEASES, nonblocking.values
    assert timeout.value == LEASES, timeout.values


def test_timeout_wastes_fewer_attempts_than_nonblocking_retry(cluster):
    forms = semaphore.retry_forms(cluster, n=N, leases=LEASES, hold=0.4, wait=1.0)
    talk, timeout, queue = forms["nonblocking"], forms["timeout"], forms["queue"]
    for m in forms.values():
        assert m.value <= LEASES, m
        assert m.meta["completed"] == N, m.meta
    assert timeout.meta["failed"] < talk.meta["failed"], (timeout.meta, talk.meta)
    assert talk.meta["failed"] >= N - LEASES  # at most LEASES can win the first round
    assert queue.meta["failed"] == 0
