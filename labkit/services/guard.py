"""The orphan guard: one tiny process per cluster that outlives a crashed owner.

Why it exists: when a notebook kernel is SIGKILLed (nbval's timeout, "Restart
kernel", the OOM killer) no ``atexit`` hook runs. ``PR_SET_PDEATHSIG`` takes
down each service's *leader*, but not what the leader forked (Celery's pool
children, a task's subprocess). The guard runs in its own session, polls its
parent every 0.2 s, and when the parent is gone it SIGKILLs every process
group recorded in the cluster's ``pgids`` file and every process that still
carries the cluster's environment mark, then exits.

Run as ``python -m labkit.services.guard OWNER_PID CLUSTER_ID RUN_DIR``.
It imports nothing outside the standard library so it starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time

ENV_MARK = b"LABKIT_CLUSTER="


def marked_pids(cluster_id: str) -> list[int]:
    """PIDs whose environment carries ``LABKIT_CLUSTER=cluster_id`` (read from /proc)."""
    needle = ENV_MARK + cluster_id.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            pids.append(int(entry))
    return pids


def sweep(cluster_id: str, run_dir: str) -> None:
    """Kill every recorded group and marked process of the cluster, twice over."""
    me = os.getpid()
    for _ in range(3):
        with contextlib.suppress(OSError), open(os.path.join(run_dir, "pgids")) as fh:
            for line in fh:
                if line.strip().isdigit():
                    with contextlib.suppress(OSError):
                        os.killpg(int(line), signal.SIGKILL)
        for pid in marked_pids(cluster_id):
            if pid != me:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def keep_logs(run_dir: str | os.PathLike, cluster_id: str) -> None:
    """Copy ``run_dir/logs`` to ``$LABKIT_KEEP_LOGS/<cluster id>/`` when that is set (before the run dir goes).

    A failure read only after the cluster is gone (a notebook run by CI, a
    verify cell that raised, a kernel killed by a timeout) needs the logs
    that explain it. Called by ``LocalCluster.close`` and by the guard.
    """
    keep = os.environ.get("LABKIT_KEEP_LOGS")
    logs = os.path.join(run_dir, "logs")
    if keep and os.path.isdir(logs):
        with contextlib.suppress(OSError):
            shutil.copytree(logs, os.path.join(keep, cluster_id), dirs_exist_ok=True)


def main(argv: list[str]) -> int:
    owner, cluster_id, run_dir = int(argv[0]), argv[1], argv[2]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # normal close: just go
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the owner's
    while os.getppid() == owner:
        time.sleep(0.2)
    sweep(cluster_id, run_dir)
    keep_logs(run_dir, cluster_id)  # the logs explain the death
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
