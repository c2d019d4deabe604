"""Task timings recorded by the tasks themselves, shared by lessons 03 and 09.

A task of these lessons calls :func:`record` when it ends: one JSON line in
the Redis list ``<run>:records`` with the task's tag, the worker and pool
process that ran it, when the caller sent it (``sent``, passed in the
message), and when it started and ended (the task's own clock). The caller
waits for all of them with :func:`collect`. Times are wall-clock seconds
(``time.time()``): every process runs on this machine, with one clock.

The analysis functions are pure: they take the records and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from labkit.app import redis_client, worker_name
from labkit.measure import percentile


def record(run: str, tag: str, sent: float, start: float, end: float | None = None, **extra: Any) -> dict[str, Any]:
    """Called by a task: append its timings (and ``extra``) to ``<run>:records``; returns the record."""
    rec = {"tag": tag, "worker": worker_name(), "pid": os.getpid(), "sent": sent, "start": start,
           "end": time.time() if end is None else end, **extra}
    redis_client().rpush(f"{run}:records", json.dumps(rec))
    return rec


def collect(cluster: Any, run: str, n: int, timeout: float) -> list[dict[str, Any]]:
    """Wait until ``n`` records of ``run`` are in Redis; return them (and delete the keys).

    ``<run>:received`` (task tag -> ``[worker, time]``, written by a lesson's
    ``task_received`` handler, if it has one) is merged in as ``received_by``
    and ``received``.
    """
    from labkit.poll import poll_until  # noqa: PLC0415

    r = cluster.redis_client()
    try:
        poll_until(lambda: r.llen(f"{run}:records") >= n, timeout, 0.02, what=f"{n} task records of run {run}")
        records = [json.loads(x) for x in r.lrange(f"{run}:records", 0, -1)]
        received = {k.decode(): json.loads(v) for k, v in r.hgetall(f"{run}:received").items()}
    finally:
        r.delete(f"{run}:records", f"{run}:received")
        r.close()
    for rec in records:
        by, at = received.get(rec["tag"], (None, None))
        rec["received_by"], rec["received"] = by, at
    return records


def kind(tag: str) -> str:
    """``"long"`` for tags starting with ``L`` or ``H`` (a hog), else ``"short"``."""
    return "long" if tag[:1] in ("L", "H") else "short"


def busy(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Seconds of task execution per worker."""
    out: dict[str, float] = {}
    for r in records:
        out[r["worker"]] = out.get(r["worker"], 0.0) + r["end"] - r["start"]
    return out


def stranded_capacity(records: Sequence[dict[str, Any]], slots: dict[str, int]) -> float:
    """Slot-seconds a pool process sat idle while a task it was not given waited to start.

    ``slots`` maps each worker to its pool size. A task waits from ``sent``
    to ``start`` — in Redis, or in a worker's prefetch buffer after
    ``received``. An idle process of worker V is stranded while some task
    waits that V does not hold, unless a task V holds is already on its way
    to it (a hand-off of milliseconds, not waste). At each moment this adds
    ``min(idle processes of V not about to get a held task, tasks waiting
    outside V)`` over the workers (at most the number of waiting tasks) and
    integrates over the run. Nothing here knows which queue a worker consumes: capacity
    a queue layout forbids a worker to lend counts too.
    """
    # (time, kind, worker), in the order things happen to one task: 0 end (a process is free at once),
    # 1 sent, 2 received (a task never received is handed over the moment it starts), 3 start
    events: list[tuple[float, int, str]] = []
    for r in records:
        received = r["start"] if r.get("received") is None else min(r["received"], r["start"])
        events += [(r["sent"], 1, ""), (received, 2, r["worker"]), (r["start"], 3, r["worker"]),
                   (r["end"], 0, r["worker"])]
    events.sort()
    waiting, total, last = 0, 0.0, None
    held = dict.fromkeys(slots, 0)
    running = dict.fromkeys(slots, 0)
    for t, what, worker in events:
        if last is not None and waiting > 0:
            # a process is stranded if it is idle with nothing of its own on the way (held tasks go to
            # idle processes first) while a task it could have taken waits elsewhere
            free = {w: max(0, slots[w] - running[w] - held[w]) for w in slots}
            lendable = sum(min(free[w], waiting - held[w]) for w in slots)
            total += min(waiting, lendable) * (t - last)
        last = t
        if what == 1:
            waiting += 1
        elif what == 2:
            held[worker] += 1
        elif what == 3:
            waiting -= 1
            held[worker] -= 1
            running[worker] += 1
        else:
            running[worker] -= 1
    return total


