"""Measurement, Comparison, verify and claim: the scaffold every lesson's numbers go through."""

from __future__ import annotations

import json
import math

import pytest

from labkit.measure import (
    Comparison,
    Measurement,
    claim,
    claims,
    concurrency_timeline,
    percentile,
    verify,
    windows,
)


def m(label: str, values, stat: str = "median", metric: str = "latency", unit: str = "s") -> Measurement:
    return Measurement(label, metric, unit, values, stat=stat)


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([1, 2, 3, 4, 5], 50, 3.0),
    ([1, 2, 3, 4], 50, 2.5),
    ([10], 95, 10.0),
    ([0, 10], 95, 9.5),
    ([5, 1, 3], 0, 1.0),
    ([5, 1, 3], 100, 5.0),
])
def test_percentile_interpolates_linearly(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan():
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize(("stat", "expected"), [
    ("median", 2.0), ("mean", 2.5), ("max", 5.0), ("min", 1.0), ("sum", 10.0), ("last", 2.0), ("count", 4.0),
])
def test_measurement_value_follows_its_stat(stat, expected):
    assert m("x", [1, 2, 5, 2], stat=stat).value == pytest.approx(expected)


def test_measurement_rejects_an_unknown_stat():
    with pytest.raises(ValueError, match="stat must be one of"):
        m("x", [1], stat="mode")


def test_empty_measurement_reports_nan_not_a_crash():
    empty = m("x", [])
    assert math.isnan(empty.value) and empty.n == 0 and "n/a" in empty.summary()


def test_measurement_html_is_escaped():
    assert "<script>" not in m("<script>", [1])._repr_html_()


def test_factor_lower_is_better():
    c = Comparison(m("before", [10]), m("after", [2]), better="lower")
    assert c.factor == pytest.approx(5.0)


def test_factor_higher_is_better():
    c = Comparison(m("before", [2], metric="rate", unit="/s"), m("after", [8], metric="rate", unit="/s"),
                   better="higher")
    assert c.factor == pytest.approx(4.0)


def test_factor_with_a_zero_after_is_infinite_and_zero_over_zero_is_one():
    assert Comparison(m("b", [3]), m("a", [0])).factor == math.inf
    assert Comparison(m("b", [0]), m("a", [0])).factor == 1.0


def test_comparison_refuses_different_metrics():
    with pytest.raises(ValueError, match="cannot compare"):
        Comparison(m("b", [1]), m("a", [1], unit="ms"))


def test_check_quotes_every_figure_when_it_fails():
    c = Comparison(m("before", [4]), m("after", [2]), title="latency")
    assert c.check(factor=2) is c
    with pytest.raises(AssertionError) as err:
        c.check(factor=3, after_at_most=1, before_at_least=5)
    text = str(err.value)
    assert "factor 2x < required 3x" in text and "after = 2" in text and "before = 4" in text


def test_comparison_serialises_and_renders_as_a_table():
    c = Comparison(m("before <b>", [4]), m("after", [2]))
    assert json.loads(c.to_json())["factor"] == 2.0
    assert "&lt;b&gt;" in c._repr_html_() and "before <b>" in str(c.table())


def test_verify_names_the_claim_and_figures():
    verify("holds", True)
    with pytest.raises(AssertionError, match=r"claim does not hold: x grows \(x=1.5, n=3\)"):
        verify("x grows", False, x=1.5, n=3)


def test_claims_are_found_by_their_mark():
    import types

    mod = types.ModuleType("fake_lesson")

    @claim("fewer is better")
    def fewer(before: Measurement, after: Measurement) -> None:
        verify("fewer is better", after.value < before.value)

    def helper() -> None: ...

    fewer.__module__ = helper.__module__ = "fake_lesson"
    mod.fewer, mod.helper = fewer, helper
    assert claims(mod) == {"fewer": fewer} and fewer.claim == "fewer is better"
    with pytest.raises(AssertionError):
        fewer(m("b", [1]), m("a", [2]))


def test_windows_count_events_per_bucket_from_a_start():
    assert windows([0.1, 0.2, 0.6, 1.4], 0.5, start=0.0) == [(0.0, 2), (0.5, 1), (1.0, 1)]
    assert windows([], 0.25) == []


def test_concurrency_timeline_steps_up_and_down():
    steps = concurrency_timeline([(0, 2), (1, 3)])
    assert [level for _, level in steps] == [1, 2, 1, 0]
    assert max(level for _, level in concurrency_timeline([(0, 1), (1, 2)])) == 1  # end before start at a tie


def test_checked_claims_are_logged_with_their_figures_when_asked(tmp_path, monkeypatch):
    log = tmp_path / "claims.jsonl"
    verify("not logged", True)
    monkeypatch.setenv("LABKIT_CLAIMS_LOG", str(log))
    verify("holds", True, n=3)
    with pytest.raises(AssertionError):
        Comparison(m("before", [1]), m("after", [1]), title="no gain").check(factor=2)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["claim"], r["ok"]) for r in records] == [("holds", True), ("no gain", False)]
    assert records[0]["figures"] == {"n": 3} and records[1]["figures"]["factor"] == 1.0
