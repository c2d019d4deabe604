"""Per-process clock skew with libfaketime (used by ``WorkerSpec(clock_offset=...)``).

:func:`skew_environment` returns the environment variables that make one
process — and everything it forks, such as a worker's prefork pool — read a
wall clock ``offset`` seconds away from the true one::

    LD_PRELOAD=.../libfaketime.so.1   # intercepts clock_gettime, gettimeofday, time ...
    FAKETIME=+30s                     # relative offset: the clock keeps ticking, 30 s ahead
    FAKETIME_DISABLE_SHM=1            # no shared-memory segment per process
    FAKETIME_DONT_FAKE_MONOTONIC=1    # keep CLOCK_MONOTONIC true (see below)
    PYTHONPATH=<labkit/_faketime_site>:...  # a sitecustomize that repairs time.sleep

So ``time.time()``, ``datetime.now()``, ``app.now()`` and every log
timestamp in that process are shifted, while Redis, ZooKeeper and the
notebook kernel keep the true clock.

Why the two extra switches. Faking the monotonic clock too (libfaketime's
default) breaks CPython 3.11: a timed wait (``Event.wait(1)``,
``Lock.acquire(timeout=1)``, ``queue.get(timeout=1)``) computes its deadline
from the faked ``CLOCK_MONOTONIC`` but waits with ``sem_clockwait``, which
libfaketime does not intercept, so the kernel waits for a deadline decades
away: the worker hangs. Leaving the monotonic clock alone fixes that, but
then libfaketime's ``clock_nanosleep`` wrapper rejects CPython's absolute
monotonic deadline and ``time.sleep`` raises ``OSError: [Errno 22]``. The
``sitecustomize`` in ``labkit/_faketime_site`` replaces ``time.sleep`` in
such processes with an equivalent built on ``select()`` (relative timeout,
restarted on signals by CPython), which libfaketime passes through.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path

SITE_DIR = Path(__file__).resolve().parent / "_faketime_site"


def find_libfaketime() -> str | None:
    """Path of ``libfaketime.so.1`` (``$LABKIT_LIBFAKETIME`` first), or None."""
    explicit = os.environ.get("LABKIT_LIBFAKETIME")
    if explicit:
        return explicit
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    return found[0] if found else None


def faketime_spec(offset: float) -> str:
    """libfaketime's relative-offset syntax for ``offset`` seconds: ``+30s``, ``-12.5s``."""
    if not math.isfinite(offset):
        raise ValueError(f"clock offset must be a finite number of seconds, not {offset!r}")
    text = f"{offset:+.3f}".rstrip("0").rstrip(".")
    return f"{text}s"


def skew_environment(offset: float, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables that shift a process's wall clock by ``offset`` seconds.

    Returns ``{}`` for offset 0 (the process keeps the true clock).
    ``base`` is the environment the process would otherwise get (default:
    ``os.environ``); existing ``LD_PRELOAD`` and ``PYTHONPATH`` entries are kept.
    """
    if not offset:
        return {}
    spec = faketime_spec(offset)
    lib = find_libfaketime()
    if lib is None or not os.path.exists(lib):
        raise RuntimeError(
            "clock skew needs libfaketime (apt-get install libfaketime, or set LABKIT_LIBFAKETIME "
            "to the path of libfaketime.so.1)"
        )
    base = os.environ if base is None else base
    preload = " ".join(p for p in (lib, base.get("LD_PRELOAD", "")) if p)
    pythonpath = os.pathsep.join(p for p in (str(SITE_DIR), base.get("PYTHONPATH", "")) if p)
    return {
        "LD_PRELOAD": preload,
        "FAKETIME": spec,
        "FAKETIME_DISABLE_SHM": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "PYTHONPATH": pythonpath,
        "LABKIT_CLOCK_OFFSET": repr(float(offset)),
    }


def clock_offset() -> float:
    """The skew this process was started with (0.0 when it has the true clock)."""
    try:
        return float(os.environ.get("LABKIT_CLOCK_OFFSET", "0") or 0)
    except ValueError:
        return 0.0
