"""Measurements and comparisons: the one experiment scaffold every lesson uses.

A lesson's ``before(cluster, **params)`` and ``after(cluster, **params)`` each
return a :class:`Measurement` — a labelled list of samples from a real run
(latencies, peaks per trial, counts) plus an optional timeline for plotting.
``compare()`` pairs them in a :class:`Comparison`, which knows which
direction is better, computes the improvement factor, renders as a small
table in a notebook, plots itself, and ``check()``-s a claim with a readable
``AssertionError``. Nothing here invents a number: every value comes from
the run that produced it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

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
            f"<b>{self.label}</b>: {self.metric} <b>{fmt(self.value)} {self.unit}</b> "
            f"({self.stat}; n={self.n}; range {fmt(lo)}–{fmt(hi)})"
        )


def fmt(x: float) -> str:
    """Readable number: integers as integers, others with 3 significant digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return "∞"
    if float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.3g}"


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

    def plot(self, ax=None, **kwargs):
        from .plots import comparison_bars  # noqa: PLC0415 - matplotlib only when plotting

        return comparison_bars(self, ax=ax, **kwargs)

    def __repr__(self) -> str:
        return (
            f"<Comparison {self.title or self.metric}: before {fmt(self.before.value)} -> "
            f"after {fmt(self.after.value)} {self.unit} ({fmt(self.factor)}x better, {self.better} is better)>"
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td style='text-align:left'>{m.label}</td><td>{fmt(m.value)}</td><td>{m.stat}</td>"
            f"<td>{m.n}</td><td>{fmt(m.spread[0])}–{fmt(m.spread[1])}</td></tr>"
            for m in (self.before, self.after)
        )
        return (
            f"<b>{self.title or self.metric}</b> ({self.unit}; {self.better} is better): "
            f"{self.after.label} is <b>{fmt(self.factor)}×</b> better than {self.before.label}"
            "<table><thead><tr><th>run</th><th>value</th><th>stat</th><th>n</th><th>range</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>"
        )


def verify(claim: str, ok: bool, **figures: Any) -> None:
    """Assert a lesson's claim; on failure the message names the claim and every figure."""
    if not ok:
        shown = ", ".join(f"{k}={fmt(v) if isinstance(v, int | float) else v}" for k, v in figures.items())
        raise AssertionError(f"claim does not hold: {claim}" + (f" ({shown})" if shown else ""))


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


# =============================================================================
# Memory of a function run in a fresh process (added with lesson 01, "memory")
# =============================================================================
#
# Why a fresh interpreter, and why not ``ru_maxrss`` there: a fork of the
# notebook kernel starts with the kernel's whole heap, so its RSS says more
# about the notebook's history than about the function. A ``spawn``-ed child
# is clean, but on Linux its ``getrusage().ru_maxrss`` is NOT: the kernel keeps
# the high-water mark across ``fork``/``vfork`` + ``exec``, so a child started
# from a 600 MiB notebook reports ru_maxrss >= 600 MiB before doing anything.
# The peak below is therefore read from ``/proc/self/status`` (``VmHWM``, the
# peak of this process's own address space), which the child resets to its
# current RSS (``/proc/self/clear_refs``) right before the call, so the peak
# is the call's peak. Elsewhere it falls back to ``ru_maxrss``.
#
# The child is ``python -c <_fresh_child's source>``: it imports only what the
# function needs (its module, plus ``imports``), measures its baseline RSS,
# runs the call, and reports. The timeline is sampled from OUTSIDE (psutil, in
# a thread of the caller), so sampling never steals the GIL from the call; it
# can miss spikes shorter than ``interval``, which the exact VmHWM peak cannot.

MIB = float(1 << 20)


def memory_now() -> dict[str, float]:
    """This process's memory in MiB: ``rss`` now, ``hwm`` (VmHWM, Linux) and ``maxrss`` (getrusage).

    ``maxrss`` is what ``worker_max_memory_per_child`` compares with its limit
    on Linux; in a process started by fork+exec it may include the parent's
    peak (see the note above), in a forked prefork child the fork's RSS.
    """
    import resource  # noqa: PLC0415
    import sys  # noqa: PLC0415

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss_b = maxrss if sys.platform == "darwin" else maxrss * 1024
    out = {"rss": math.nan, "hwm": math.nan, "maxrss": maxrss_b / MIB}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss" if line.startswith("VmRSS") else "hwm"
                    out[key] = int(line.split()[1]) * 1024 / MIB
    except OSError:  # not Linux
        import psutil  # noqa: PLC0415

        out["rss"] = psutil.Process().memory_info().rss / MIB
    return out


