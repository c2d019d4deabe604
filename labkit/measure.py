"""Measurements and comparisons: the one experiment scaffold every lesson uses.

A lesson's ``before(cluster, **params)`` and ``after(cluster, **params)`` each
return a :class:`Measurement` — a labelled list of samples from a real run
(latencies, peaks per trial, counts) plus an optional timeline for plotting.
``compare()`` pairs them in a :class:`Comparison`, which knows which
direction is better, computes the improvement factor, renders as a small
table in a notebook, and ``check()``-s a claim with a readable
``AssertionError`` (:mod:`labkit.plots` draws it). A lesson's claims are
functions marked with :func:`claim`. Nothing here invents a number: every
value comes from the run that produced it. Memory of a call in a fresh
process lives in :mod:`labkit.fresh`.
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from .table import Table, fmt

STATS = ("median", "mean", "max", "min", "sum", "p95", "last", "count")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN when empty."""
    data = sorted(values)
    if not data:
        return math.nan
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


@dataclass
class Measurement:
    """Samples of one metric from one run.

    ``stat`` names the summary that stands for the whole run (``value``):
    ``median`` for latencies, ``max`` for "peak holders over trials",
    ``sum`` for "duplicates over N files", and so on.
    """

    label: str
    metric: str
    unit: str
    values: list[float]
    stat: str = "median"
    timeline: list[tuple[float, float]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stat not in STATS:
            raise ValueError(f"stat must be one of {STATS}, not {self.stat!r}")
        self.values = [float(v) for v in self.values]
        if self.timeline is not None:
            self.timeline = [(float(t), float(v)) for t, v in self.timeline]

    @property
    def value(self) -> float:
        """The summary statistic named by ``stat``."""
        v = self.values
        if self.stat == "count":
            return float(len(v))
        if not v:
            return math.nan
        return {
            "median": lambda: statistics.median(v),
            "mean": lambda: statistics.fmean(v),
            "max": lambda: max(v),
            "min": lambda: min(v),
            "sum": lambda: math.fsum(v),
            "p95": lambda: percentile(v, 95),
            "last": lambda: v[-1],
        }[self.stat]()

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def p95(self) -> float:
        return percentile(self.values, 95)

    def percentile(self, q: float) -> float:
        return percentile(self.values, q)

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) of the samples."""
        return (min(self.values), max(self.values)) if self.values else (math.nan, math.nan)

    def summary(self) -> str:
        lo, hi = self.spread
        return f"{self.label}: {self.metric} {self.stat} = {fmt(self.value)} {self.unit} (n={self.n}, range {fmt(lo)}–{fmt(hi)})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value"] = self.value
        return d

    def __repr__(self) -> str:
        return f"<Measurement {self.summary()}>"

    def _repr_html_(self) -> str:
        lo, hi = self.spread
        return (
            f"<b>{html.escape(self.label)}</b>: {html.escape(self.metric)} "
            f"<b>{fmt(self.value)} {html.escape(self.unit)}</b> ({self.stat}; n={self.n}; range {fmt(lo)}–{fmt(hi)})"
        )


@dataclass
class Comparison:
    """A before/after pair on the same metric and workload.

    ``factor`` is how many times better "after" is than "before" in the
    direction ``better`` says (``lower``: before/after; ``higher``:
    after/before). Above 1 means the fix helped.
    """

    before: Measurement
    after: Measurement
    better: Literal["lower", "higher"] = "lower"
    title: str = ""

    def __post_init__(self) -> None:
        if self.better not in ("lower", "higher"):
            raise ValueError("better must be 'lower' or 'higher'")
        if (self.before.metric, self.before.unit) != (self.after.metric, self.after.unit):
            raise ValueError(
                f"cannot compare {self.before.metric} [{self.before.unit}] with "
                f"{self.after.metric} [{self.after.unit}]"
            )

    @property
    def metric(self) -> str:
        return self.before.metric

    @property
    def unit(self) -> str:
        return self.before.unit

    @property
    def factor(self) -> float:
        b, a = self.before.value, self.after.value
        num, den = (b, a) if self.better == "lower" else (a, b)
        if den == 0:
            return math.inf if num > 0 else 1.0
        return num / den

    def check(
        self,
        factor: float | None = None,
        *,
        after_at_most: float | None = None,
        before_at_least: float | None = None,
    ) -> Comparison:
        """Assert the claim; the message quotes every figure involved. Returns self."""
        problems = []
        if factor is not None and not self.factor >= factor:
            problems.append(f"improvement factor {fmt(self.factor)}x < required {fmt(factor)}x")
        if after_at_most is not None and not self.after.value <= after_at_most:
            problems.append(f"after = {fmt(self.after.value)} {self.unit} > allowed {fmt(after_at_most)}")
        if before_at_least is not None and not self.before.value >= before_at_least:
            problems.append(f"before = {fmt(self.before.value)} {self.unit} < expected {fmt(before_at_least)}")
        _note(self.title or self.metric, not problems, before=self.before.value, after=self.after.value,
              factor=self.factor)
        if problems:
            raise AssertionError(
                f"{self.title or self.metric}: claim does not hold: " + "; ".join(problems)
                + f"\n  {self.before.summary()}\n  {self.after.summary()}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title, "metric": self.metric, "unit": self.unit, "better": self.better,
            "factor": self.factor, "before": self.before.to_dict(), "after": self.after.to_dict(),
        }

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1, default=str)
        if path:
            with open(path, "w") as fh:
                fh.write(text)
        return text

    def __repr__(self) -> str:
        return (
            f"<Comparison {self.title or self.metric}: before {fmt(self.before.value)} -> "
            f"after {fmt(self.after.value)} {self.unit} ({fmt(self.factor)}x better, {self.better} is better)>"
        )

    def table(self) -> Table:
        """Both runs as a :class:`~labkit.table.Table` (value, stat, n, range)."""
        return Table(
            ["run", f"{self.metric} [{self.unit}]", "stat", "n", "range"],
            [[m.label, m.value, m.stat, m.n, f"{fmt(m.spread[0])}–{fmt(m.spread[1])}"]
             for m in (self.before, self.after)],
            title=f"{self.title or self.metric}: {self.after.label} is {fmt(self.factor)}× better "
                  f"than {self.before.label} ({self.better} is better)",
        )

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


CLAIMS_LOG = "LABKIT_CLAIMS_LOG"


def _note(claim: str, ok: bool, **figures: Any) -> None:
    """Append one checked claim and its figures to ``$LABKIT_CLAIMS_LOG`` (JSON lines), if set.

    This is how ``labkit preflight`` reports each claim's measured figures
    from notebooks it runs; without the variable nothing is written.
    """
    path = os.environ.get(CLAIMS_LOG)
    if not path:
        return
    record = {"claim": claim, "ok": bool(ok), "time": time.time(),
              "figures": {k: v if isinstance(v, int | float | str | bool) or v is None else repr(v)
                          for k, v in figures.items()}}
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def verify(claim: str, ok: bool, **figures: Any) -> None:
    """Assert a lesson's claim; on failure the message names the claim and every figure."""
    _note(claim, ok, **figures)
    if not ok:
        shown = ", ".join(f"{k}={fmt(v) if isinstance(v, int | float) else v}" for k, v in figures.items())
        raise AssertionError(f"claim does not hold: {claim}" + (f" ({shown})" if shown else ""))


