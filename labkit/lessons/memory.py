"""Lesson 01 — memory: ``parse`` vs ``iterparse``, ``r.content`` vs ``iter_content``.

A task that loads a whole file into memory needs memory in proportion to the
file: fine at 1 MB, fatal at 2 GB on a worker with eight pool children. The
fix is to stream — handle one record at a time and drop it — and this module
measures both on the same synthetic VehicleSales export (:mod:`labkit.data`).

Loaders (each counts the ``<VehicleSale>`` records and sums ``CashPrice``, so
all do the same work):

* :func:`load_parse` — ``ElementTree.parse``: the whole tree in memory.
* :func:`load_iterparse_no_clear` — ``iterparse`` alone saves nothing: the
  parser still builds the whole tree behind the events it hands you.
* :func:`load_talk` — the 2014 talk's loop: ``elem.clear()`` on every element.
  Most memory goes, but each emptied ``<VehicleSale>`` stays attached to the
  root, so the peak still grows with the file (slowly).
* :func:`load_iterparse_clear` — ``iterparse`` + ``root.clear()`` after each
  record: flat.
* :func:`load_lxml` — lxml's ``iterparse(tag=...)`` + ``elem.clear()`` + deleting
  the already-handled previous siblings: flat, and the fastest.

Every loader runs in a fresh interpreter (:func:`labkit.fresh.peak_rss`), so
the figure is the loader's and not the notebook's. Downloads get the same
treatment with a local HTTP server (:class:`ByteServer`), and the Celery task
:func:`import_file` shows the same effect inside a worker's pool child.
"""

from __future__ import annotations

import os
import random
import re
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import shared_task

from labkit import data
from labkit.app import worker_name
from labkit.fresh import memory_now, peak_rss
from labkit.loopback import LoopbackServer, QuietHandler
from labkit.measure import Comparison, Measurement

RECORD = data.RECORD_TAG  # "VehicleSale"
FIELD = "CashPrice"
DEFAULT_MB = 20
SIZES_MB = (5, 10, 20)
XML_IMPORTS = ("xml.etree.ElementTree", "lxml.etree")  # loaded before the baseline in the fresh process


# ----------------------------------------------------------------------------- loaders


def load_parse(path: str | Path) -> dict[str, float]:
    """Before: build the whole tree, then walk it."""
    root = ET.parse(path).getroot()
    records, total = 0, 0.0
    for sale in root.iter(RECORD):
        records += 1
        total += float(sale.findtext(FIELD))
    return {"records": records, "total": round(total, 2)}


def load_iterparse_no_clear(path: str | Path) -> dict[str, float]:
    """Before, in disguise: ``iterparse`` without clearing still keeps every element."""
    records, total = 0, 0.0
    for _event, elem in ET.iterparse(path):  # "end" events
        if elem.tag == RECORD:
            records += 1
            total += float(elem.findtext(FIELD))
    return {"records": records, "total": round(total, 2)}


def load_talk(path: str | Path) -> dict[str, float]:
    """The talk's loop (``cElementTree`` is gone since Python 3.9; ``ElementTree`` is the C version now).

    Each field's text is kept when the field ends, then every element is
    cleared. The cleared ``<VehicleSale>`` shells stay children of the root.
    """
    records, total, item = 0, 0.0, {}
    for _event, elem in ET.iterparse(path):
        if elem.tag == RECORD:
            records += 1
            total += float(item[FIELD])  # the talk wrote ``item`` to a database here
            item = {}
        elif elem.text:
            item[elem.tag] = elem.text
        elem.clear()
    return {"records": records, "total": round(total, 2)}


def load_iterparse_clear(path: str | Path) -> dict[str, float]:
    """After (stdlib): take the root from the first "start" event; empty it after each record."""
    records, total = 0, 0.0
    events = ET.iterparse(path, events=("start", "end"))
    _event, root = next(events)
    for event, elem in events:
        if event == "end" and elem.tag == RECORD:
            records += 1
            total += float(elem.findtext(FIELD))
            root.clear()  # drops this record (and any earlier one) from the tree
    return {"records": records, "total": round(total, 2)}


def load_lxml(path: str | Path) -> dict[str, float]:
    """After (lxml): events for ``<VehicleSale>`` only; clear it and delete the handled siblings."""
    from lxml import etree  # noqa: PLC0415 - workers need not import lxml unless they use it

    records, total = 0, 0.0
    for _event, elem in etree.iterparse(str(path), tag=RECORD):
        records += 1
        total += float(elem.findtext(FIELD))
        elem.clear(keep_tail=True)
        while elem.getprevious() is not None:
            del elem.getparent()[0]
    return {"records": records, "total": round(total, 2)}


