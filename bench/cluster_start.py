"""Cluster start-up, worker restart and add_worker, next to one bare ``celery worker`` — in one run.

    python bench/cluster_start.py [--runs 7] [--compare] [--skip-rabbitmq]

Prints, with the machine and its load average:

* the median (and range) of N cold starts to all-ready of a whole
  ``LocalCluster`` (Redis + ZooKeeper + 2 prefork workers) and the time each
  of its services took to become ready;
* the same for one bare ``celery worker`` with default flags (gossip, mingle
  and heartbeat on) until it answers a control ping, and the ratio of the two
  medians (cluster starts and bare starts alternate, so both see the same load);
* the medians of ``restart("w1")`` and ``add_worker()`` to ready;
* RabbitMQ: one fresh node from spawn to a completed AMQP handshake as the
  kit starts it, the same node through Debian's stock ``rabbitmq-server``
  script (same ports, directories and epmd), and a three-node cluster
  (quorum-queue settings) to all-ready (``--skip-rabbitmq`` leaves them out).

``--compare`` repeats the cluster figures with ``LABKIT_PRELOAD=0`` (every
worker a fresh interpreter, as before the preloaded launcher), interleaved
with the rest; ``--lessons`` adds cold starts of the biggest lesson clusters
(03: eleven workers, 09: six). Not run in CI: it prints figures, it does not
assert them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict

from labkit import LocalCluster
from labkit.poll import poll_until
from labkit.services.rabbitmq import amqp_handshake, find_rabbitmq


@contextlib.contextmanager
def preload(enabled: bool):
    """Run the body with the preloaded worker launcher on (the default) or off."""
    old = os.environ.get("LABKIT_PRELOAD")
    os.environ["LABKIT_PRELOAD"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LABKIT_PRELOAD", None)
        else:
            os.environ["LABKIT_PRELOAD"] = old


def cluster_start(ready: dict[str, list[float]]) -> float:
    t0 = time.perf_counter()
    c = LocalCluster(workers=2, zookeeper=1, reuse=False)
    elapsed = time.perf_counter() - t0
    for row in c.status():
        if row["ready_s"] is not None:
            ready[row["name"]].append(row["ready_s"])
    c.close()
    return elapsed


def lesson_start(config: dict) -> float:
    t0 = time.perf_counter()
    c = LocalCluster(**config, reuse=False)
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


def rabbit_node_start() -> float:
    """Spawn to AMQP handshake of one fresh node, as LocalCluster(broker="rabbitmq") starts it."""
    with LocalCluster(workers=0, zookeeper=0, broker="rabbitmq", reuse=False) as c:
        return c.rabbitmq_nodes[0].ready_seconds


def rabbit_cluster_start() -> float:
    t0 = time.perf_counter()
    c = LocalCluster(workers=0, zookeeper=0, broker="rabbitmq", rabbitmq_nodes=3, reuse=False)
    elapsed = time.perf_counter() - t0
    c.close()
    return elapsed


def stock_script_start() -> float:
    """The same fresh node through Debian's ``rabbitmq-server`` script (foreground), with the kit's epmd.

    The script execs ``erl`` without ``-sname``; RabbitMQ's prelaunch then
    starts a throw-away VM to make sure an epmd runs (here the kit's answers on
    ERL_EPMD_PORT, so the ``epmd -daemon`` it launches exits at once).
    """
    install = find_rabbitmq()
    script = str(install.home.parent.parent / "bin" / "rabbitmq-server") if install else "rabbitmq-server"
    holder = LocalCluster(workers=0, zookeeper=0, broker="rabbitmq", reuse=False, start=False)
    group = holder.rabbitmq
    try:
        group.epmd.start(10)
        node = group.nodes[0]
        node.prepare()
        (node.base / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{node.port}\n")
        env = dict(os.environ, **node.environment(), LABKIT_CLUSTER=holder.id)
        env.pop("RABBITMQ_ADVANCED_CONFIG_FILE")
        env.update(RABBITMQ_CONFIG_FILE=str(node.base / "rabbitmq.conf"),
                   ERL_LIBS="", RABBITMQ_PLUGINS_DIR=str(install.plugins) if install else "",
                   RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}")
        t0 = time.perf_counter()
        proc = subprocess.Popen([script], env=env, cwd=node.base, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            def ready() -> bool:
                try:
                    amqp_handshake(node.port)
                    return True
                except Exception:
                    return False

            if not poll_until(ready, 60, 0.05, alive=lambda: proc.poll() is None):
                raise RuntimeError("the stock script's node did not answer AMQP")
            return time.perf_counter() - t0
        finally:
            os.killpg(proc.pid, 9)
            proc.wait()
    finally:
        group.epmd.stop()
        holder.close()


def restarts_and_adds(runs: int) -> dict[str, list[float]]:
    """``restart("w1")`` of a live worker, of a killed one, and ``add_worker()``: ``runs`` times each, in turn.

    A live worker's restart is its cold shutdown (Celery's, at SIGQUIT) plus a start; after ``kill("w1")``
    (SIGKILL, what lessons do before they restart a worker) it is the start alone.
    """
    out: dict[str, list[float]] = defaultdict(list)
    with LocalCluster(workers=2, zookeeper=1, reuse=False) as c:
        for _ in range(runs):
            t0 = time.perf_counter()
            c.restart("w1")
            out["restart"].append(time.perf_counter() - t0)
            c.kill("w1")
            t0 = time.perf_counter()
            c.restart("w1")
            out["restart_killed"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            worker = c.add_worker()
            out["add"].append(time.perf_counter() - t0)
            c.remove_worker(worker.name)
    return out


def machine() -> str:
    model = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.node()}: {os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def summary(name: str, samples: list[float]) -> str:
    if not samples:
        return f"{name:<46} (no samples)"
    return (f"{name:<46} median {statistics.median(samples):5.2f} s  "
            f"(min {min(samples):.2f}, max {max(samples):.2f}, n={len(samples)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--compare", action="store_true",
                        help="also measure with LABKIT_PRELOAD=0 (every worker a fresh interpreter)")
    parser.add_argument("--lessons", action="store_true", help="also start lesson 03's and 09's clusters")
    parser.add_argument("--skip-rabbitmq", action="store_true", help="leave out the RabbitMQ figures")
    args = parser.parse_args()
    modes = [True, False] if args.compare else [True]
    print(f"machine: {machine()}")
    print(f"load average at start (1, 5, 15 min): {load()}")
    full: dict[bool, list[float]] = defaultdict(list)
    ready: dict[bool, dict[str, list[float]]] = {m: defaultdict(list) for m in modes}
    bare: list[float] = []
    again: dict[bool, dict[str, list[float]]] = {}
    with LocalCluster(workers=0, zookeeper=0, reuse=False) as broker:
        for _ in range(args.runs):
            for mode in modes:
                with preload(mode):
                    full[mode].append(cluster_start(ready[mode]))
            bare.append(bare_worker_start(broker))
    for mode in modes:
        with preload(mode):
            again[mode] = restarts_and_adds(args.runs)
    lessons: dict[tuple[str, bool], list[float]] = defaultdict(list)
    if args.lessons:
        from labkit.lessons import abusive_tasks, queues  # noqa: PLC0415

        configs = {"03 queues (11 workers)": queues.CLUSTER, "09 abusive tasks (6 workers)": abusive_tasks.CLUSTER}
        for _ in range(args.runs):
            for name, config in configs.items():
                for mode in modes:
                    with preload(mode):
                        lessons[(name, mode)].append(lesson_start(config))
    print(f"load average at end   (1, 5, 15 min): {load()}")
    print()
    for mode in modes:
        label = "" if not args.compare else (" [preloaded]" if mode else " [LABKIT_PRELOAD=0]")
        print(summary(f"LocalCluster (redis + zookeeper + 2 workers){label}", full[mode]))
        for name in sorted(ready[mode]):
            print(summary(f"  of which {name} ready after", ready[mode][name]))
    print(summary("one bare `celery worker` (default flags)", bare))
    for mode in modes:
        label = "" if not args.compare else (" [preloaded]" if mode else " [LABKIT_PRELOAD=0]")
        print(f"ratio cluster / bare worker{label}: {statistics.median(full[mode]) / statistics.median(bare):.2f}")
    for mode in modes:
        label = "" if not args.compare else (" [preloaded]" if mode else " [LABKIT_PRELOAD=0]")
        print(summary(f'restart("w1") to ready{label}', again[mode]["restart"]))
        print(summary(f'kill("w1"), then restart("w1") to ready{label}', again[mode]["restart_killed"]))
        print(summary(f"add_worker() to ready{label}", again[mode]["add"]))
    for (name, mode), samples in lessons.items():
        label = "" if not args.compare else (" [preloaded]" if mode else " [LABKIT_PRELOAD=0]")
        print(summary(f"lesson {name}{label}", samples))
    if args.skip_rabbitmq:
        return
    kit, stock, three = [], [], []
    for _ in range(args.runs):  # interleaved, so the three see the same load
        kit.append(rabbit_node_start())
        stock.append(stock_script_start())
        three.append(rabbit_cluster_start())
    print(summary("RabbitMQ node, kit start (AMQP handshake)", kit))
    print(summary("RabbitMQ node, stock rabbitmq-server script", stock))
    print(f"ratio kit / stock script: {statistics.median(kit) / statistics.median(stock):.2f}")
    print(summary("three-node RabbitMQ cluster, all ready", three))
    print(f"load average after RabbitMQ (1, 5, 15 min): {load()}")


if __name__ == "__main__":
    main()
