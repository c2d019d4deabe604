"""Memory and time of one function call, measured in a fresh Python interpreter.

Used by the memory lessons (01, 09) and by anyone who asks "how much memory
does this call need?" — ``peak_rss(fn, args)`` returns a
:class:`~labkit.measure.Measurement` in MiB.

Why a fresh interpreter, and why not ``ru_maxrss`` there: a fork of the
notebook kernel starts with the kernel's whole heap, so its RSS says more
about the notebook's history than about the function. A ``spawn``-ed child
is clean, but on Linux its ``getrusage().ru_maxrss`` is NOT: the kernel keeps
the high-water mark across ``fork``/``vfork`` + ``exec``, so a child started
from a 600 MiB notebook reports ru_maxrss >= 600 MiB before doing anything.
The peak below is therefore read from ``/proc/self/status`` (``VmHWM``, the
peak of this process's own address space), which the child resets to its
current RSS (``/proc/self/clear_refs``) right before the call, so the peak
is the call's peak. Elsewhere it falls back to ``ru_maxrss``.

The child is ``python -c <_fresh_child's source>``: it imports only what the
function needs (its module, plus ``imports``), measures its baseline RSS,
runs the call, and reports. The timeline is sampled from OUTSIDE (psutil, in
a thread of the caller), so sampling never steals the GIL from the call; it
can miss spikes shorter than ``interval``, which the exact VmHWM peak cannot.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .measure import Measurement

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
