"""Lesson 11 (clock skew): the notebook's claims, on workers with really skewed clocks.

One cluster and one run of every experiment for the module (``lab``). The two
slow experiments (countdown tasks collected after a window, two ``celery
beat`` services waiting for the top of their minute) start first, so their
waits overlap with everything else. Each claim has a negative control: the
same check on the "before" (or, for a claim about the pitfall, on the fix).
"""

from __future__ import annotations

import psutil
import pytest

from labkit import LocalCluster
from labkit.lessons import clocks

pytestmark = pytest.mark.cluster  # every test here starts real processes

COUNTDOWN, WINDOW, N, EXPIRES = 10.0, 15.0, 6, 10.0


@pytest.fixture(scope="module")
def lab():
    with LocalCluster(**clocks.CLUSTER, reuse=False) as cluster:
        countdown = clocks.CountdownRun(cluster, countdown=COUNTDOWN, per_worker=2)
        beats = clocks.BeatRun(cluster)
        statuses = {s["name"]: s for s in cluster.status()}
        out = {
            "cluster": cluster,
            "beat_status": [statuses[service] for service, _ in beats.BEATS.values()],
            "probes": clocks.probe_clocks(cluster, ["slow30", "true", "fast30"], wait=0.3),
            "exp_fast": clocks.expires(cluster, "celery", "fast30", n=N, seconds=EXPIRES),
            "exp_true": clocks.expires(cluster, "celery", "true", n=N, seconds=EXPIRES),
            "exp_fix": clocks.expires(cluster, "deadline", "fast30", n=N, seconds=EXPIRES),
            "drift": clocks.drift_warnings(cluster, workers=("fast30", "fast10")),
            "delays": countdown.collect(WINDOW),
            "picks": beats.collect(),
            "beats_left": sorted(cluster.beats),
        }
        yield out


# ----------------------------------------------------------------------------- the kit (no claims)


def test_beats_are_services_of_the_cluster_and_go_away(lab):
    assert [s["kind"] for s in lab["beat_status"]] == ["beat", "beat"], lab["beat_status"]
    assert all(s["state"] == "running" for s in lab["beat_status"]), lab["beat_status"]
    assert lab["beats_left"] == [], "collect() removes the beats"


def test_kit_self_check_skewed_workers_read_shifted_clocks_and_wait_normally(lab):
    """Tests labkit's patch (true monotonic clock, select()-based sleep), not Celery."""
    cluster = lab["cluster"]
    for p in lab["probes"].meta["probes"]:
        assert abs(p["skew"] - p["offset"]) <= 1, p
        for kind, took in p["waits"].items():  # sleep, Event.wait, Lock.acquire(timeout), Queue.get(timeout)
            assert 0.9 <= took / p["wait"] <= 3, (p["worker"], kind, took)
    assert "FAKETIME" not in psutil.Process(cluster.redis.pid).environ()
    assert "FAKETIME" in psutil.Process(cluster.workers["fast30"].pid).environ()
    assert any("clock probe" in line for line in cluster.logs("fast30", 200).splitlines())


def test_celery_warns_about_drift_above_16_s_only(lab):
    found = lab["drift"].meta
    assert abs(found["drift"]["fast30"] - 30) <= 1.5 and abs(found["drift"]["fast10"] - 10) <= 1.5, found
    text = " ".join(found["warnings"])
    assert "Substantial drift" in text and "fast30@" in text and "fast10@" not in text, found


# ----------------------------------------------------------------------------- expires


def test_expires_follows_the_workers_clock(lab):
    clocks.expires_follows_the_workers_clock(lab["exp_fast"], lab["exp_true"])


def test_clocks_claim_fails_without_the_fix_expires_pitfall_absent(lab):
    # the pitfall claim, run on the fix: the deadline checked against Redis TIME discards nothing
    with pytest.raises(AssertionError, match="discards every task"):
        clocks.expires_follows_the_workers_clock(lab["exp_fix"], lab["exp_true"])


def test_deadline_against_redis_time_discards_none(lab):
    clocks.deadline_against_redis_time_discards_none(lab["exp_fast"], lab["exp_fix"])


def test_clocks_claim_fails_without_the_fix_deadline(lab):
    with pytest.raises(AssertionError, match="discarded none"):
        clocks.deadline_against_redis_time_discards_none(lab["exp_fast"], lab["exp_fast"])


# ----------------------------------------------------------------------------- countdown


def test_countdown_follows_the_workers_clock(lab):
    clocks.countdown_follows_the_workers_clock(lab["delays"]["countdown"])


def test_clocks_claim_fails_without_the_fix_countdown_pitfall_absent(lab):
    with pytest.raises(AssertionError, match="matches countdown − skew"):
        clocks.countdown_follows_the_workers_clock(lab["delays"]["producer"])


def test_producer_held_delay_is_on_time(lab):
    clocks.producer_held_delay_is_on_time(lab["delays"]["producer"])


def test_clocks_claim_fails_without_the_fix_producer_delay(lab):
    with pytest.raises(AssertionError, match="whatever the worker's skew"):
        clocks.producer_held_delay_is_on_time(lab["delays"]["countdown"])


# ----------------------------------------------------------------------------- find_reports at the boundary


def test_workers_behind_beat_pick_an_earlier_period(lab):
    clocks.workers_behind_beat_pick_an_earlier_period(lab["picks"]["talk"])


def test_clocks_claim_fails_without_the_fix_talk_rule_on_the_fix(lab):
    with pytest.raises(AssertionError, match="picked an earlier minute"):
        clocks.workers_behind_beat_pick_an_earlier_period(lab["picks"]["message"])


def test_period_in_the_message_is_always_right(lab):
    clocks.period_in_the_message_is_always_right(lab["picks"]["message"])


def test_clocks_claim_fails_without_the_fix_message(lab):
    with pytest.raises(AssertionError, match="no wrong pick"):
        clocks.period_in_the_message_is_always_right(lab["picks"]["talk"])


def test_redis_time_makes_workers_agree(lab):
    clocks.redis_time_makes_workers_agree(lab["picks"]["redis"])


def test_clocks_claim_fails_without_the_fix_redis_time(lab):
    with pytest.raises(AssertionError, match="one minute for all workers"):
        clocks.redis_time_makes_workers_agree(lab["picks"]["talk"])


def test_beats_fire_off_the_true_minute_by_their_skew(lab):
    """An illustration in the notebook (we chose the skews); here a regression check of the mechanism."""
    fast, slow = lab["picks"]["fast beat"], lab["picks"]["slow beat"]
    assert fast.value < 0 < slow.value, (fast, slow)
    for m in (fast, slow):
        assert abs(m.value + m.meta["skew"]) <= 2, (m.label, m.value, m.meta)
