"""Lesson 02's claims on a real cluster — where the data is decides whether step B works — each with its control.

One cluster (the notebook's shape) serves the module; every experiment runs
once (module-scoped fixtures), and both a claim and its negative control read
the same run.
"""

from __future__ import annotations

import pytest

from labkit import testing
from labkit.lessons import locality

pytestmark = pytest.mark.cluster  # every test here starts real processes

N = 100


@pytest.fixture(scope="module")
def cluster():
    with testing.cluster(**locality.CLUSTER) as c:
        yield c


@pytest.fixture(scope="module")
def runs(cluster):
    naive = locality.pairs(cluster, n=N)
    fixes = {(m.meta["mode"], m.meta["placement"]): m for m in locality.locality_fixes(cluster, n=N)}
    return {"naive": naive, "fixes": fixes}


def test_file_on_one_workers_disk_is_missing_on_the_other(runs):
    naive = runs["naive"]
    locality.a_local_path_breaks_on_other_hosts(naive)
    assert set(naive.meta["errors"]) == {"FileNotFoundError"}


def test_locality_claim_fails_without_the_fix_shared_storage(runs):
    """With the data on shared storage, B still crosses to the other worker but nothing fails."""
    shared = runs["fixes"][("shared", "anywhere")]
    assert shared.meta["b_on_other_worker"] > 0
    with pytest.raises(AssertionError, match="of the pairs fail"):
        locality.a_local_path_breaks_on_other_hosts(shared)


@pytest.mark.parametrize("fix", sorted(set(locality.PLACEMENTS) - {("local", "anywhere")}),
                         ids=lambda f: "-".join(f).replace(" ", "_"))
def test_each_fix_fails_no_pair(runs, fix):
    fixed = runs["fixes"][fix]
    locality.no_pair_fails(fixed)
    if fixed.meta["same_node"]:
        assert fixed.meta["b_on_other_worker"] == 0
    else:  # B still ran on the other worker often; it just found the data
        assert fixed.meta["b_on_other_worker"] > 0


def test_locality_claim_fails_without_the_fix(runs):
    """The naive run: a local path, B anywhere."""
    with pytest.raises(AssertionError, match="no pair fails"):
        locality.no_pair_fails(runs["naive"])


def test_more_workers_break_more_pairs(cluster):
    """With W workers the share tends to (W-1)/W: the claim's threshold follows W."""
    m, fixed = locality.pairs_on_workers(cluster, n=60, workers=3)
    assert m.meta["workers"] == 3 and fixed.meta["placement"] == "forward"
    locality.a_local_path_breaks_on_other_hosts(m)  # at least 0.6 x 2/3 of the pairs
    locality.no_pair_fails(fixed)


@pytest.fixture(scope="module")
def broker(cluster):
    return {"fix": locality.compare_broker_memory(cluster, size_mb=5, messages=5),
            "no_fix": locality.compare_broker_memory(cluster, size_mb=5, messages=5, by_reference=False)}


def test_a_reference_costs_the_broker_far_less_memory_than_the_payload(broker):
    mem = broker["fix"]
    locality.a_reference_spares_the_broker(mem)
    assert mem.before.meta["message_bytes"] >= 5_000_000  # the whole payload waits in Redis (base64: 4/3 of it)
    assert mem.after.value < 10_000, mem.after.meta  # a path and Celery's headers


def test_locality_claim_fails_without_the_fix_by_value_twice(broker):
    with pytest.raises(AssertionError, match="improvement factor"):
        locality.a_reference_spares_the_broker(broker["no_fix"])


def test_too_small_a_payload_is_refused_clearly(cluster):
    with pytest.raises(ValueError, match="PAYLOAD_MB"):
        locality.compare_broker_memory(cluster, size_mb=0.01)


@pytest.fixture(scope="module")
def tiers(cluster):
    return locality.ladder(cluster)


def test_the_ladder_is_ordered(tiers):
    assert [t.label for t in tiers] == ["memory", "local file", "Redis (loopback)", "emulated NAS"]
    locality.closer_is_faster(tiers)


def test_locality_claim_fails_without_the_fix_farthest_first(tiers):
    """The ladder has no 'before': read farthest-first, the same measured rungs fail the check."""
    with pytest.raises(AssertionError, match="out_of_order"):
        locality.closer_is_faster(tiers[::-1])
