"""Cold start of a whole LocalCluster vs one bare ``celery worker`` reaching ping.

    python bench/cluster_start.py [--runs 5] [--skip-rabbitmq]

Prints the median (and range) of N cold starts to all-ready for Redis +
ZooKeeper + 2 prefork workers, the same for a single ``celery worker`` started
with default flags (gossip, mingle and heartbeat on) until it answers a
control ping, and the ratio of the two. Then RabbitMQ: one fresh node from
spawn to a completed AMQP handshake as the kit starts it, the same node
started through Debian's stock ``rabbitmq-server`` script (same ports,
directories and epmd), and a three-node cluster (quorum-queue settings) to
all-ready. Not run in CI: it prints figures, it does not assert them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from labkit import LocalCluster
from labkit.poll import poll_until
from labkit.services.rabbitmq import amqp_handshake, find_rabbitmq


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


def summary(name: str, samples: list[float]) -> str:
    return f"{name:<42} median {statistics.median(samples):5.2f} s  (min {min(samples):.2f}, max {max(samples):.2f}, n={len(samples)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-rabbitmq", action="store_true", help="only the Redis/ZooKeeper cluster")
    args = parser.parse_args()
    full = [cluster_start() for _ in range(args.runs)]
    with LocalCluster(workers=0, zookeeper=0, reuse=False) as broker:
        bare = [bare_worker_start(broker) for _ in range(args.runs)]
    print(summary("LocalCluster (redis + zookeeper + 2 workers)", full))
    print(summary("one bare `celery worker` (default flags)", bare))
    print(f"ratio cluster / bare worker: {statistics.median(full) / statistics.median(bare):.2f}")
    if args.skip_rabbitmq:
        return
    kit = [rabbit_node_start() for _ in range(args.runs)]
    stock = [stock_script_start() for _ in range(args.runs)]
    three = [rabbit_cluster_start() for _ in range(args.runs)]
    print(summary("RabbitMQ node, kit start (AMQP handshake)", kit))
    print(summary("RabbitMQ node, stock rabbitmq-server script", stock))
    print(f"ratio kit / stock script: {statistics.median(kit) / statistics.median(stock):.2f}")
    print(summary("three-node RabbitMQ cluster, all ready", three))
    print(f"(load average when done: {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