F = TypeVar("F", bound=Callable[..., Any])


def claim(text: str) -> Callable[[F], F]:
    """Mark a lesson function as one of its claims: it raises ``AssertionError`` when the claim fails.

    A claim function takes measurements (never the cluster), derives its
    thresholds from the parameters recorded in them, and checks with
    :func:`verify` or :meth:`Comparison.check`. The decorator records
    ``text`` as ``fn.claim`` so the contract test can find every claim and
    demand a negative control for it (``test_<topic>_claim_fails_without_the_fix*``).
    """

    def mark(fn: F) -> F:
        fn.claim = text  # type: ignore[attr-defined]
        return fn

    return mark


def claims(module: Any) -> dict[str, Callable[..., Any]]:
    """The claim functions a lesson module defines, by name.

    A task (a proxy) is skipped by its type: asking it for an attribute resolves it against the
    current app, which raises NotRegistered once a closed cluster's app is the current one.
    """
    from celery.local import Proxy  # noqa: PLC0415

    return {name: obj for name, obj in vars(module).items()
            if not issubclass(type(obj), Proxy) and callable(obj) and isinstance(getattr(obj, "claim", None), str)
            and getattr(obj, "__module__", None) == module.__name__}


def timed(fn: Callable[[], Any], repeat: int = 5, *, label: str = "", metric: str = "time") -> Measurement:
    """Run ``fn`` ``repeat`` times; seconds per run (median by default)."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Measurement(label or getattr(fn, "__name__", "fn"), metric, "s", samples)


def windows(times: Iterable[float], width: float, start: float | None = None) -> list[tuple[float, int]]:
    """Count events per window of ``width`` seconds: ``[(window_start, count), ...]``."""
    ts = sorted(times)
    if not ts:
        return []
    t0 = ts[0] if start is None else start
    counts: dict[int, int] = {}
    for t in ts:
        counts[int((t - t0) // width)] = counts.get(int((t - t0) // width), 0) + 1
    last = max(counts)
    return [(t0 + i * width, counts.get(i, 0)) for i in range(last + 1)]


def concurrency_timeline(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Step timeline of how many (start, end) intervals overlap at each moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    out, level = [], 0
    for t, d in events:
        level += d
        out.append((t, level))
    return out