@dataclass
class FreshRun:
    """One call of a function in a fresh interpreter: its result, time and memory (bytes)."""

    result: Any
    seconds: float  # the call alone, wall clock, timed inside the child
    baseline: int  # RSS just before the call, after every import
    peak: int  # the process's peak RSS during the call
    peak_source: str  # "VmHWM" (reset before the call) or "ru_maxrss"
    pid: int
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (s since the call started, RSS)
    cpu_seconds: float = math.nan  # the call's CPU time (user + system): what a busy machine does not inflate

    @property
    def net(self) -> int:
        """Peak above the baseline: what the call itself added."""
        return max(self.peak - self.baseline, 0)

    def timeline_mib(self, net: bool = True) -> list[tuple[float, float]]:
        base = self.baseline if net else 0
        return [(t, (v - base) / MIB) for t, v in self.timeline]


def _fresh_child() -> None:  # pragma: no cover - runs as `python -c` in the child
    """The child's side: read the job from stdin, report on the fd named in argv[1]."""
    import gc
    import os
    import pickle
    import resource
    import sys
    import time
    import traceback

    out = int(sys.argv[1])
    job = pickle.loads(sys.stdin.buffer.read())
    sys.path[:] = job["sys_path"]

    def rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import psutil

            return psutil.Process().memory_info().rss

    def send(obj) -> None:
        data = pickle.dumps(obj)
        view = memoryview(data)
        while view:
            view = view[os.write(out, view):]

    try:
        for name in job["imports"]:
            __import__(name)
        if job["source"] is not None:
            namespace = {"__name__": "__labkit_fresh__"}
            exec(compile(job["source"], f"<{job['name']}>", "exec"), namespace)
            fn = namespace[job["name"]]
        else:
            fn = pickle.loads(job["fn"])
        args, kwargs = pickle.loads(job["args"])
        gc.collect()
        baseline = rss()
        source = "ru_maxrss"
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            source = "VmHWM"
        except OSError:
            pass
        os.write(out, b"S")
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        os.write(out, b"E")
        peak = 0
        if source == "VmHWM":
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) * 1024
        else:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = maxrss if sys.platform == "darwin" else maxrss * 1024
        send({"result": result, "seconds": seconds, "cpu": cpu, "baseline": baseline,
              "peak": max(peak, baseline), "source": source, "pid": os.getpid()})
    except BaseException:
        send({"error": traceback.format_exc()})