LOADERS = {
    "parse": load_parse,
    "iterparse": load_iterparse_no_clear,
    "talk": load_talk,
    "clear": load_iterparse_clear,
    "lxml": load_lxml,
}
LABELS = {  # "before…"/"talk…" draw in the pitfall colour, "after…" in the fix colour
    "parse": "before: ET.parse",
    "iterparse": "before: iterparse, no clear",
    "talk": "talk: iterparse + elem.clear()",
    "clear": "after: iterparse + root.clear()",
    "lxml": "after: lxml + delete siblings",
}
SHORT = {"parse": "before: parse", "iterparse": "before: iterparse", "talk": "talk: elem.clear()",
         "clear": "after: root.clear()", "lxml": "after: lxml"}
STYLE = {"parse": "-", "iterparse": "--", "talk": ":", "clear": "-", "lxml": "--"}  # same colour, other dash
MARKER = {"parse": "o", "iterparse": "s", "talk": "^", "clear": "o", "lxml": "D"}
STREAMING = ("clear", "lxml")


def xml_file(size_mb: float = DEFAULT_MB, seed: int = 0) -> Path:
    """The cached VehicleSales file of ``size_mb`` MB (generated on first use, ~80 MB/s)."""
    return data.vehicle_sales(int(size_mb * 10**6), seed)


# ----------------------------------------------------------------------------- experiments (fresh process)


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
    m.meta.update(variant=variant, size_mb=size_mb, file_bytes=path.stat().st_size,
                  records=m.meta["result"]["records"],
                  records_per_s=m.meta["result"]["records"] / m.meta["cpu_seconds"][-1])
    return m


def loaders(size_mb: float = DEFAULT_MB, variants: Sequence[str] = tuple(LOADERS)) -> list[Measurement]:
    """Every loader on the same file, one fresh process each, with memory timelines."""
    return [measure_loader(v, size_mb) for v in variants]


def sweep(sizes_mb: Sequence[float] = SIZES_MB, variants: Sequence[str] = ("parse", "clear", "lxml"), *,
          reuse: Sequence[Measurement] = ()) -> dict[str, list[Measurement]]:
    """Peak per loader per file size: ``{variant: [Measurement per size]}``.

    Runs already made in this session (``reuse``: same variant and size) are
    not repeated.
    """
    known = {(m.meta["variant"], m.meta["size_mb"]): m for m in reuse}
    return {v: [known.get((v, s)) or measure_loader(v, s, timeline=False) for s in sizes_mb] for v in variants}


def throughput(measurements: Sequence[Measurement]) -> list[Measurement]:
    """Records per CPU-second of each loader run (timed inside the fresh process)."""
    return [Measurement(m.label, "throughput", "records per CPU-second", [m.meta["records_per_s"]], meta=m.meta)
            for m in measurements]


def compare(before: Measurement, after: Measurement, title: str = "") -> Comparison:
    """Peak memory, lower is better."""
    return Comparison(before, after, better="lower", title=title or "peak RSS above baseline")


def growth(series: Sequence[Measurement], floor_mib: float = 1.0) -> float:
    """How many times the peak grew from the smallest file to the largest.

    Peaks below ``floor_mib`` count as ``floor_mib``: a streaming loader's
    peak is a fraction of a MiB, where the allocator's granularity, not the
    file, decides the last few hundred KiB.
    """
    first, last = series[0].value, series[-1].value
    return max(last, floor_mib) / max(first, floor_mib)


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


