"""Lesson 07's claims: the seeded suite at every level, on the kit's plugin cluster.

The matrix runs the seeded suite (``labkit/lessons/_testing_suite``) six
times in this process with ``pytest.main``; levels 4–6 get their clusters
from labkit's pytest plugin in that inner session (level 4 reuses this
module's ``labkit_cluster``, which has the same options).
"""

from __future__ import annotations

import dataclasses

import pytest

from labkit.lessons import testing
from labkit.measure import Comparison

pytestmark = [pytest.mark.cluster, pytest.mark.labkit(**testing.CLUSTER)]

JOBS = 8  # jobs sent at once by the concurrency tests
STEPS = (1, 4)  # the ramp's smallest meaningful shape: never at 1 job at a time, most reports corrupted at 4


@pytest.fixture(scope="module")
def levels(labkit_cluster) -> dict:
    return testing.matrix(labkit_cluster, jobs=JOBS, skew=60, steps=STEPS)


def test_testing_matrix_shape(levels):
    assert sorted(levels) == [1, 2, 3, 4, 5, 6]
    verdicts = {n: m.meta["verdicts"] for n, m in levels.items()}
    assert all(v != "false alarm" for vs in verdicts.values() for v in vs.values()), verdicts
    assert levels[1].value == 0, verdicts[1]  # calling the function catches none of them
    caught = {n: {b for b, v in vs.items() if v == "caught"} for n, vs in verdicts.items()}
    assert caught[2] <= caught[3] <= caught[4] <= caught[5], caught  # each level at least as strict as the last
    assert "clock" in caught[5] and "clock" not in caught[4], caught


def test_testing_the_ladder_catches_every_bug(levels):
    testing.ladder_catches_every_bug(testing.versus_unit_tests(levels))


def test_testing_claim_fails_without_the_fix(levels):
    unit = testing.versus_unit_tests(levels)
    with pytest.raises(AssertionError, match="claim does not hold"):
        testing.ladder_catches_every_bug(Comparison(unit.before, unit.before, better="higher"))


def test_testing_eager_passes_what_a_worker_fails(levels):
    testing.eager_passes_what_a_worker_fails(testing.eager_versus_worker(levels))


def test_testing_claim_fails_without_the_fix_eager(levels):
    with pytest.raises(AssertionError, match="claim does not hold"):
        testing.eager_passes_what_a_worker_fails(Comparison(levels[2], levels[2], better="higher"))


def test_testing_ramp_exposes_the_race(levels):
    testing.ramp_exposes_the_race(levels[6])
    assert levels[6].meta["ramp"][1]["extra_emails"] == 0


def test_testing_claim_fails_without_the_fix_ramp(levels):
    """The "before" is the ramp's own first step, measured in the same run: one job at a time."""
    ramp = levels[6]
    one_job_at_a_time = dataclasses.replace(ramp, meta={**ramp.meta, "steps": [1], "ramp": {1: ramp.meta["ramp"][1]}})
    with pytest.raises(AssertionError, match="claim does not hold"):
        testing.ramp_exposes_the_race(one_job_at_a_time)
