"""One visual language for every lesson: before is warm, after is cool.

Every function takes an optional matplotlib ``ax`` and returns it, so lessons
can compose panels with :func:`panels`. matplotlib is imported inside the
functions only: workers import lesson modules, and must not pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .measure import Comparison, Measurement
from .table import fmt

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

BEFORE = "#d1495b"  # the pitfall
AFTER = "#00798c"  # the fix
NEUTRAL = ["#edae49", "#66a182", "#2e4057", "#8d96a3", "#6a4c93", "#f4a259"]


def colour_for(label: str, i: int = 0) -> str:
    """Before-ish labels get BEFORE, after-ish labels AFTER, others a neutral colour."""
    low = label.lower()
    if low.startswith(("before", "naive", "pitfall", "unprotected", "talk")):
        return BEFORE
    if low.startswith(("after", "fix", "fixed", "protected")):
        return AFTER
    return NEUTRAL[i % len(NEUTRAL)]


def style(ax: Axes, title: str = "", ylabel: str = "", xlabel: str = "") -> Axes:
    """Title left, light y grid, no top/right spines: the kit's look."""
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    return ax


def panels(n: int = 2, width: float = 5.0, height: float = 3.4):
    """A row of ``n`` axes: ``fig, axes = panels(2)``."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False, layout="constrained")
    return fig, list(axes[0])


def axis(ax=None):
    """``ax``, or a fresh single-panel figure's axes when None."""
    if ax is None:
        _, (ax,) = panels(1)
    return ax


def bars(measurements: Sequence[Measurement], ax=None, *, title: str = "", log: bool = False,
         show_points: bool = True) -> Axes:
    """One bar per measurement (its ``value``), with the individual samples dotted on top."""
    ax = axis(ax)
    labels = [m.label for m in measurements]
    values = [m.value for m in measurements]
    colours = [colour_for(m.label, i) for i, m in enumerate(measurements)]
    ax.bar(range(len(values)), values, color=colours, alpha=0.85)
    if show_points:
        for i, m in enumerate(measurements):
            if 1 < m.n <= 400:
                jitter = [i + ((k % 7) - 3) * 0.04 for k in range(m.n)]
                ax.scatter(jitter, m.values, s=8, color="black", alpha=0.45, zorder=3)
    for i, (m, v) in enumerate(zip(measurements, values, strict=True)):
        top = max([v, *m.values]) if show_points and 1 < m.n <= 400 else v
        ax.annotate(fmt(v), (i, top), ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(values)), labels, rotation=0 if len(values) <= 3 else 20, ha="center" if len(values) <= 3 else "right")
    if log:
        ax.set_yscale("log")
    m0 = measurements[0]
    return style(ax, title or m0.metric, f"{m0.metric} [{m0.unit}] ({m0.stat})")


def comparison_bars(comparison: Comparison, ax=None, *, log: bool = False) -> Axes:
    """Before vs after as two bars, titled with the improvement factor."""
    ax = bars([comparison.before, comparison.after], ax, log=log)
    title = comparison.title or comparison.metric
    return style(ax, f"{title}: {fmt(comparison.factor)}× better", ax.get_ylabel())


def timelines(measurements: Sequence[Measurement], ax=None, *, title: str = "", step: bool = True,
              xlabel: str = "time [s]", limit: float | None = None) -> Axes:
    """Each measurement's ``timeline`` as a line (a step line for counts)."""
    ax = axis(ax)
    for i, m in enumerate(measurements):
        if not m.timeline:
            continue
        ts, vs = zip(*m.timeline, strict=True)
        draw = ax.step if step else ax.plot
        kwargs = {"where": "post"} if step else {}
        draw(ts, vs, label=m.label, color=colour_for(m.label, i), lw=1.8, **kwargs)
    if limit is not None:
        ax.axhline(limit, ls="--", color="grey", lw=1, label=f"limit {fmt(limit)}")
    ax.legend(frameon=False, fontsize=9)
    m0 = measurements[0]
    return style(ax, title or f"{m0.metric} over time", f"{m0.metric} [{m0.unit}]", xlabel)


def histogram(measurements: Sequence[Measurement], ax=None, *, bins=30, title: str = "",
              xlabel: str | None = None) -> Axes:
    """Overlaid histograms of each measurement's samples."""
    ax = axis(ax)
    for i, m in enumerate(measurements):
        ax.hist(m.values, bins=bins, alpha=0.55, label=m.label, color=colour_for(m.label, i))
    ax.legend(frameon=False, fontsize=9)
    m0 = measurements[0]
    return style(ax, title or m0.metric, "count", xlabel or f"{m0.metric} [{m0.unit}]")


def per_trial(measurements: Sequence[Measurement], ax=None, *, title: str = "", limit: float | None = None) -> Axes:
    """Samples in order (trial 1, 2, ...) as markers: e.g. peak holders per trial."""
    ax = axis(ax)
    for i, m in enumerate(measurements):
        ax.plot(range(1, m.n + 1), m.values, "o-", label=m.label, color=colour_for(m.label, i), ms=5, lw=1)
    if limit is not None:
        ax.axhline(limit, ls="--", color="grey", lw=1, label=f"limit {fmt(limit)}")
    ax.legend(frameon=False, fontsize=9)
    m0 = measurements[0]
    return style(ax, title or m0.metric, f"{m0.metric} [{m0.unit}]", "trial")
