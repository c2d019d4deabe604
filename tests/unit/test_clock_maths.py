"""Lesson 11's time arithmetic and claim logic, without a cluster: beat skews, periods, the countdown model."""

from __future__ import annotations

import math
import random

import pytest

from labkit.faketime import faketime_spec
from labkit.lessons import clocks
from labkit.measure import Measurement


def _apart(a: float, b: float) -> float:
    d = (a - b) % 60
    return min(d, 60 - d)


@pytest.mark.parametrize("direction", [1, -1])
def test_beat_skew_reaches_a_minute_boundary_within_the_lead_window_at_any_time(direction):
    rng = random.Random(11)
    for _ in range(800):
        start = 1.7e9 + rng.random() * 86400
        skew, lead = clocks.beat_skew(start, direction)
        assert 6 <= lead <= 17
        assert 12 <= direction * skew <= 115, "a realistic skew: tens of seconds, under two minutes"
        assert _apart(start + lead + skew, 0) < 1e-3, "beat's clock reads hh:mm:00 after `lead` s"
        assert _apart(skew, 0) >= 5 - 1e-6, "beat never fires within 5 s of a true minute boundary"
        for worker in clocks.SKEWS:  # no worker reads within 3 s of beat's boundary
            assert _apart(skew, worker) >= 3 - 1e-6, (skew, worker)


def test_beat_skew_prefers_the_wanted_size_and_checks_its_arguments():
    start = 1_700_000_000.0  # 22:13:20 UTC: 40 s to the next minute
    skew, lead = clocks.beat_skew(start, +1, want=25)
    assert 12 <= skew <= 40
    with pytest.raises(ValueError, match="direction"):
        clocks.beat_skew(start, 0)
    with pytest.raises(ValueError, match="no skew"):
        clocks.beat_skew(start, +1, least=12, most=13, leads=(6.0, 6.5))


def test_period_key_and_offsets():
    ts = 1_700_000_000.0
    key = clocks.period_key(ts)
    assert len(key) == 6 and key.endswith("00")
    assert clocks.period_offset(clocks.period_key(ts - 60), key) == -1
    assert clocks.period_offset(clocks.period_key(ts + 120), key) == 2
    assert clocks.period_offset("000000", "235900") == 1, "wraps at midnight"
    assert clocks.period_offset("235900", "000000") == -1


def test_expected_delay_is_countdown_minus_skew_never_negative():
    assert clocks.expected_delay(10, 0) == 10
    assert clocks.expected_delay(10, 4) == 6
    assert clocks.expected_delay(10, 30) == 0
    assert clocks.expected_delay(10, -30) == 40


def test_faketime_spec_and_worker_names():
    assert faketime_spec(30) == "+30s" and faketime_spec(-12.25) == "-12.25s"
    assert [clocks.worker_for(s) for s in clocks.SKEWS] == ["slow30", "slow10", "true", "fast10", "fast30"]
    assert {w["name"]: w["clock_offset"] for w in clocks.CLUSTER["workers"]}["fast30"] == 30


# ----------------------------------------------------------------------------- claims on made-up runs


def _countdown(how: str, delays: dict[float, float], countdown: float = 10, window: float = 15) -> Measurement:
    skews = list(delays)
    return Measurement(how, "delay", "s", [delays[s] for s in skews], meta={
        "how": how, "skews": skews, "countdown": countdown, "window": window})


def test_countdown_claims_accept_the_model_and_reject_the_other_way():
    model = _countdown("countdown", {s: clocks.expected_delay(10, s) + 0.05 for s in clocks.SKEWS})
    model.values = [d if d <= 15 else math.inf for d in model.values]
    flat = _countdown("producer", {s: 10.05 for s in clocks.SKEWS})
    clocks.countdown_follows_the_workers_clock(model)
    clocks.producer_held_delay_is_on_time(flat)
    with pytest.raises(AssertionError):
        clocks.countdown_follows_the_workers_clock(flat)
    with pytest.raises(AssertionError):
        clocks.producer_held_delay_is_on_time(model)


def test_countdown_claim_needs_parameters_that_show_both_sides():
    # a countdown longer than the window shows no task on time and none late: nothing to judge
    m = _countdown("countdown", {s: math.inf for s in clocks.SKEWS}, countdown=40, window=15)
    with pytest.raises(AssertionError, match="due early"):
        clocks.countdown_follows_the_workers_clock(m)


def _picks(variant: str, offsets: dict[tuple[str, float, float], int]) -> Measurement:
    rows = [{"beat": b, "beat_skew": bs, "worker": f"w{ws:+g}", "worker_skew": ws, "rel": ws - bs,
             "x": ws - bs + 0.05, "lag": 0.05, "intended": "120000",
             "picked": f"12{off:02d}00" if off >= 0 else f"11{60 + off:02d}00", "offset": off}
            for (b, bs, ws), off in offsets.items()]
    return Measurement(variant, "wrong picks", "picks", [1.0 if r["offset"] else 0.0 for r in rows], stat="sum",
                       meta={"picks": rows, "beats": {"fast": 25, "slow": -25}, "expected_picks": len(rows)})


def _truth(rule) -> dict[tuple[str, float, float], int]:
    return {(b, bs, ws): rule(ws - bs) for b, bs in (("fast", 25), ("slow", -25)) for ws in clocks.SKEWS}


def test_pick_claims_on_made_up_picks():
    talk = _picks("talk", _truth(lambda rel: math.floor((rel + 0.05) / 60)))
    message = _picks("message", _truth(lambda rel: 0))
    clocks.workers_behind_beat_pick_an_earlier_period(talk)
    clocks.period_in_the_message_is_always_right(message)
    with pytest.raises(AssertionError, match="earlier minute"):
        clocks.workers_behind_beat_pick_an_earlier_period(message)
    with pytest.raises(AssertionError, match="no wrong pick"):
        clocks.period_in_the_message_is_always_right(talk)
    with pytest.raises(AssertionError, match="one minute for all workers"):
        clocks.redis_time_makes_workers_agree(talk)
    clocks.redis_time_makes_workers_agree(_picks("redis", _truth(lambda rel: 0)))


def test_pick_claims_notice_a_missing_pick():
    talk = _picks("talk", _truth(lambda rel: math.floor((rel + 0.05) / 60)))
    talk.meta["expected_picks"] += 1
    with pytest.raises(AssertionError, match="reached every worker"):
        clocks.workers_behind_beat_pick_an_earlier_period(talk)
