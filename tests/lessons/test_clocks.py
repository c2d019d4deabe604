"""Lesson 11 (clock skew): the notebook's claims, on workers with really skewed clocks.

One cluster for the module. The two slow experiments (countdown tasks that
wait up to 15 s, two ``celery beat`` processes waiting for a minute
boundary) start with it and are collected by the last tests, so their waits
overlap with everything else.
"""

from __future__ import annotations

import math

import psutil
import pytest

from labkit import WorkerSpec
from labkit.faketime import faketime_spec, skew_environment
from labkit.lessons import clocks

pytestmark = pytest.mark.cluster  # every test here starts real processes

COUNTDOWN = 10.0
WINDOW = 15.0
N = 6


@pytest.fixture(scope="module")
def lab():
    cluster = clocks.start_cluster(skews=(-30, 0, 10, 30), reuse=False)
    try:
        countdown = clocks.start_countdown(cluster, countdown=COUNTDOWN, per_worker=2, skews=(-30, 0, 30))
        beats = clocks.start_beats(cluster)
        yield {"cluster": cluster, "countdown": countdown, "beats": beats}
        beats.stop()
    finally:
        cluster.close()


def test_clock_offset_option_is_validated():
    assert WorkerSpec(name="x", clock_offset=30).clock_offset == 30.0
    for bad in (float("nan"), float("inf"), "30", True):
        with pytest.raises(ValueError):
            WorkerSpec(name="x", clock_offset=bad)
    assert skew_environment(0) == {}
    assert faketime_spec(30) == "+30s" and faketime_spec(-12.25) == "-12.25s"


def test_skewed_worker_reads_shifted_wall_clock_and_waits_normally(lab):
    cluster = lab["cluster"]
    probes = {p["worker"]: p for p in clocks.probe_clocks(cluster, ["slow30", "true", "fast30"], wait=0.4)}
    assert abs(probes["fast30"]["skew"] - 30) <= 1, probes["fast30"]
    assert abs(probes["slow30"]["skew"] + 30) <= 1, probes["slow30"]
    assert abs(probes["true"]["skew"]) <= 1, probes["true"]
    for p in probes.values():  # sleep, Event.wait, Lock.acquire(timeout), Queue.get(timeout)
        for kind, took in p["waits"].items():
            assert 0.9 <= took / p["wait"] <= 3, (p["worker"], kind, took)
    # the shift reaches the worker's logger too, and only the workers are skewed
    assert any("clock probe" in line for line in cluster.logs("fast30", 100).splitlines())
    for service in (cluster.redis,):
        assert "FAKETIME" not in psutil.Process(service.pid).environ()
    assert "FAKETIME" in psutil.Process(cluster.workers["fast30"].pid).environ()


def test_skewed_worker_stays_healthy_through_sleeps_and_timeouts(lab):
    cluster = lab["cluster"]
    for _ in range(3):  # several tasks in a row on each skewed worker: no hang, no EINVAL
        probes = clocks.probe_clocks(cluster, ["fast30", "slow30"], wait=0.2)
        assert all(0.9 <= t / 0.2 <= 3 for p in probes for t in p["waits"].values()), probes
    assert all(cluster.ping(timeout=2).values())
    assert cluster.children("fast30"), "the pool child survived"


def test_find_reports_with_the_workers_clock_picks_wrong_hours(lab):
    cluster = lab["cluster"]
    talk = clocks.reports(cluster, "talk", n=N)
    message = clocks.reports(cluster, "message", n=N)
    redis_time = clocks.reports(cluster, "redis", n=N)
    assert talk.meta["wrong"] == {"true": 0, "nexthour": N}, talk.meta
    assert message.value == 0 and redis_time.value == 0, (message.meta, redis_time.meta)


def test_expires_on_a_fast_worker_discards_unexpired_tasks(lab):
    cluster = lab["cluster"]
    fast = clocks.expires(cluster, "celery", "fast30", n=N, seconds=10)
    true = clocks.expires(cluster, "celery", "true", n=N, seconds=10)
    fix = clocks.expires(cluster, "deadline", "fast30", n=N, seconds=10)
    assert fast.value == N and fast.meta["ran"] == 0, fast.meta
    assert true.value == 0 and true.meta["ran"] == N, true.meta
    assert fix.value == 0 and fix.meta["ran"] == N, fix.meta


def test_celery_warns_about_substantial_drift_above_16_s_only(lab):
    cluster = lab["cluster"]
    found = clocks.drift_warnings(cluster, workers=("fast30", "fast10"))
    assert abs(found["drift"]["fast30"] - 30) <= 1.5 and abs(found["drift"]["fast10"] - 10) <= 1.5, found
    text = " ".join(found["warnings"])
    assert "Substantial drift" in text and "fast30@" in text and "fast10@" not in text, found


def test_countdown_is_an_absolute_eta_compared_with_the_workers_clock(lab):
    delays = lab["countdown"].collect(WINDOW)
    assert max(delays[30]) < 0.2 * COUNTDOWN, delays  # 30 s ahead: at once
    assert all(0.9 <= d / COUNTDOWN <= 1.15 for d in delays[0]), delays  # true clock: on time
    assert all(d == math.inf for d in delays[-30]), delays  # 30 s behind: not within 1.5 x countdown


def test_beat_on_a_skewed_clock_fires_off_the_minute_by_its_skew(lab):
    beats = lab["beats"]
    beats.collect()
    errors = beats.errors()
    assert all(p.poll() is not None for p in beats.procs.values()), "beat processes were stopped"
    fast, slow = errors["fast beat"], errors["slow beat"]
    assert fast < 0 < slow, errors  # early, late
    for name, err in errors.items():
        assert abs(err + beats.skews[name]) <= 2, (name, err, beats.skews)