def table(measurements: Sequence[Measurement]) -> Any:
    """An HTML table of fresh-process runs: net peak, whole-process peak, baseline, times, records/CPU-s."""
    from IPython.display import HTML  # noqa: PLC0415

    rows = []
    for m in measurements:
        meta = m.meta
        rate = meta.get("records_per_s")
        rows.append(
            f"<tr><td style='text-align:left'>{m.label}</td><td>{meta.get('size_mb', '')}</td>"
            f"<td><b>{meta['net_mib'][-1]:.1f}</b></td><td>{meta['peak_mib'][-1]:.1f}</td>"
            f"<td>{meta['baseline_mib'][-1]:.1f}</td><td>{meta['seconds'][-1]:.2f}</td>"
            f"<td>{meta['cpu_seconds'][-1]:.2f}</td><td>{'' if rate is None else f'{rate:,.0f}'}</td></tr>"
        )
    return HTML(
        "<table><thead><tr><th>run</th><th>MB</th><th>peak above baseline [MiB]</th>"
        "<th>whole-process peak [MiB]</th><th>baseline [MiB]</th><th>wall s</th><th>CPU s</th>"
        "<th>records per CPU-s</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


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


def download_content(url: str) -> dict[str, int]:
    """Before: ``r.content`` holds the whole body in memory (and briefly its pieces too)."""
    import requests  # noqa: PLC0415

    r = requests.get(url, timeout=60)
    r.raise_for_status()
    body = r.content
    return {"bytes": len(body), "crc32": zlib.crc32(body)}


def download_stream(url: str, chunk_size: int = 1 << 16) -> dict[str, int]:
    """After: ``stream=True`` + ``iter_content``: one chunk at a time (write it to a file in real life)."""
    import requests  # noqa: PLC0415

    n, crc = 0, 0
    with requests.get(url, stream=True, timeout=60) as r:
        r.raise_for_status()
        for chunk in r.iter_content(chunk_size=chunk_size):
            n += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return {"bytes": n, "crc32": crc}


def downloads(size_mb: float = 150, chunk_size: int = 1 << 16, *, interval: float = 0.02) -> Comparison:
    """``r.content`` vs ``iter_content`` for a ``size_mb`` MB body from a local :class:`ByteServer`.

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
        m.meta.update(size_mb=size_mb, chunk_size=chunk_size)
    return Comparison(before, after, better="lower", title=f"download of {size_mb:g} MB")


# ----------------------------------------------------------------------------- in the cluster

WORKERS = [
    {"name": "importer", "queues": ["import"], "concurrency": 2, "max_tasks_per_child": 1},
    {"name": "capped", "queues": ["capped"], "concurrency": 1},
]
LIMIT_MIB = 120  # worker_max_memory_per_child, for the "capped" worker's demonstration


def cluster_options(limit_mib: float = LIMIT_MIB) -> dict[str, Any]:
    """``LocalCluster(**memory.cluster_options())``: the two workers this lesson uses.

    ``importer`` (two pool children, each replaced after ONE task) measures a
    task's peak cleanly; ``capped`` keeps its one child until
    ``worker_max_memory_per_child`` (KiB; a worker-wide setting, applied to
    both) says otherwise. No ZooKeeper needed.
    """
    return {"workers": WORKERS, "zookeeper": 0,
            "settings": {"worker_max_memory_per_child": int(limit_mib * 1024)}}


@shared_task(name="memory.import_file")
def import_file(path: str, variant: str = "parse") -> dict[str, Any]:
    """Import ``path`` with one loader in this pool child; report this child's own memory (MiB).

    ``maxrss_mib`` is ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end — the
    figure Celery's ``worker_max_memory_per_child`` looks at, and only *after*
    a task returns. ``start_rss_mib`` is the child's RSS when the task began.
    """
    start = memory_now()
    t0 = time.perf_counter()
    tally = LOADERS[variant](path)
    seconds = time.perf_counter() - t0
    end = memory_now()
    return {**tally, "variant": variant, "seconds": seconds, "pid": os.getpid(), "worker": worker_name(),
            "start_rss_mib": start["rss"], "start_maxrss_mib": start["maxrss"],
            "maxrss_mib": end["maxrss"], "hwm_mib": end["hwm"]}


def in_cluster(cluster: Any, size_mb: float = 10, variants: Sequence[str] = ("parse", "lxml"), *,
               queue: str = "import", timeout: float = 120) -> list[Measurement]:
    """The same loaders as Celery tasks on the ``importer`` worker, sent together.

    With ``max_tasks_per_child=1`` a pool child runs one task and exits, so
    every task runs in a child that has run nothing before, and its
    ``ru_maxrss`` is that task's own peak (plus the child's start-up RSS,
    forked from the worker: ``meta["start_rss_mib"]``). Values: the child's
    peak RSS in MiB.
    """
    path = str(xml_file(size_mb))
    task = cluster.task(import_file)
    pending = [task.apply_async((path, v), queue=queue) for v in variants]
    out = []
    for v, res in zip(variants, pending, strict=True):
        r = res.get(timeout=timeout)
        out.append(Measurement(SHORT[v], "pool child peak RSS", "MiB", [r["maxrss_mib"]],
                               meta={**r, "size_mb": size_mb, "net_mib": r["maxrss_mib"] - r["start_rss_mib"]}))
    return out


def runaway(cluster: Any, size_mb: float = 10, *, limit_mib: float = LIMIT_MIB, queue: str = "capped",
            timeout: float = 120) -> dict[str, Any]:
    """Show that ``worker_max_memory_per_child`` does not stop a task that blows past it.

    On the ``capped`` worker (one pool child): a small streaming import, then
    the full parse, then another small import, sent together (one child runs
    them in order). The parse runs to the end in the same child, far above
    the limit; only afterwards is the child replaced, which the third task's
    new pid shows.
    """
    path = str(xml_file(size_mb))
    task = cluster.task(import_file)
    pending = [task.apply_async((path, v), queue=queue) for v in ("lxml", "parse", "lxml")]
    steps = [{**res.get(timeout=timeout), "state": res.state} for res in pending]
    return {"limit_mib": limit_mib, "steps": steps,
            "same_child": steps[0]["pid"] == steps[1]["pid"],
            "replaced_after": steps[2]["pid"] != steps[1]["pid"],
            "parse_peak_mib": steps[1]["maxrss_mib"], "parse_state": steps[1]["state"]}

