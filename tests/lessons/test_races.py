"""Lesson 08's claims on a real cluster, each with a negative control on the "before".

One run of every experiment per module (``runs``); the tests only judge it.
"""

from __future__ import annotations

import pytest

from labkit import LocalCluster
from labkit.lessons import races
from labkit.measure import Comparison

pytestmark = pytest.mark.cluster  # every test here starts real processes

N_FILES, N_REPORTS = 100, 200


@pytest.fixture(scope="module")
def runs():
    with LocalCluster(**races.CLUSTER, reuse=False) as c:
        out = {
            "naive": races.run_producers(c, N_FILES),
            "claims": races.run_producers(c, N_FILES, claim=True),
            "idempotent": races.run_producers(c, N_FILES, idempotent=True),
            "both": races.run_producers(c, N_FILES, claim=True, idempotent=True),
        }
        for build in races.BUILDS:
            out[build] = races.reports(c, N_REPORTS, build=build)
        for how in ("crash", "duplicate"):
            out[how] = races.compare_redelivery(c, how)
        yield out


def _same(m, title="fix switched off"):
    """The negative control's input: the "before" in both places of a comparison."""
    return Comparison(m, m, better="lower", title=title)


# ----------------------------------------------------------------------------- race 1


def test_overlapping_producers_import_files_twice(runs):
    races.overlapping_producers_import_twice(runs["naive"])


def test_races_claim_fails_without_the_fix_overlap_not_seen_with_claims(runs):
    # the pitfall claim, run where the pitfall is switched off (claiming producers)
    with pytest.raises(AssertionError, match="enqueue more messages"):
        races.overlapping_producers_import_twice(runs["claims"])


def test_claims_enqueue_each_file_once(runs):
    races.claims_enqueue_each_file_once(Comparison(runs["naive"], runs["claims"]))
    assert runs["claims"].meta["enqueued"] == N_FILES


def test_races_claim_fails_without_the_fix_claims(runs):
    with pytest.raises(AssertionError, match="exactly once"):
        races.claims_enqueue_each_file_once(_same(runs["naive"]))


def test_idempotent_consumer_fed_real_duplicates_inserts_rows_once(runs):
    races.idempotent_consumer_applies_duplicates_once(runs["idempotent"])
    assert runs["idempotent"].meta["executed_twice_or_more"] > 0


def test_races_claim_fails_without_the_fix_idempotent_consumer(runs):
    # the naive consumer got the same kind of duplicates: its table shows them
    with pytest.raises(AssertionError, match="exactly once"):
        races.idempotent_consumer_applies_duplicates_once(runs["naive"])


def test_both_fixes_together(runs):
    m = runs["both"].meta
    assert runs["both"].value == 0 and m["enqueued"] == m["executions"] == N_FILES, m


# ----------------------------------------------------------------------------- race 2


def test_temp_file_per_task_stops_crosstalk(runs):
    races.temp_file_per_task_stops_crosstalk(Comparison(runs["shared"]["published"], runs["private"]["published"]))


def test_races_claim_fails_without_the_fix_temp_file(runs):
    with pytest.raises(AssertionError, match="publishes every report right"):
        races.temp_file_per_task_stops_crosstalk(_same(runs["shared"]["published"]))


def test_atomic_publish_stops_torn_reads(runs):
    races.atomic_publish_stops_torn_reads(Comparison(runs["private"]["mailed"], runs["atomic"]["mailed"]))
    assert runs["atomic"]["published"].value == 0


def test_races_claim_fails_without_the_fix_os_replace(runs):
    with pytest.raises(AssertionError, match="reads every report whole"):
        races.atomic_publish_stops_torn_reads(_same(runs["private"]["mailed"]))


# ----------------------------------------------------------------------------- at least once


@pytest.mark.parametrize("how", ["crash", "duplicate"])
def test_redelivered_message_is_applied_once_only_by_the_idempotent_consumer(runs, how):
    races.idempotent_consumer_applies_redelivery_once(runs[how])
    assert runs[how].before.meta["worker_deduplicate_successful_tasks"] is True


@pytest.mark.parametrize("how", ["crash", "duplicate"])
def test_races_claim_fails_without_the_fix_redelivery(runs, how):
    with pytest.raises(AssertionError, match="applied it twice, the idempotent one once"):
        races.idempotent_consumer_applies_redelivery_once(_same(runs[how].before))
