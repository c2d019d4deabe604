"""Lesson 13's pure parts: the peak counter, the chance bounds, the flaky service (a thread, no process)."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest

from labkit.lessons import herd
from labkit.measure import Measurement


def test_sliding_peak_is_not_tied_to_a_grid():
    assert herd.sliding_peak([0.2, 0.3, 0.4, 1.0], 0.25) == 3  # 0.2..0.4 straddle the 0.25 grid line
    assert herd.sliding_peak([0.0, 0.25, 0.5], 0.25) == 1
    assert herd.sliding_peak([], 5) == 0


def test_chance_peak_grows_with_n_but_stays_below_a_herd():
    bounds = [herd.chance_peak(n) for n in (20, 60, 100, 128)]
    assert bounds == sorted(bounds)
    assert all(b < n for b, n in zip(bounds, (20, 60, 100, 128), strict=True))
    assert herd.chance_peak(60) > 60 * (herd.WINDOW + 1) / herd.TALK_DELAYS  # above the mean share


def test_chance_peak_is_rarely_exceeded_by_simulated_jitter():
    import random

    rng = random.Random(13)
    n = 20  # the smallest herd the lesson accepts: the hardest case for the bound
    worst = max(herd.sliding_peak([rng.randint(30, 60) + rng.random() * 0.9 for _ in range(n)], herd.WINDOW)
                for _ in range(3000))
    assert worst <= herd.chance_peak(n)


def test_fewest_before_floor_is_zero_for_tiny_herds_and_about_a_third_for_big_ones():
    assert herd.fewest_before_floor(5) == 0
    assert 0.2 * 100 < herd.fewest_before_floor(100) < 0.5 * 100


def _arrivals(strategy: str, arrivals: list[float]) -> Measurement:
    return Measurement(strategy, "peak", "retries", [herd.sliding_peak(arrivals, herd.WINDOW)], stat="max",
                       meta={"n": len(arrivals), "arrivals": arrivals,
                             "before_floor": sum(a < herd.FLOOR for a in arrivals)})


def test_jitter_claim_reads_its_threshold_from_n():
    herd_of_40 = _arrivals("fixed", [30.0 + i * 0.01 for i in range(40)])
    spread = _arrivals("talk", [30.0 + (i % 31) for i in range(40)])
    herd.jitter_spreads_the_herd(herd_of_40, spread)
    with pytest.raises(AssertionError, match="chance_bound="):
        herd.jitter_spreads_the_herd(herd_of_40, herd_of_40)


def test_retries_refuses_a_herd_too_small_to_judge():
    with pytest.raises(ValueError, match="too small"):
        herd.retries(None, "fixed", n=5)  # type: ignore[arg-type]


def test_flaky_service_fails_everyone_at_once():
    statuses = []

    def call(i):
        try:
            urllib.request.urlopen(f"{url}/call?tag=t{i}&attempt=0", timeout=10)
            statuses.append(200)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)

    with herd.FlakyService(expected=5) as service:
        url = service.url
        threads = [threading.Thread(target=call, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        urllib.request.urlopen(f"{url}/call?tag=t0&attempt=1", timeout=10)
        ends = [c.end for c in service.snapshot() if c.attempt == 0]
        assert statuses == [503] * 5
        assert service.together
        assert max(ends) - min(ends) < 0.2  # answered together, not one by one
        assert len(service.arrivals()) == 1