def hoarded_capacity(records: Sequence[dict[str, Any]], slots: dict[str, int]) -> float:
    """Slot-seconds a process sat idle while *another* worker held tasks it had no process free for.

    This is prefetch hoarding alone. A task waiting in Redis does not count
    (any worker could take it), nor does a task a worker has received and is
    handing to one of its own free processes: only tasks a worker holds
    beyond its free processes (``received`` to ``start``), while a process
    of a different worker had nothing to do. Records without ``received``
    are ignored.
    """
    events: list[tuple[float, int, str]] = []  # (time, kind, worker): 0 end, 1 received, 2 start
    for r in records:
        if r.get("received") is not None:  # the worker that receives a message is the one that runs it
            events += [(min(r["received"], r["start"]), 1, r["worker"]), (r["start"], 2, r["worker"]),
                       (r["end"], 0, r["worker"])]
    events.sort()
    held = dict.fromkeys(slots, 0)
    running = dict.fromkeys(slots, 0)
    total, last = 0.0, None
    for t, what, worker in events:
        if last is not None:
            idle = {w: max(0, slots[w] - running[w]) for w in slots}
            stuck = {w: max(0, held[w] - idle[w]) for w in slots}  # held with no free process to run them
            lendable = sum(min(idle[v], sum(stuck.values()) - stuck[v]) for v in slots)
            total += min(sum(stuck.values()), lendable) * (t - last)
        last = t
        if what == 1:
            held[worker] += 1
        elif what == 2:
            held[worker] -= 1
            running[worker] += 1
        else:
            running[worker] -= 1
    return total


def summary(records: list[dict[str, Any]], t0: float, slots: dict[str, int]) -> dict[str, Any]:
    """Short-task latency and wait (p50/p95), makespans, busy fractions, stranded capacity; records relative to ``t0``."""
    end = max(r["end"] for r in records)
    span = end - t0
    shorts = [r for r in records if kind(r["tag"]) == "short"]
    longs = [r for r in records if kind(r["tag"]) == "long"]
    done = [r["end"] - r["sent"] for r in shorts]
    wait = [r["start"] - r["sent"] for r in shorts]
    work = busy(records)
    rel = []
    for r in records:
        rec = {**r, "sent": r["sent"] - t0, "start": r["start"] - t0, "end": r["end"] - t0}
        if r.get("received") is not None:
            rec["received"] = r["received"] - t0
        rel.append(rec)
    return {
        "makespan": span,
        "short_done": done, "short_wait": wait,
        "short_p50": percentile(done, 50), "short_p95": percentile(done, 95),
        "short_wait_p50": percentile(wait, 50), "short_wait_p95": percentile(wait, 95),
        "long_makespan": (max(r["end"] for r in longs) - t0) if longs else math.nan,
        "busy_fraction": {w: work.get(w, 0.0) / (n * span) for w, n in slots.items()},
        "stranded": stranded_capacity(records, slots),
        "hoarded": hoarded_capacity(records, slots),
        "records": sorted(rel, key=lambda r: r["sent"]),
    }


def plot_gantt(runs: Sequence[Any], *, mark: float | None = None, legend: str = ""):
    """One panel per run (a Measurement with ``meta["records"]``): each pool process a lane, each task a bar.

    Long tasks (and hogs) are dark, short ones light. A hatched bar is the
    time a task sat *received* by a worker but not started: held in its
    prefetch buffer. ``mark`` draws a dashed line (a snapshot moment).
    """
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from labkit.plots import AFTER, BEFORE, style  # noqa: PLC0415

    lanes_per = [sorted({(r["worker"], r["pid"]) for r in m.meta["records"]}) for m in runs]
    height = sum(1.0 + 0.32 * len(lanes) for lanes in lanes_per)
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, max(2.5, height)), sharex=True, layout="constrained",
                             squeeze=False, gridspec_kw={"height_ratios": [1 + len(lanes) for lanes in lanes_per]})
    for ax, m, lanes in zip(axes[:, 0], runs, lanes_per, strict=True):
        y = {lane: i for i, lane in enumerate(lanes)}
        for r in m.meta["records"]:
            lane = y[(r["worker"], r["pid"])]
            is_long = kind(r["tag"]) == "long"
            colour = BEFORE if is_long else AFTER
            ax.barh(lane, r["end"] - r["start"], left=r["start"], height=0.7, color=colour,
                    alpha=0.9 if is_long else 0.55, edgecolor="white", linewidth=0.5)
            held = r.get("received")
            if held is not None and r["start"] - held > 0.05:
                ax.barh(lane + 0.42, r["start"] - held, left=held, height=0.14, color="none",
                        edgecolor=colour, hatch="////", linewidth=0.6)
        ax.set_yticks(range(len(lanes)), [f"{w} (pid {pid})" for w, pid in lanes], fontsize=8)
        ax.set_ylim(-0.6, len(lanes) - 0.1)
        if mark is not None:
            ax.axvline(mark, color="grey", ls="--", lw=1)
        style(ax, f"{m.label}: makespan {m.meta['makespan']:.2f} s")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel(legend or "seconds since the first task was sent (dark: long, light: short; "
                           "hatched: received but not started)")
    return fig
