"""From defining a task to running it on every worker: ``cluster.define`` measured end to end.

    python bench/define_task.py [--runs 15] [--workers 2]

Each run redefines one module (a new constant, so a stale pool process would
answer with the old one), then calls the task once on every worker through
its ``worker_direct`` queue and waits for all answers. Prints the median and
range of (a) ``define()`` alone — the kernel, Redis and every worker's
remote-control reply, pool renewed — and (b) define plus the first call
answered by every worker with the new value, with the machine's load. Not run
in CI: it prints figures, it does not assert them (the target is a median of
(b) of at most 1.5 s with 2 workers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from celery.utils.nodenames import worker_direct

from labkit import LocalCluster

SOURCE = """
from celery import shared_task

@shared_task
def stamp(x):
    return x * VERSION

VERSION = {version}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    defined_in, runnable_in = [], []
    load = os.getloadavg()[0]
    with LocalCluster(workers=args.workers, zookeeper=0, settings={"worker_direct": True}, reuse=False) as c:
        c.define(SOURCE.format(version=0))  # warm-up: first import in every process
        for version in range(1, args.runs + 1):
            t0 = time.perf_counter()
            defined = c.define(SOURCE.format(version=version))
            t1 = time.perf_counter()
            calls = [defined.stamp.apply_async((1,), queue=worker_direct(w.hostname)) for w in c.workers.values()]
            answers = [r.get(timeout=60) for r in calls]
            t2 = time.perf_counter()
            if answers != [version] * len(calls):
                raise SystemExit(f"run {version}: a worker answered with old code: {answers}")
            defined_in.append(t1 - t0)
            runnable_in.append(t2 - t0)
    load = max(load, os.getloadavg()[0])
    for label, values in (("define() returned", defined_in), ("runnable on every worker", runnable_in)):
        print(f"{label:26} median {statistics.median(values):.3f} s  "
              f"(min {min(values):.3f}, max {max(values):.3f}; n={len(values)}, {args.workers} workers)")
    print(f"load average (1 min) up to {load:.2f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
