"""Small pieces of the kit: table, polling, status, number formatting."""

from __future__ import annotations

import json
import time

import pytest

from labkit.client import short_name
from labkit.poll import PollTimeout, poll_until
from labkit.status import Status
from labkit.table import Table, fmt


def test_table_text_aligns_numbers_right():
    text = str(Table(["run", "peak"], [["before", 12], ["after", 3]], title="peak holders"))
    assert text.splitlines() == ["peak holders", "run     peak", "------  ----", "before    12", "after      3"]


def test_table_html_escapes_every_cell():
    html = Table(["<b>"], [["<script>alert(1)</script>"]])._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;" in html


def test_table_rejects_ragged_rows_and_builds_from_dicts():
    with pytest.raises(ValueError, match="2 cells for 1 columns"):
        Table(["a"], [[1, 2]])
    t = Table.from_dicts([{"a": 1, "b": 2.5}, {"a": 3}])
    assert t.columns == ["a", "b"] and t.rows == [[1, 2.5], [3, ""]]


@pytest.mark.parametrize(("x", "text"), [(3.0, "3"), (0.123456, "0.123"), (float("nan"), "n/a"),
                                          (float("inf"), "∞"), (2e7, "2e+07"), (None, "n/a")])
def test_fmt(x, text):
    assert fmt(x) == text


def test_poll_until_returns_the_first_truthy_value():
    calls = iter([0, None, "", 7])
    assert poll_until(lambda: next(calls), 1.0, 0) == 7


def test_poll_until_gives_up_with_the_last_value_or_raises_when_told_what():
    t0 = time.monotonic()
    assert poll_until(lambda: 0, 0.05, 0.01) == 0
    assert 0.04 <= time.monotonic() - t0 < 1.0
    with pytest.raises(PollTimeout, match="waiting for the moon"):
        poll_until(lambda: False, 0.01, what="the moon")


def test_poll_until_stops_when_not_alive():
    t0 = time.monotonic()
    assert poll_until(lambda: False, 10, 0.01, alive=lambda: False) is False
    assert time.monotonic() - t0 < 1.0


def test_status_is_a_string_for_json_and_comparisons():
    assert Status.RUNNING == "running" and f"{Status.PAUSED}" == "paused"
    assert json.dumps({"s": Status.KILLED}) == '{"s": "killed"}'
    assert Status("exited") is Status.EXITED
    assert Status.PAUSED.alive and not Status.STOPPED.alive


def test_short_name():
    assert short_name("w1@lk3f2a") == "w1" and short_name("w1") == "w1"
