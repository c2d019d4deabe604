"""Lesson 01 — memory: ``parse`` vs ``iterparse``, ``r.content`` vs ``iter_content``.

A task that loads a whole file into memory needs memory in proportion to the
file: fine at 1 MB, fatal at 2 GB on a worker with eight pool children. The
fix is to stream — handle one record at a time and drop it — and this module
measures both on the same synthetic VehicleSales export (:mod:`labkit.data`).

Loaders (in :mod:`labkit.lessons._streaming`, re-exported here; each counts
the ``<VehicleSale>`` records and sums ``CashPrice``, so all do the same work):

* :func:`load_parse` — ``ElementTree.parse``: the whole tree in memory.
* :func:`load_iterparse_no_clear` — ``iterparse`` alone saves nothing: the
  parser still builds the whole tree behind the events it hands you.
* :func:`load_talk` — the 2014 slide's loop, run as written (its docstring
  lists the three places Python 3 made us change): ``elem.clear()`` on every
  element. Most memory goes, but each emptied ``<VehicleSale>`` stays attached
  to the root, so the peak still grows with the file.
* :func:`load_iterparse_clear` — ``iterparse`` + ``root.clear()`` after each
  record: flat.
* :func:`load_lxml` — lxml's ``iterparse(tag=...)`` + ``elem.clear()`` + deleting
  the already-handled previous siblings: flat, and the fastest.

Three ways to measure a call's memory, side by side: a fresh interpreter
(:func:`measure_loader`, via :mod:`labkit.fresh`: exact peak above a clean
baseline), and memory-profiler in this process (``%memit`` and
:func:`in_kernel`'s ``memory_usage`` timeline). Downloads get the same
treatment with a local HTTP server (:class:`ByteServer`), and the Celery task
:func:`import_file` shows the effect inside a worker's pool child, where
``worker_max_memory_per_child`` (:func:`runaway`) does not stop it.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import shared_task

from labkit import data
from labkit.app import worker_name
from labkit.client import ClusterLike
from labkit.fresh import MIB, memory_now, peak_rss, run_fresh
from labkit.lessons._streaming import (  # noqa: F401 - re-exported: the notebook shows memory.load_*
    FIELD,
    LOADERS,
    RECORD,
    download_content,
    download_stream,
    load_iterparse_clear,
    load_iterparse_no_clear,
    load_lxml,
    load_parse,
    load_talk,
)
from labkit.loopback import LoopbackServer, QuietHandler
from labkit.measure import Comparison, Measurement, claim, verify
from labkit.table import Table

NOTEBOOK = "01_memory.ipynb"
DEFAULT_MB = 20
SIZES_MB = (5, 10, 20)
MIN_SIZE_MB, MIN_SIZE_RATIO = 5, 2  # below these a size sweep cannot tell growth from allocator noise
XML_IMPORTS = ("xml.etree.ElementTree", "lxml.etree")  # loaded before the baseline in the fresh process

LABELS = {  # "before…"/"talk…" draw in the pitfall colour, "after…" in the fix colour
    "parse": "before: ET.parse",
    "iterparse": "before: iterparse, no clear",
    "talk": "talk: the slide's loop",
    "clear": "after: iterparse + root.clear()",
    "lxml": "after: lxml + delete siblings",
}
SHORT = {"parse": "before: parse", "iterparse": "before: iterparse", "talk": "talk: slide's loop",
         "clear": "after: root.clear()", "lxml": "after: lxml"}
STYLE = {"parse": "-", "iterparse": "--", "talk": ":", "clear": "-", "lxml": "--"}  # same colour, other dash
MARKER = {"parse": "o", "iterparse": "s", "talk": "^", "clear": "o", "lxml": "D"}
STREAMING = ("clear", "lxml")


def xml_file(size_mb: float = DEFAULT_MB, seed: int = 0) -> Path:
    """The cached VehicleSales file of ``size_mb`` MB (generated on first use, ~80 MB/s)."""
    return data.vehicle_sales(int(size_mb * 10**6), seed)


# ----------------------------------------------------------------------------- loaders in a fresh process


def measure_loader(variant: str, size_mb: float = DEFAULT_MB, *, timeline: bool = True,
                   interval: float = 0.02) -> Measurement:
    """Run one loader on the ``size_mb`` file in a fresh interpreter.

    The value is the peak RSS above the process's baseline (MiB); ``meta``
    adds the whole-process peak, the baseline, wall and CPU seconds, records,
    and records per CPU-second (``records_per_s``: CPU time, unlike wall
    time, does not grow when other processes compete for the cores).
    """
    path = xml_file(size_mb)
    m = peak_rss(LOADERS[variant], (str(path),), label=LABELS[variant], imports=XML_IMPORTS,
                 interval=interval if timeline else None)
    m.meta.update(variant=variant, size_mb=size_mb, file_bytes=path.stat().st_size, tool="fresh process",
                  records=m.meta["result"]["records"],
                  records_per_s=m.meta["result"]["records"] / m.meta["cpu_seconds"][-1])
    return m


def loaders(size_mb: float = DEFAULT_MB, variants: Sequence[str] = tuple(LOADERS)) -> list[Measurement]:
    """Every loader on the same file, one fresh process each, with memory timelines."""
    return [measure_loader(v, size_mb) for v in variants]


def check_sizes(sizes_mb: Sequence[float]) -> tuple[float, float]:
    """``(smallest, largest)`` of a size sweep, or a ``ValueError`` saying what a sweep needs."""
    sizes = sorted(float(s) for s in sizes_mb)
    if len(sizes) < 2 or sizes[0] < MIN_SIZE_MB or sizes[-1] < MIN_SIZE_RATIO * sizes[0]:
        raise ValueError(
            f"SIZES_MB = {list(sizes_mb)}: a sweep needs at least two files, the smallest >= {MIN_SIZE_MB} MB "
            f"and the largest >= {MIN_SIZE_RATIO}x the smallest, or growth cannot be told from allocator "
            "noise; for example [5, 10, 20]")
    return sizes[0], sizes[-1]


def sweep(sizes_mb: Sequence[float] = SIZES_MB, variants: Sequence[str] = ("parse", "clear", "lxml"), *,
          reuse: Sequence[Measurement] = ()) -> dict[str, list[Measurement]]:
    """Peak per loader per file size: ``{variant: [Measurement per size, smallest first]}``.

    Runs already made in this session (``reuse``: same variant and size) are
    not repeated.
    """
    check_sizes(sizes_mb)
    known = {(m.meta["variant"], m.meta["size_mb"]): m for m in reuse}
    return {v: [known.get((v, s)) or measure_loader(v, s) for s in sorted(sizes_mb)] for v in variants}


def throughput(measurements: Sequence[Measurement]) -> list[Measurement]:
    """Records per CPU-second of each loader run (timed inside the fresh process)."""
    return [Measurement(m.label, "throughput", "records per CPU-second", [m.meta["records_per_s"]], meta=m.meta)
            for m in measurements]


def growth(series: Sequence[Measurement], floor_mib: float = 1.0) -> float:
    """How many times the peak grew from the smallest file to the largest.

    Peaks below ``floor_mib`` count as ``floor_mib``: a streaming loader's
    peak is a fraction of a MiB, where the allocator's granularity, not the
    file, decides the last few hundred KiB.
    """
    first, last = series[0].value, series[-1].value
    return max(last, floor_mib) / max(first, floor_mib)


def _size_ratio(series: Sequence[Measurement]) -> float:
    first, last = check_sizes([m.meta["size_mb"] for m in series])
    return last / first


# ----------------------------------------------------------------------------- claims about loaders


@claim("the full parse needs at least 8x the memory of a streaming loader")
def streaming_needs_far_less(parse: Measurement, streaming: Measurement, floor_mib: float = 1.0) -> None:
    """Peaks above baseline; a streaming peak under ``floor_mib`` counts as ``floor_mib``."""
    ratio = parse.value / max(streaming.value, floor_mib)
    verify(f"{parse.label} needs >= 8x the memory of {streaming.label}", ratio >= 8,
           ratio=ratio, parse_mib=parse.value, streaming_mib=streaming.value)


@claim("iterparse without clearing saves (almost) nothing: within 1.3x of the full parse")
def iterparse_alone_saves_nothing(parse: Measurement, no_clear: Measurement) -> None:
    verify(f"{no_clear.label} peaks within 1.3x of {parse.label}", no_clear.value >= parse.value / 1.3,
           parse_mib=parse.value, no_clear_mib=no_clear.value)


@claim("the full parse's peak grows in proportion to the file")
def full_parse_grows_with_the_file(series: Sequence[Measurement]) -> None:
    """At least 0.6x the size ratio of the sweep (a 4x file: >= 2.4x the peak)."""
    ratio, g = _size_ratio(series), growth(series)
    verify(f"{series[0].label}: peak grows >= {0.6 * ratio:.2f}x for a {ratio:g}x file", g >= 0.6 * ratio,
           growth=g, peaks=str([round(m.value, 1) for m in series]))


@claim("a streaming loader's peak stays flat as the file grows")
def streaming_stays_flat(series: Sequence[Measurement]) -> None:
    """At most 1.3x from the smallest file to the largest (peaks under 1 MiB count as 1 MiB)."""
    ratio, g = _size_ratio(series), growth(series)
    verify(f"{series[0].label}: peak within 1.3x for a {ratio:g}x file", g <= 1.3,
           growth=g, peaks=str([round(m.value, 2) for m in series]))


@claim("the talk's loop still grows with the file")
def the_talks_loop_still_grows(series: Sequence[Measurement]) -> None:
    """At least half the size ratio, and at least 1.5x (clear of the 1.3x a flat loader may show)."""
    ratio, g = _size_ratio(series), growth(series)
    need = max(1.5, 0.5 * ratio)
    verify(f"{series[0].label}: peak grows >= {need:.2f}x for a {ratio:g}x file", g >= need,
           growth=g, peaks=str([round(m.value, 2) for m in series]))


@claim("streaming costs no speed: at least 0.6x the throughput of loading everything")
def streaming_costs_no_speed(whole: Measurement, streaming: Measurement) -> None:
    """Throughputs (higher is better) of the all-at-once way and the streaming way, same work."""
    verify(f"{streaming.label}: at least 0.6x the {whole.metric} of {whole.label}",
           streaming.value >= 0.6 * whole.value, streaming=streaming.value, whole=whole.value)


@claim("every loader counted and summed the same records")
def same_work(measurements: Sequence[Measurement]) -> None:
    tallies = [(m.meta["result"]["records"], m.meta["result"]["total"]) for m in measurements]
    verify("every loader counted and summed the same records", len(set(tallies)) == 1,
           **{f"{m.label} ({m.meta.get('size_mb', '?')} MB)": str(t) for m, t in zip(measurements, tallies, strict=True)})


# ----------------------------------------------------------------------------- the same, in this process


def in_kernel(variant: str, size_mb: float = DEFAULT_MB, *, interval: float = 0.02) -> Measurement:
    """Run one loader in THIS process under ``memory_profiler.memory_usage``; its sampled RSS (MiB).

    ``memory_usage((f, args))`` calls ``f`` here while a forked monitor
    process samples this process's RSS every ``interval`` s. The value is the
    highest sample minus the first (taken as the call starts), the timeline
    every sample relative to the first. (If the call ends within four
    samples, memory_usage runs it again with a ten times shorter interval.)
    """
    from memory_profiler import memory_usage  # noqa: PLC0415

    path = str(xml_file(size_mb))
    samples, result = memory_usage((LOADERS[variant], (path,)), interval=interval, timestamps=True, retval=True)
    start, t0 = samples[0]
    return Measurement(f"memory_usage: {SHORT[variant]}", "peak RSS above baseline", "MiB",
                       [max(m for m, _ in samples) - start], timeline=[(t - t0, m - start) for m, t in samples],
                       meta={"variant": variant, "size_mb": size_mb, "tool": "memory_usage in this kernel",
                             "interval": interval, "samples": len(samples), "start_mib": start, "result": result})


def from_memit(result: Any, variant: str, size_mb: float) -> Measurement:
    """A ``%memit -o`` result as a Measurement: its increment (peak sample minus the RSS before), MiB."""
    peak = max(result.mem_usage)
    return Measurement(f"%memit: {SHORT[variant]}", "peak RSS above baseline", "MiB", [peak - result.baseline],
                       meta={"variant": variant, "size_mb": size_mb, "tool": "%memit in this kernel",
                             "interval": result.interval, "peak_mib": peak, "baseline_mib": result.baseline})


def tools_table(*measurements: Measurement) -> Table:
    """One row per loader, one column per tool (``meta["tool"]``): peak above baseline, MiB."""
    tools = list(dict.fromkeys(m.meta["tool"] for m in measurements))
    rows: dict[str, dict[str, float]] = {}
    for m in measurements:
        rows.setdefault(f"{LABELS[m.meta['variant']]} ({m.meta['size_mb']:g} MB)", {})[m.meta["tool"]] = m.value
    return Table(["loader", *tools], [[name, *(r.get(t) for t in tools)] for name, r in rows.items()],
                 title="peak RSS above baseline [MiB], three ways")


# ----------------------------------------------------------------------------- a fresh child's ru_maxrss


def _reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS (Linux; elsewhere nothing happens)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def inherited_peak(*, ballast_mib: int = 300) -> list[Measurement]:
    """What a fresh child reports about itself, started from this process at two sizes.

    First this process's peak is reset and a child asked (``without``), then
    ``ballast_mib`` MiB are allocated here and a second child asked
    (``with``). Returns the children's ``ru_maxrss`` and their ``VmHWM``, each
    as ``[without, with]`` (MiB); ``meta`` has this process's own figures.
    """
    _reset_peak()
    without = run_fresh(memory_now, interval=None).result
    ballast = bytearray(ballast_mib * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: RSS really grows
    here = memory_now()
    with_ballast = run_fresh(memory_now, interval=None).result
    del ballast
    meta = {"ballast_mib": ballast_mib, "parent": here, "without": without, "with": with_ballast}
    return [Measurement(label, "a fresh child's own peak, as it reports it", "MiB",
                        [without[key], with_ballast[key]], stat="last", meta=meta)
            for label, key in (("ru_maxrss", "maxrss"), ("VmHWM", "hwm"))]


@claim("a fresh child's ru_maxrss carries its parent's peak")
def ru_maxrss_carries_the_parents_peak(figure: Measurement) -> None:
    """The child's figure rose by at least 2/3 of the memory its parent gained in between."""
    ballast = figure.meta["ballast_mib"]
    rise = figure.values[1] - figure.values[0]
    verify(f"the child's {figure.label} rose with its parent's {ballast} MiB", ballast > 0 and rise >= ballast * 2 / 3,
           rise_mib=rise, without=figure.values[0], with_ballast=figure.values[1])