def run_fresh(fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, *,
              imports: Sequence[str] = (), interval: float | None = 0.02, timeout: float = 300.0) -> FreshRun:
    """Call ``fn(*args, **kwargs)`` in a fresh Python interpreter; time it, measure its memory.

    ``fn`` is sent by reference (it must be importable, like a lesson module's
    function) — or, when it was defined in a notebook (``__main__``), as its
    source code, re-run in the child: such a function must import what it
    uses inside its own body. ``imports`` are modules loaded *before* the
    baseline is taken (e.g. ``["lxml.etree"]``), so their code does not count
    as the call's memory. ``interval`` (s) samples RSS from outside for a
    timeline; ``None`` skips it. The result must be picklable.
    """
    import inspect  # noqa: PLC0415
    import os  # noqa: PLC0415
    import pickle  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    import textwrap  # noqa: PLC0415
    import threading  # noqa: PLC0415

    import psutil  # noqa: PLC0415

    name = getattr(fn, "__name__", "fn")
    if getattr(fn, "__module__", None) == "__main__":
        source, fn_bytes = textwrap.dedent(inspect.getsource(fn)), None
    else:
        source, fn_bytes = None, pickle.dumps(fn)
    job = pickle.dumps({
        "sys_path": [p if p else os.getcwd() for p in sys.path], "imports": list(imports), "name": name,
        "source": source, "fn": fn_bytes, "args": pickle.dumps((tuple(args), dict(kwargs or {}))),
    })
    child_code = textwrap.dedent(inspect.getsource(_fresh_child)) + "\n_fresh_child()\n"
    samples: list[tuple[float, int]] = []
    marks: dict[str, float] = {}
    chunks: list[bytes] = []
    with tempfile.TemporaryFile() as log:
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", child_code, str(write_fd)], stdin=subprocess.PIPE,
                stdout=log, stderr=log, pass_fds=(write_fd,), close_fds=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        done = threading.Event()

        def _read() -> None:  # b"S" when the call starts, b"E" when it returns, then the pickled reply
            with os.fdopen(read_fd, "rb", buffering=0) as fh:
                for mark in ("start", "end"):
                    byte = fh.read(1)
                    if byte != mark[0].upper().encode():
                        chunks.append(byte)
                        break
                    marks[mark] = time.perf_counter()
                while block := fh.read(1 << 16):
                    chunks.append(block)
            done.set()

        def _sample() -> None:
            try:
                p = psutil.Process(proc.pid)
                while not done.is_set():
                    samples.append((time.perf_counter(), p.memory_info().rss))
                    done.wait(interval)
            except psutil.Error:  # the child has exited
                pass

        threads = [threading.Thread(target=_read, daemon=True)]
        if interval:
            threads.append(threading.Thread(target=_sample, daemon=True))
        for t in threads:
            t.start()
        try:
            proc.stdin.write(job)
            proc.stdin.close()
            if not done.wait(timeout):
                raise TimeoutError(f"{name} did not finish within {timeout} s in the fresh process")
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            done.set()
            for t in threads:
                t.join(timeout=5)
        log.seek(0)
        output = log.read().decode(errors="replace")
    if not chunks:
        raise RuntimeError(f"{name}: the fresh process exited with {proc.returncode} and sent nothing:\n{output[-3000:]}")
    reply = pickle.loads(b"".join(chunks))
    if "error" in reply:
        raise RuntimeError(f"{name} failed in the fresh process:\n{reply['error']}{output[-2000:]}")
    start, end = marks.get("start", 0.0), marks.get("end", 0.0)
    timeline = [(0.0, reply["baseline"])]
    timeline += [(t - start, v) for t, v in samples if start <= t <= end]
    return FreshRun(reply["result"], reply["seconds"], reply["baseline"], reply["peak"], reply["source"],
                    reply["pid"], timeline, reply["cpu"])


def peak_rss(fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, *,
             label: str = "", repeat: int = 1, net: bool = True, imports: Sequence[str] = (),
             interval: float | None = None, timeout: float = 300.0) -> Measurement:
    """Peak RSS of ``fn(*args, **kwargs)`` in a fresh interpreter, ``repeat`` times (MiB).

    ``net=True`` (the default) reports the peak minus the baseline RSS the
    fresh process had just before the call — what the call itself needed —
    and ``net=False`` the whole process's peak; ``meta`` holds both either
    way, plus the baselines, the call's wall and CPU seconds and the last result. With
    ``interval`` the last run's sampled timeline is attached.
    """
    runs = [run_fresh(fn, args, kwargs, imports=imports, interval=interval, timeout=timeout)
            for _ in range(repeat)]
    meta = {
        "net": net, "peak_source": runs[-1].peak_source, "result": runs[-1].result,
        "baseline_mib": [r.baseline / MIB for r in runs], "peak_mib": [r.peak / MIB for r in runs],
        "net_mib": [r.net / MIB for r in runs], "seconds": [r.seconds for r in runs],
        "cpu_seconds": [r.cpu_seconds for r in runs],
        "pids": [r.pid for r in runs],
    }
    return Measurement(
        label or getattr(fn, "__name__", "fn"), "peak RSS above baseline" if net else "peak RSS", "MiB",
        meta["net_mib"] if net else meta["peak_mib"], stat="median",
        timeline=runs[-1].timeline_mib(net) if interval else None, meta=meta,
    )


def memory_timeline(fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                    *, label: str = "", interval: float = 0.02, net: bool = True,
                    imports: Sequence[str] = (), timeout: float = 300.0) -> Measurement:
    """:func:`peak_rss` of one run with its RSS sampled every ``interval`` s (``timeline``, MiB)."""
    return peak_rss(fn, args, kwargs, label=label, net=net, imports=imports, interval=interval, timeout=timeout)
