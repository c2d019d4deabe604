"""Cold start of a whole LocalCluster vs one bare ``celery worker`` reaching ping.

    python bench/cluster_start.py [--runs 5]

Prints the median (and range) of N cold starts to all-ready for Redis +
ZooKeeper + 2 prefork workers, the same for a single ``celery worker`` started
with default flags (gossip, mingle and heartbeat on) until it answers a
control ping, and the ratio of the two. Not run in CI: it prints figures, it
does not assert them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from labkit import LocalCluster


def cluster_start() -> float:
    t0 = time.perf_counter()
    c = LocalCluster(workers=2, zookeeper=1, reuse=False)
    elapsed = time.perf_counter() - t0
    c.close()
    return elapsed


def bare_worker_start(broker: LocalCluster) -> float:
    env = dict(os.environ, LABKIT_REDIS_URL=broker.redis_url, LABKIT_CLUSTER=broker.id)
    hostname = f"bare{time.monotonic_ns()}@bench"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "labkit.worker_app:app", "worker", "--hostname", hostname,
         "--loglevel", "WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        while not broker.app.control.ping(destination=[hostname], timeout=0.1, limit=1):
            if proc.poll() is not None:
                raise RuntimeError("the bare worker exited during start-up")
        return time.perf_counter() - t0
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def summary(name: str, samples: list[float]) -> str:
    return f"{name:<42} median {statistics.median(samples):5.2f} s  (min {min(samples):.2f}, max {max(samples):.2f}, n={len(samples)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    full = [cluster_start() for _ in range(args.runs)]
    with LocalCluster(workers=0, zookeeper=0, reuse=False) as broker:
        bare = [bare_worker_start(broker) for _ in range(args.runs)]
    print(summary("LocalCluster (redis + zookeeper + 2 workers)", full))
    print(summary("one bare `celery worker` (default flags)", bare))
    print(f"ratio cluster / bare worker: {statistics.median(full) / statistics.median(bare):.2f}")


if __name__ == "__main__":
    main()