# ----------------------------------------------------------------------------- tables and plots


def table(measurements: Sequence[Measurement]) -> Table:
    """Fresh-process runs: net peak, whole-process peak, baseline, wall and CPU seconds, records/CPU-s."""
    rows = []
    for m in measurements:
        meta = m.meta
        rows.append([m.label, meta.get("size_mb"), meta["net_mib"][-1], meta["peak_mib"][-1], meta["baseline_mib"][-1],
                     round(meta["seconds"][-1], 2), round(meta["cpu_seconds"][-1], 2), meta.get("records_per_s")])
    return Table(["run", "MB", "peak above baseline [MiB]", "whole-process peak [MiB]", "baseline [MiB]",
                  "wall s", "CPU s", "records per CPU-s"], rows)


def plot_timelines(measurements: Sequence[Measurement], ax=None):
    """Every loader's RSS-above-baseline over time, on one axis."""
    from labkit import plots  # noqa: PLC0415

    ax = plots.timelines(measurements, ax, step=False,
                         title=f"memory while loading the same {measurements[0].meta['size_mb']:g} MB file")
    lines = [ln for ln in ax.get_lines() if ln.get_label() in {m.label for m in measurements}]
    for line, m in zip(lines, [m for m in measurements if m.timeline], strict=False):
        line.set_linestyle(STYLE.get(m.meta.get("variant"), "-"))
    ax.legend(frameon=False, fontsize=9, loc="upper left")
    ax.set_ylabel("RSS above baseline [MiB]")
    return ax


