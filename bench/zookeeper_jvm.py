"""ZooKeeper's start-up with and without each JVM flag: wall time and CPU time to a served session.

    python bench/zookeeper_jvm.py [--runs 6]

Starts a standalone ZooKeeper N times per variant (variants interleaved, so
each sees the same load), each time until it reports a mode and serves a
kazoo session, and reads the JVM's CPU time (user + system, /proc) at that
moment. CPU time is what a loaded 2-core machine cannot hide; wall time is
what a lesson waits for. Variants start from labkit's command line and add
(``+flag``) or remove (``-flag``) one flag. The class-data-sharing archive
is built first if it is missing (one start that writes it at exit).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from labkit.services import class_archive
from labkit.services.base import free_port
from labkit.services.zookeeper import ZooKeeperService, kazoo_session_ok, zk_mode

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def command(add: list[str], remove: list[str], cds: bool) -> tuple[ZooKeeperService, list[str]]:
    zk = ZooKeeperService(name="zk", run_dir=Path(tempfile.mkdtemp(prefix="zkbench-")), port=free_port())
    zk.prepare()
    if zk._cds_building is not None:  # not measured with a half-built archive
        zk._cds_building.unlink(missing_ok=True)
        zk.jvm_cds, zk._cds_building = [], None
    if not cds:
        zk.jvm_cds = []
    cmd = [c for c in zk.command() if c not in remove]
    return zk, cmd[:1] + add + cmd[1:]


def start_once(add: list[str], remove: list[str], cds: bool = True) -> tuple[float, float]:
    zk, cmd = command(add, remove, cds)
    log = open(zk.run_dir / "zk.log", "w")  # noqa: SIM115 - closed below
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=zk.run_dir)
    try:
        while zk_mode(zk.port) is None:
            if proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited: {(zk.run_dir / 'zk.log').read_text()[-2000:]}")
            time.sleep(0.01)
        if not kazoo_session_ok(zk.hosts, timeout=10):
            raise RuntimeError("no kazoo session")
        return time.perf_counter() - t0, cpu_seconds(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()


def ensure_archive() -> None:
    zk = ZooKeeperService(name="zk", run_dir=Path(tempfile.mkdtemp(prefix="zkbench-")), port=free_port())
    zk.start()
    zk.stop()  # SIGTERM: the JVM writes the archive at exit, finish() moves it into place


VARIANTS = {
    "no flags (JDK defaults)": ([], ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"], False),
    "SerialGC + C1 only (before)": ([], [], False),
    "+ CICompilerCount=1": (["-XX:CICompilerCount=1"], [], False),
    "+ -UsePerfData": (["-XX:-UsePerfData"], [], False),
    "+ AppCDS archive (labkit's)": ([], [], True),
    "labkit's + -Xint": (["-Xint"], [], True),
    "labkit's + -Xss256k": (["-Xss256k"], [], True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    if class_archive.archive_path(*_java_and_classpath()) is not None:
        ensure_archive()
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in VARIANTS}
    for _ in range(args.runs):
        for name, (add, remove, cds) in VARIANTS.items():
            wall, cpu = start_once(add, remove, cds)
            results[name][0].append(wall)
            results[name][1].append(cpu)
    print(f"load average at end:   {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for name, (wall, cpu) in results.items():
        print(f"{name:<30} CPU median {statistics.median(cpu):.2f} s (min {min(cpu):.2f}, max {max(cpu):.2f})  "
              f"wall median {statistics.median(wall):.2f} s  n={len(cpu)}")


def _java_and_classpath() -> tuple[str, str]:
    from labkit.services.zookeeper import find_java, find_zookeeper_classpath  # noqa: PLC0415

    return find_java() or "java", find_zookeeper_classpath() or ""


if __name__ == "__main__":
    main()
