"""Lesson 03's claims, asserted through the API on a real cluster.

One cluster (the lesson's ``CLUSTER``) and one run of each experiment per
module: the claims run on the "after" runs, their negative controls on the
"before" runs of the same module. Timings come from the tasks' own records in
Redis, pool sizes from the worker's child processes.
"""

from __future__ import annotations

import pytest

from labkit import testing
from labkit.lessons import queues
from labkit.measure import Comparison

pytestmark = pytest.mark.cluster  # every test here starts real processes


@pytest.fixture(scope="module")
def cluster():
    with testing.cluster(**queues.CLUSTER) as c:
        yield c


@pytest.fixture(scope="module")
def layouts(cluster):
    return {layout: queues.segregation(cluster, layout) for layout in ("shared", "fair", "split")}


@pytest.fixture(scope="module")
def prefetch(cluster):
    return {mode: queues.prefetch(cluster, mode) for mode in ("default", "disabled", "late")}


@pytest.fixture(scope="module")
def rabbit_soon():
    """The RabbitMQ cluster of the last section, booting from the autoscale bursts on (they mostly wait)."""
    with testing.booting(**queues.RABBIT) as r:
        yield r


@pytest.fixture(scope="module")
def bursts(cluster, rabbit_soon):
    return {"auto": queues.burst(cluster, "auto"), "fixed": queues.burst(cluster, "mixed")}


# ----------------------------------------------------------------------------- segregation
def test_every_task_is_recorded_by_the_worker_that_ran_it(layouts):
    for layout, m in layouts.items():
        records = m.meta["records"]
        assert len(records) == m.meta["longs"] + m.meta["shorts"], layout
        assert all(r["received"] is not None and r["received"] <= r["start"] + 0.01 for r in records), layout
        assert {r["worker"] for r in records} <= set(m.meta["slots"]), layout
    split = layouts["split"].meta["records"]
    assert {r["worker"] for r in split if r["tag"].startswith("L")} == {"long"}
    assert {r["worker"] for r in split if r["tag"].startswith("s")} == {"short"}


def test_a_queue_per_class_cuts_short_task_latency(layouts):
    queues.short_tasks_stop_waiting(Comparison(layouts["shared"], layouts["split"]))


def test_queues_claim_fails_without_the_fix_one_queue(layouts):
    with pytest.raises(AssertionError, match="no short task"):
        queues.short_tasks_stop_waiting(Comparison(layouts["shared"], layouts["shared"]))


def test_a_dedicated_queue_strands_capacity(layouts):
    queues.idle_queue_strands_capacity(layouts["split"])
    assert layouts["split"].meta["long_makespan"] > layouts["shared"].meta["long_makespan"]


def test_queues_claim_fails_without_the_fix_no_idle_capacity_in_one_queue(layouts):
    with pytest.raises(AssertionError, match="idled while long tasks waited"):
        queues.idle_queue_strands_capacity(layouts["shared"])


def test_fair_is_the_default(layouts):
    queues.fair_is_the_default(layouts["shared"], layouts["fair"])


def test_queues_claim_fails_without_the_fix_fair_check_sees_a_real_difference(layouts):
    """The noise band is not so wide that it would call a real change noise."""
    split = layouts["split"]
    real = type(split)(split.label, split.metric, split.unit, split.values, stat=split.stat,
                       meta={**split.meta, "strategy": "fair"})
    with pytest.raises(AssertionError, match="within noise"):
        queues.fair_is_the_default(layouts["shared"], real)


# ----------------------------------------------------------------------------- prefetch
def test_default_prefetch_hoards_and_the_snapshot_shows_it(prefetch):
    hoard = prefetch["default"].meta
    held = {w: s["reserved"] for w, s in hoard["snapshot"].items()}
    assert any(held.values()), hoard["snapshot"]  # one worker held tasks it had not started...
    assert any(not s["active"] and not s["reserved"] for s in hoard["snapshot"].values()), hoard["snapshot"]
    assert max(hoard["longs_per_worker"].values()) > hoard["pairs"] / 2  # ...and most of the long ones


@pytest.mark.parametrize("fix", ["disabled", "late"])
def test_a_prefetch_fix_shortens_the_batch_and_ends_hoarding(prefetch, fix):
    comparison = Comparison(prefetch["default"], prefetch[fix])
    queues.prefetch_fix_shortens_makespan(comparison)
    queues.no_hoarding(comparison)
    assert all(prefetch[fix].meta["longs_per_worker"].values())  # both workers ran long tasks


def test_queues_claim_fails_without_the_fix_makespan(prefetch):
    with pytest.raises(AssertionError, match="improvement factor"):
        queues.prefetch_fix_shortens_makespan(Comparison(prefetch["default"], prefetch["default"]))


def test_queues_claim_fails_without_the_fix_hoarding(prefetch):
    with pytest.raises(AssertionError, match="no process idled"):
        queues.no_hoarding(Comparison(prefetch["default"], prefetch["default"]))


# ----------------------------------------------------------------------------- autoscale
def test_autoscale_follows_the_load(bursts):
    queues.autoscale_follows_the_load(bursts["auto"])
    assert len(bursts["auto"].meta["pids"]) > 1  # the burst really ran on several processes


def test_queues_claim_fails_without_the_fix_fixed_pool(bursts):
    with pytest.raises(AssertionError, match="grew to its maximum"):
        queues.autoscale_follows_the_load(bursts["fixed"])


# ----------------------------------------------------------------------------- prefetch on RabbitMQ
@pytest.fixture(scope="module")
def rabbit_prefetch(rabbit_soon):
    """The two prefetch fixes on a cluster whose broker is RabbitMQ (AMQP basic.qos)."""
    with rabbit_soon.start() as c:
        yield {mode: queues.prefetch(c, mode) for mode in ("disabled", "late")}


def test_disable_prefetch_is_ignored_on_rabbitmq(rabbit_prefetch):
    m = rabbit_prefetch["disabled"]
    assert m.meta["broker"] == "rabbitmq"
    queues.disable_prefetch_is_redis_only(m)
    assert set(m.meta["prefetch_count"].values()) == {8}  # multiplier 4 x 2 processes, as without the flag


def test_queues_claim_fails_without_the_fix_disable_prefetch_works_on_redis(prefetch):
    """The same check on the Redis run, where the flag does what it says: no hoarding, no warning."""
    assert prefetch["disabled"].meta["broker"] == "redis"
    with pytest.raises(AssertionError, match="idled while the other worker hoarded"):
        queues.disable_prefetch_is_redis_only(prefetch["disabled"])


def test_acks_late_and_multiplier_one_ends_hoarding_on_rabbitmq_too(rabbit_prefetch):
    comparison = Comparison(rabbit_prefetch["disabled"], rabbit_prefetch["late"])
    queues.prefetch_fix_shortens_makespan(comparison)
    queues.no_hoarding(comparison)
    assert set(rabbit_prefetch["late"].meta["prefetch_count"].values()) == {2}  # 1 x 2 processes