def plot_sweep(results: dict[str, list[Measurement]], axes: Sequence[Any] | None = None):
    """Peak above baseline vs file size, one line per loader: linear axis, then log axis."""
    from labkit import plots  # noqa: PLC0415

    if axes is None:
        _, axes = plots.panels(2)
    for ax, log in zip(axes, (False, True), strict=False):
        for i, (variant, series) in enumerate(results.items()):
            xs = [m.meta["size_mb"] for m in series]
            ax.plot(xs, [m.value for m in series], marker=MARKER[variant], ls=STYLE[variant], label=LABELS[variant],
                    color=plots.colour_for(LABELS[variant], i), lw=1.8)
        ax.set_xlim(left=0)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
            ax.legend(frameon=False, fontsize=8)
        ax.set_title("peak vs file size" + (" (log scale)" if log else ""), fontsize=11, loc="left")
        ax.set_ylabel("peak RSS above baseline [MiB]")
        ax.set_xlabel("file size [MB]")
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", alpha=0.3)
    return axes


def explore_size(size_mb: float = DEFAULT_MB, variants: Sequence[str] = ("parse", "talk", "lxml")) -> list[Measurement]:
    """Run ``variants`` on a ``size_mb`` file, plot their timelines and show the table (for the widget)."""
    from IPython.display import display  # noqa: PLC0415

    runs = loaders(size_mb, variants)
    plot_timelines(runs)
    display(table(runs))
    return runs


