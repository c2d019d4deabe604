"""Lesson 02's claims, asserted on a real cluster: where the data is decides whether step B works."""

from __future__ import annotations

import pytest

from labkit import LocalCluster
from labkit.lessons import locality

pytestmark = pytest.mark.cluster  # every test here starts real processes

N = 120


@pytest.fixture(scope="module")
def cluster():
    settings = {"worker_direct": True, "worker_prefetch_multiplier": 1}
    with LocalCluster(workers=2, zookeeper=0, settings=settings, reuse=False) as c:
        yield c


def test_file_on_one_workers_disk_is_missing_on_the_other(cluster):
    naive = locality.pairs(cluster, N)
    assert naive.value >= 0.3 * N, naive.meta
    # every failure is a pair whose B ran on the other "host", and only those
    assert naive.value == naive.meta["b_on_other_worker"], naive.meta
    assert set(naive.meta["errors"]) == {"FileNotFoundError"}


@pytest.mark.parametrize("fix", [
    {"mode": "local", "same_node": True},
    {"mode": "shared"},
    {"mode": "value"},
], ids=["same-node", "shared-storage", "by-value"])
def test_each_fix_fails_no_pair(cluster, fix):
    fixed = locality.pairs(cluster, N, **fix)
    assert fixed.value == 0, fixed.meta
    if fix.get("same_node"):
        assert fixed.meta["b_on_other_worker"] == 0
    else:  # B still ran on the other worker often; it just found the data
        assert fixed.meta["b_on_other_worker"] > 0


def test_a_reference_costs_the_broker_far_less_memory_than_the_payload(cluster):
    by_value, by_ref = locality.broker_memory(cluster, size_mb=5, messages=5)
    assert by_value.value >= 10 * by_ref.value, (by_value.meta, by_ref.meta)
    assert by_value.value >= 5_000_000  # the whole payload waits in Redis


def test_the_ladder_is_ordered(cluster):
    tiers = locality.ladder(cluster)
    assert [t.label for t in tiers] == ["memory", "local file", "Redis (loopback)", "emulated NAS"]
    assert locality.ordered(tiers), [(t.label, t.median) for t in tiers]
