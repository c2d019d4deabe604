"""Lesson 09's claims, asserted through the API on a real cluster.

One cluster (the lesson's ``CLUSTER``) and one run of each experiment per
module. Negative controls reuse the "before" runs; the hard limit's is the
same task on the solo pool, where no limit applies. Every external program a
test starts must be gone when the test ends: the lesson kills what its
"before" leaves behind, and the tests check that nothing carrying the run's
mark survives.
"""

from __future__ import annotations

import pytest

from labkit import testing
from labkit.lessons import abusive_tasks as abusive
from labkit.measure import Comparison

pytestmark = pytest.mark.cluster  # every test here starts real processes


@pytest.fixture(scope="module")
def cluster():
    with testing.cluster(**abusive.CLUSTER) as c:
        yield c


@pytest.fixture(scope="module")
def jobs(cluster):
    return abusive.run_jobs(cluster, soft=0.4, seconds=5.0)


@pytest.fixture(scope="module")
def hard(cluster):
    (slow,) = abusive.hard_limit(cluster, hard=0.6, cleanups=(0.5,))
    (ignored,) = abusive.hard_limit(cluster, hard=0.6, seconds=1.5, cleanups=(0.5,), worker="solo")
    return {"prefork": slow, "solo": ignored}


@pytest.fixture(scope="module")
def pools(cluster):
    return abusive.pools(cluster, soft=0.5, hard=1.0, seconds=2.0)


@pytest.fixture(scope="module")
def hogs(cluster):
    return abusive.compare(cluster, hog_mib=150, hog_s=1.0, shorts=12)


@pytest.fixture(scope="module")
def runaways(cluster):
    return {"uncapped": abusive.runaway(cluster, "shared", mib=400),
            "capped": abusive.runaway(cluster, "hogs", mib=400)}


@pytest.fixture(scope="module")
def hung(cluster):
    return abusive.hanging(cluster, soft=0.5)


# ----------------------------------------------------------------------------- soft limit and retry
def test_the_slides_handler_never_runs_and_the_fix_does(jobs):
    abusive.retry_handler_runs_only_in_the_fix(jobs["talk"], jobs["fixed"])
    for m in jobs.values():  # every attempt was stopped by the soft limit, none ran the job's 5 s
        assert all(0.2 < d < 2.0 for d in m.values), m.values


def test_abusive_tasks_claim_fails_without_the_fix_retry_handler(jobs):
    with pytest.raises(AssertionError, match="exactly one e-mail"):
        abusive.retry_handler_runs_only_in_the_fix(jobs["talk"], jobs["talk"])


# ----------------------------------------------------------------------------- hard limit and pools
def test_the_hard_limit_kills_the_child(hard):
    abusive.hard_limit_kills_the_child(hard["prefork"])
    assert hard["prefork"].meta["cleanup_started"]  # SIGTERM first: the `finally` did begin


def test_abusive_tasks_claim_fails_without_the_fix_no_hard_limit_on_solo(hard):
    with pytest.raises(AssertionError, match="TimeLimitExceeded"):
        abusive.hard_limit_kills_the_child(hard["solo"])
    assert hard["solo"].meta["cleanup_finished"]


def test_only_prefork_enforces_limits(pools):
    abusive.limits_hold_only_on_prefork(pools["limits"], [pools["solo"], pools["threads"]])


def test_abusive_tasks_claim_fails_without_the_fix_other_pools(pools):
    with pytest.raises(AssertionError, match="soft limit was raised"):
        abusive.limits_hold_only_on_prefork(pools["solo"], [pools["solo"], pools["threads"]])


# ----------------------------------------------------------------------------- memory
def test_a_hog_in_its_own_queue_does_not_delay_short_tasks(hogs):
    abusive.own_queue_shields_short_tasks(hogs)
    shared = hogs.before.meta
    assert shared["hog_top_mib"] > shared["limit_mib"]  # each hog went past max_memory_per_child...
    pids = {r["pid"] for r in shared["records"]}
    assert len(pids) > shared["slots"]["shared"]  # ...and its process was replaced afterwards


def test_abusive_tasks_claim_fails_without_the_fix_shared_queue(hogs):
    with pytest.raises(AssertionError, match="a quarter as long"):
        abusive.own_queue_shields_short_tasks(Comparison(hogs.before, hogs.before))


def test_max_memory_per_child_acts_after_the_task(runaways):
    abusive.max_memory_acts_after_the_task(runaways["uncapped"])


def test_abusive_tasks_claim_fails_without_the_fix_max_memory_on_capped_worker(runaways):
    with pytest.raises(AssertionError):
        abusive.max_memory_acts_after_the_task(runaways["capped"])


def test_an_address_space_cap_contains_the_runaway(runaways):
    abusive.cap_contains_the_runaway(runaways["capped"], runaways["uncapped"])


def test_abusive_tasks_claim_fails_without_the_fix_uncapped_runaway(runaways):
    with pytest.raises(AssertionError, match="MemoryError"):
        abusive.cap_contains_the_runaway(runaways["uncapped"], runaways["uncapped"])


def test_hogs_refuse_to_threaten_the_machine(cluster):
    with pytest.raises(ValueError, match="at most"):
        abusive.runaway(cluster, "hogs", mib=abusive.MAX_HOG_MIB + 1)


# ----------------------------------------------------------------------------- external programs
@pytest.fixture(scope="module")
def output():
    return abusive.compare_output_reading(20)


def test_reading_line_by_line_stays_flat(output):
    abusive.streaming_output_stays_flat(output)
    assert output.before.meta["result"] == output.after.meta["result"]  # same bytes, same lines


def test_abusive_tasks_claim_fails_without_the_fix_check_output(output):
    with pytest.raises(AssertionError, match="improvement factor"):
        abusive.streaming_output_stays_flat(Comparison(output.before, output.before))


def test_the_soft_limit_ends_the_program_only_with_the_fix(hung):
    abusive.soft_limit_ends_the_program_only_with_the_fix(hung["popen"], hung["fixed"])
    assert hung["popen"].meta["survivors"] == ["sh", "sleep"]
    assert hung["check_output"].meta["survivors"] == ["sleep"]  # it kills its child, not the child's child


def test_abusive_tasks_claim_fails_without_the_fix_popen(hung):
    with pytest.raises(AssertionError, match="nothing outlives the task"):
        abusive.soft_limit_ends_the_program_only_with_the_fix(hung["popen"], hung["popen"])


def test_no_external_program_survives_the_lesson(hung):
    for m in hung.values():
        assert m.meta["left_after_reap"] == 0, m.meta
    assert not [p for p in abusive.external_programs("a9x:") if p.is_running()]