# ----------------------------------------------------------------------------- downloads


class ByteServer(LoopbackServer):
    """A local HTTP server on 127.0.0.1 (a free port), serving ``/bytes/<n>``.

    ``/bytes/<n>`` answers ``n`` bytes made on the fly: one 1 MiB block of
    seeded pseudo-random bytes (``random.Random(seed).randbytes``), repeated.
    Nothing is read from disk and the server's own memory stays at one block.
    ``files={"name": path}`` also serves those files at ``/files/<name>``.
    Use it as a context manager: the port is closed and every handler thread
    joined on exit.
    """

    BLOCK = 1 << 20
    thread_name = "labkit-byteserver"
    join_handlers = True  # close() waits for downloads in progress

    def __init__(self, seed: int = 0, files: dict[str, str | Path] | None = None) -> None:
        super().__init__()
        self.block = random.Random(seed).randbytes(self.BLOCK)
        self.files = {k: Path(v) for k, v in (files or {}).items()}

    def handler(self) -> type[QuietHandler]:
        block, files = self.block, self.files

        class Handler(QuietHandler):
            timeout = 30  # a client that stops reading cannot hold close() forever

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                m = re.fullmatch(r"/bytes/(\d+)", self.path)
                if m:
                    self._send_bytes(int(m.group(1)))
                elif self.path.startswith("/files/") and self.path[7:] in files:
                    self._send_file(files[self.path[7:]])
                else:
                    self.send_error(404)

            def _send_bytes(self, n: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(n))
                self.end_headers()
                view = memoryview(block)
                while n > 0:
                    k = min(n, len(view))
                    self.wfile.write(view[:k])
                    n -= k

            def _send_file(self, path: Path) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()
                with open(path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        self.wfile.write(chunk)

        return Handler


def compare_downloads(*, size_mb: float = 150, chunk_size: int = 1 << 16, interval: float = 0.02) -> Comparison:
    """``r.content`` vs ``iter_content(chunk_size)`` for a ``size_mb`` MB body from a local :class:`ByteServer`.

    Each download runs in a fresh interpreter with ``requests`` imported before
    the baseline; the server runs in this process and is closed on return.
    """
    n = int(size_mb * 10**6)
    with ByteServer() as server:
        url = f"{server.url}/bytes/{n}"
        before = peak_rss(download_content, (url,), label="before: r.content", imports=("requests",),
                          interval=interval)
        after = peak_rss(download_stream, (url, chunk_size), label=f"after: iter_content({chunk_size})",
                         imports=("requests",), interval=interval)
    for m in (before, after):
        m.meta.update(size_mb=size_mb, body_bytes=n, chunk_size=chunk_size)
    return Comparison(before, after, better="lower", title=f"download of {size_mb:g} MB")


@claim("streaming a download needs at least 5x less memory, and r.content holds the whole body")
def a_streamed_download_needs_far_less(dl: Comparison) -> None:
    dl.check(factor=5, before_at_least=dl.before.meta["body_bytes"] / MIB)
    verify("both downloads received the same bytes", dl.before.meta["result"] == dl.after.meta["result"],
           before=str(dl.before.meta["result"]), after=str(dl.after.meta["result"]))


def download_speeds(*, size_mb: float = 2.0, chunk_size: int = 1 << 16, one_byte_kb: float = 50,
                    repeat: int = 5) -> list[Measurement]:
    """Download throughput in this process (MB/s): ``r.content``, ``iter_content(chunk_size)``, ``iter_content(1)``.

    The first two fetch a ``size_mb`` body ``repeat`` times each, taking
    turns; ``chunk_size=1`` — what ``r.iter_content()`` does when you give it
    no size — fetches only ``one_byte_kb`` kB, three times, because it is that
    slow. Throughput is bytes per second, so the sizes may differ.
    """
    big, small = int(size_mb * 10**6), int(one_byte_kb * 1000)
    ways = {"before: r.content": (download_content, big, ()),
            f"after: iter_content({chunk_size})": (download_stream, big, (chunk_size,)),
            "naive: iter_content(1)": (download_stream, small, (1,))}
    samples: dict[str, list[float]] = {label: [] for label in ways}
    with ByteServer() as server:
        for k in range(repeat):
            for label, (fn, n, extra) in ways.items():
                if n == small and k >= 3:
                    continue
                t0 = time.perf_counter()
                got = fn(f"{server.url}/bytes/{n}", *extra)
                seconds = time.perf_counter() - t0
                assert got["bytes"] == n, (label, got)
                samples[label].append(n / seconds / 1e6)
    return [Measurement(label, "download speed", "MB/s", values,
                        meta={"bytes": ways[label][1], "chunk_size": (ways[label][2] or (None,))[0]})
            for label, values in samples.items()]


# ----------------------------------------------------------------------------- in the cluster

WORKERS = [
    {"name": "importer", "queues": ["import"], "concurrency": 2, "max_tasks_per_child": 1},
    {"name": "capped", "queues": ["capped"], "concurrency": 1},
]
LIMIT_MIB = 120  # worker_max_memory_per_child, for the "capped" worker's demonstration
MIN_CLUSTER_MB = 10  # a full parse of a smaller file may stay under LIMIT_MIB


def cluster_config(limit_mib: float = LIMIT_MIB) -> dict[str, Any]:
    """``LocalCluster(**memory.CLUSTER)``: the two workers this lesson uses.

    ``importer`` (two pool children, each replaced after ONE task) measures a
    task's peak without the leftovers of earlier tasks; ``capped`` keeps its
    one child until ``worker_max_memory_per_child`` (KiB; a worker-wide
    setting, applied to both) says otherwise. No ZooKeeper needed.
    """
    if not isinstance(limit_mib, int | float) or limit_mib <= 0:
        raise ValueError(f"limit_mib must be a positive number of MiB, not {limit_mib!r}")
    return {"workers": WORKERS, "zookeeper": 0,
            "settings": {"worker_max_memory_per_child": int(limit_mib * 1024)}}


CLUSTER = cluster_config()
WORKSHOP = {"SIZE_MB": 40, "SIZES_MB": [10, 20, 40], "DOWNLOAD_MB": 300, "CLUSTER_MB": 20}


@shared_task(name="memory.import_file")
def import_file(path: str, variant: str = "parse") -> dict[str, Any]:
    """Import ``path`` with one loader in this pool child; report this child's own memory (MiB).

    ``maxrss_mib`` is ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end — the
    figure Celery's ``worker_max_memory_per_child`` looks at, and only *after*
    a task returns. A forked child's ``ru_maxrss`` starts at the RSS it had
    when it was forked (the worker's pages it shares), so ``start_rss_mib``
    (this child's RSS when the task began) is what the task started from.
    """
    start = memory_now()
    t0 = time.perf_counter()
    tally = LOADERS[variant](path)
    seconds = time.perf_counter() - t0
    end = memory_now()
    return {**tally, "variant": variant, "seconds": seconds, "pid": os.getpid(), "worker": worker_name(),
            "start_rss_mib": start["rss"], "start_maxrss_mib": start["maxrss"],
            "maxrss_mib": end["maxrss"], "hwm_mib": end["hwm"]}


def _check_cluster_mb(size_mb: float) -> None:
    if size_mb < MIN_CLUSTER_MB:
        raise ValueError(f"CLUSTER_MB = {size_mb}: use at least {MIN_CLUSTER_MB} MB, so that a full parse "
                         f"clearly passes the capped worker's {LIMIT_MIB} MiB and dwarfs lxml's own code")


def in_cluster(cluster: ClusterLike, *, size_mb: float = 10, variants: Sequence[str] = ("parse", "lxml"),
               queue: str = "import", timeout: float = 120) -> list[Measurement]:
    """The same loaders as Celery tasks on the ``importer`` worker, sent together.

    With ``max_tasks_per_child=1`` a pool child runs one task and exits, so no
    task starts in a child an earlier task made fat. Values: the child's
    ``ru_maxrss`` at the end (MiB); ``meta["net_mib"]`` subtracts the child's
    RSS when the task started, which it had from the fork.
    """
    _check_cluster_mb(size_mb)
    path = str(xml_file(size_mb))
    task = cluster.task(import_file)
    pending = [task.apply_async((path, v), queue=queue) for v in variants]
    out = []
    for v, res in zip(variants, pending, strict=True):
        r = res.get(timeout=timeout)
        out.append(Measurement(SHORT[v], "pool child peak RSS", "MiB", [r["maxrss_mib"]],
                               meta={**r, "size_mb": size_mb, "net_mib": r["maxrss_mib"] - r["start_rss_mib"]}))
    return out


@claim("in a worker's pool child, the full parse needs at least 5x what streaming needs")
def a_worker_child_needs_far_less_streaming(whole: Measurement, streaming: Measurement) -> None:
    """Above each child's RSS at task start; streaming's figure includes lxml's code, imported on first use."""
    verify(f"{whole.label} needs >= 5x {streaming.label} above the child's start",
           whole.meta["net_mib"] >= 5 * max(streaming.meta["net_mib"], 1.0),
           whole=whole.meta["net_mib"], streaming=streaming.meta["net_mib"])


def runaway(cluster: ClusterLike, *, size_mb: float = 10, variant: str = "parse", queue: str = "capped",
            timeout: float = 120) -> Measurement:
    """Does ``worker_max_memory_per_child`` stop a task that blows past it?

    On the ``capped`` worker (one pool child): a small streaming import, then
    ``variant`` (the full parse), then another small import, sent together
    (the one child runs them in order). Values: each step's ``ru_maxrss``
    (MiB); ``meta`` says whether the big step ran in the same child as the
    first and whether the child was replaced after it.
    """
    _check_cluster_mb(size_mb)
    limit_kib = cluster.app.conf.worker_max_memory_per_child
    if not limit_kib:
        raise ValueError("the cluster has no worker_max_memory_per_child: start it with LocalCluster(**memory.CLUSTER)")
    path = str(xml_file(size_mb))
    task = cluster.task(import_file)
    pending = [task.apply_async((path, v), queue=queue) for v in ("lxml", variant, "lxml")]
    steps = [{**res.get(timeout=timeout), "state": res.state} for res in pending]
    return Measurement(f"capped worker: lxml, {variant}, lxml", "pool child peak RSS", "MiB",
                       [s["maxrss_mib"] for s in steps], stat="max",
                       meta={"limit_mib": limit_kib / 1024, "steps": steps, "variant": variant, "size_mb": size_mb,
                             "same_child": steps[0]["pid"] == steps[1]["pid"],
                             "replaced_after": steps[2]["pid"] != steps[1]["pid"],
                             "big_peak_mib": steps[1]["maxrss_mib"], "big_state": steps[1]["state"]})


@claim("worker_max_memory_per_child does not stop a task: it ran past the limit, then the child was replaced")
def a_memory_limit_does_not_stop_a_task(m: Measurement) -> None:
    meta = m.meta
    verify("the big task succeeded, and its child went past the limit",
           meta["big_state"] == "SUCCESS" and meta["big_peak_mib"] > meta["limit_mib"],
           peak=meta["big_peak_mib"], limit=meta["limit_mib"], state=meta["big_state"])
    verify("... in the same child that ran the task before it, which was replaced only afterwards",
           meta["same_child"] and meta["replaced_after"], pids=str([s["pid"] for s in meta["steps"]]))
