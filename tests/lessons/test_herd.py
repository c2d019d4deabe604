"""Lesson 13's claims, asserted through the API on a real cluster.

Retry arrivals are recorded by the flaky service itself; lock wake-ups are
counted in Redis by each fired ZooKeeper watch.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest

from labkit import LocalCluster
from labkit.lessons import herd

pytestmark = pytest.mark.cluster  # every test here starts real processes

N = 60
CONTENDERS = 15
HOST = {"pool": "threads", "concurrency": 32, "prefetch_multiplier": 1}


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=[{"name": "h1", **HOST}, {"name": "h2", **HOST}], zookeeper=1,
                      settings={"task_acks_late": True}, reuse=False) as c:
        yield c


def test_sliding_peak_is_not_tied_to_a_grid():
    assert herd.sliding_peak([0.2, 0.3, 0.4, 1.0]) == 3  # 0.2..0.4 straddle the 0.25 grid line
    assert herd.sliding_peak([0.0, 0.25, 0.5]) == 1
    assert herd.sliding_peak([]) == 0


def test_flaky_service_fails_everyone_at_once():
    statuses = []

    def call(i):
        try:
            urllib.request.urlopen(f"{url}/call?tag=t{i}&attempt=0", timeout=10)
            statuses.append(200)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)

    with herd.FlakyService(expected=5) as service:
        url = service.url
        threads = [threading.Thread(target=call, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        urllib.request.urlopen(f"{url}/call?tag=t0&attempt=1", timeout=10)
        ends = [c.end for c in service.snapshot() if c.attempt == 0]
        assert statuses == [503] * 5
        assert max(ends) - min(ends) < 0.2  # answered together, not one by one
        assert len(service.arrivals()) == 1


def test_fixed_countdown_returns_together_jitter_spreads(cluster):
    fixed = herd.retries(cluster, "fixed", n=N, countdown=2.0)
    uniform = herd.retries(cluster, "randint", n=N, lo_ms=0, hi_ms=4000)
    celery = herd.retries(cluster, "celery", n=N)
    for m in (fixed, uniform, celery):
        assert m.meta["failed_together"] == N
        assert len(m.meta["arrivals"]) == N
    assert fixed.value >= 2 * uniform.value, (fixed.value, uniform.value)
    assert fixed.value >= 2 * celery.value, (fixed.value, celery.value)
    # Celery's jitter is whole seconds: its retries bunch right after whole seconds
    assert celery.meta["on_the_second"] >= uniform.meta["on_the_second"] + 0.25, (
        celery.meta["on_the_second"], uniform.meta["on_the_second"])


def test_naive_lock_wakes_every_waiter_kazoo_wakes_one(cluster):
    locks = herd.compare_locks(cluster, n=CONTENDERS)
    naive, recipe = locks.before, locks.after
    assert naive.value >= 3 * recipe.value, (naive.values, recipe.values)
    assert max(recipe.values) <= 1, recipe.values
    assert recipe.value <= CONTENDERS - 1
    assert naive.values[0] > naive.values[-2], naive.values  # wake-ups shrink with the crowd
    locks.check(factor=3)
