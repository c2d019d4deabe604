"""Lesson 08's claims, asserted on a real cluster: the races happen, the fixes remove them."""

from __future__ import annotations

import pytest

from labkit import LocalCluster
from labkit.lessons import races

pytestmark = pytest.mark.cluster  # every test here starts real processes


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=2, zookeeper=0, reuse=False) as c:
        yield c


def test_overlapping_producers_import_files_twice(cluster):
    naive = races.producers(cluster, 100)
    assert naive.value > 0, naive.meta
    assert naive.meta["rows_inserted"] > naive.meta["rows_expected"]


@pytest.mark.parametrize("trial", [1, 2])
def test_claiming_producers_with_idempotent_consumer_import_each_file_once(cluster, trial):
    fixed = races.producers(cluster, 100, claim=True)
    assert fixed.value == 0, fixed.meta
    assert fixed.meta["never_imported"] == 0
    assert fixed.meta["rows_inserted"] == fixed.meta["rows_expected"]


def test_shared_temp_file_corrupts_reports(cluster):
    naive = races.reports(cluster, 200)
    assert naive.value > 0, naive.meta


@pytest.mark.parametrize("trial", [1, 2])
def test_temp_file_per_task_and_atomic_publish_corrupt_nothing(cluster, trial):
    fixed = races.reports(cluster, 200, safe=True)
    assert fixed.value == 0, fixed.meta
    assert fixed.meta["tasks_failed"] == 0


@pytest.mark.parametrize("how", ["crash", "duplicate"])
def test_redelivered_message_is_applied_once_only_by_the_idempotent_consumer(cluster, how):
    naive = races.redelivery(cluster, idempotent=False, how=how)
    fixed = races.redelivery(cluster, idempotent=True, how=how)
    assert naive["deliveries"] == 2 and naive["applied"] == 2, naive
    assert fixed["deliveries"] == 2 and fixed["applied"] == 1, fixed
