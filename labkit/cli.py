"""``labkit``: doctor | up | status | down (and data, for lessons that generate files).

* ``labkit doctor`` — what labkit finds (versions, paths) and the exact remedy
  for anything missing; exit 1 when something required is missing.
* ``labkit up`` — a cluster in the foreground until Ctrl-C; ``--json`` prints
  one JSON object (``redis_url``, ``zk_hosts``, ...) for scripts.
* ``labkit status`` — clusters running on this machine (from their state files).
* ``labkit down`` — stop them all (or one, by id).
* ``labkit preflight`` — for instructors: doctor, then every lesson notebook
  (``--lessons 01,12``; ``--quick`` at their defaults), an HTML report and
  an exit status (:mod:`labkit.preflight`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

CHECKS = ("python", "redis-server", "java", "zookeeper", "libfaketime", "rabbitmq", "packages")
#: found or not, these do not fail `labkit doctor`: only `make test`'s browser test needs them
FOR_TESTS = ("chromium", "playwright")


def _doctor_rows() -> list[tuple[str, bool, str, str]]:
    """(what, ok, found, remedy) for each requirement."""
    from .services import redis as r  # noqa: PLC0415
    from .services import zookeeper as z  # noqa: PLC0415

    rows = []
    rows.append(("python", sys.version_info >= (3, 10), f"{sys.version.split()[0]} at {sys.executable}",
                 "use Python 3.10 or newer"))
    binary = r.find_redis_server()
    if binary:
        try:
            rows.append(("redis-server", True, f"{r.redis_version(binary)} at {binary}", ""))
        except Exception as exc:  # a binary that does not run
            rows.append(("redis-server", False, f"{binary} does not run: {exc}", r.REMEDY))
    else:
        rows.append(("redis-server", False, "not found", r.REMEDY))
    java = z.find_java()
    rows.append(("java", bool(java), java or "not found", "sudo apt-get install default-jre-headless"))
    cp = z.find_zookeeper_classpath()
    if cp and java:
        try:
            rows.append(("zookeeper", True, f"{z.zookeeper_version(cp, java)} ({cp})", ""))
        except Exception as exc:
            rows.append(("zookeeper", False, f"{cp} does not run: {exc}", z.REMEDY))
    else:
        rows.append(("zookeeper", False, cp or "not found", z.REMEDY))
    from .faketime import find_libfaketime  # noqa: PLC0415

    lib = find_libfaketime()
    rows.append(("libfaketime", bool(lib), lib or "not found",
                 "sudo apt-get install libfaketime (needed by the clock-skew lesson)"))
    from .services import rabbitmq as q  # noqa: PLC0415

    install = q.find_rabbitmq()
    if install is None:
        rows.append(("rabbitmq", False, "not found (rabbitmq-server, with Erlang's erl and epmd)", q.REMEDY))
    elif not install.erl_call:
        rows.append(("rabbitmq", False, f"{install.version}, but no erl_call", q.REMEDY))
    else:
        rows.append(("rabbitmq", True, f"{install.version} at {install.home} (erl {install.erl})", ""))
    versions = []
    missing = []
    for pkg in ("celery", "kombu", "redis", "kazoo", "jupyterlab", "nbval"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(pkg)
    rows.append(("packages", not missing, ", ".join(versions) + (f"; missing {missing}" if missing else ""),
                 "pip install -e '.[dev]' (make setup does it)"))
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    found = browser or "not found"
    if browser:
        with contextlib.suppress(Exception):
            import subprocess  # noqa: PLC0415

            found = subprocess.run([browser, "--version"], capture_output=True, text=True,
                                   timeout=20).stdout.strip() + f" at {browser}"
    rows.append(("chromium", bool(browser), found,
                 "sudo apt-get install chromium (make test installs it; only the browser test needs it)"))
    try:
        rows.append(("playwright", True, f"playwright {importlib.metadata.version('playwright')} "
                     "(drives the system chromium)", ""))
    except importlib.metadata.PackageNotFoundError:
        rows.append(("playwright", False, "not installed", "pip install -e '.[dev]' (make setup does it)"))
    return rows


def cmd_doctor(args: argparse.Namespace) -> int:
    rows = _doctor_rows()
    bad = [r for r in rows if not r[1] and r[0] not in FOR_TESTS]
    if not args.quiet or bad:
        for what, ok, found, remedy in rows:
            mark = "ok " if ok else ("absent" if what in FOR_TESTS else "MISSING")
            print(f"{mark:8} {what:13} {found}")
            if not ok:
                print(f"{'':8} {'':13} remedy: {remedy}")
    if args.quiet and not bad:
        print("labkit doctor: all requirements found")
    return 1 if bad else 0


def _state_files() -> list[Path]:
    from .cluster import run_root  # noqa: PLC0415

    return sorted(run_root().glob("*/cluster.json"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clusters() -> list[dict]:
    out = []
    for path in _state_files():
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(path.read_text())
            state["owner_alive"] = _alive(int(state["owner_pid"]))
            out.append(state)
    return out


def cmd_status(args: argparse.Namespace) -> int:
    clusters = [c for c in _clusters() if c["owner_alive"]]
    if args.json:
        print(json.dumps(clusters, indent=1))
        return 0
    if not clusters:
        print("no labkit cluster is running")
        return 0
    for c in clusters:
        print(f"{c['id']}  owner pid {c['owner_pid']}  {c['state']}  redis {c['redis_url']}  zk {c['zk_hosts'] or '-'}")
        for s in c["services"]:
            print(f"    {s['name']:<8} {s['kind']:<9} pid={s['pid']}  {s['address']}")
    return 0


def _prune_run_dirs(keep: set[str]) -> int:
    """Remove run directories that no live owner claims: stale state files, or none at all.

    A run directory is kept when its state file names a live owner, or when it
    is younger than a minute and has no state file yet (a cluster starting).
    """
    from .cluster import run_root  # noqa: PLC0415

    removed = 0
    for path in run_root().iterdir():
        if not path.is_dir() or str(path) in keep:
            continue
        state = path / "cluster.json"
        owner_alive = False
        with contextlib.suppress(OSError, ValueError, KeyError):
            owner_alive = _alive(int(json.loads(state.read_text())["owner_pid"]))
        if owner_alive:
            continue
        if not state.exists() and time.time() - path.stat().st_mtime < 60:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def cmd_down(args: argparse.Namespace) -> int:
    from .poll import poll_until  # noqa: PLC0415
    from .services.base import labkit_processes  # noqa: PLC0415

    targets = [c for c in _clusters() if not args.id or c["id"] == args.id]
    for c in targets:
        if c["owner_alive"] and int(c["owner_pid"]) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(c["owner_pid"]), signal.SIGTERM)
            print(f"asked {c['id']} (owner pid {c['owner_pid']}) to close")
    poll_until(lambda: not labkit_processes(args.id or None), 10, 0.2)
    leftovers = labkit_processes(args.id or None)
    for p in leftovers:
        with contextlib.suppress(Exception):
            p.kill()
    if leftovers:
        print(f"killed {len(leftovers)} leftover process(es)")
    # run directories whose owner is gone (kept after a failed start, for its logs), and empty ones
    if args.id:
        stale = [c for c in targets if not c["owner_alive"]]
        for c in stale:
            shutil.rmtree(c["run_dir"], ignore_errors=True)
        removed = len(stale)
    else:
        removed = _prune_run_dirs(keep=set())
    if removed:
        print(f"removed {removed} stale run director{'y' if removed == 1 else 'ies'}")
    if not targets and not leftovers:
        print("no labkit cluster is running")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .cluster import LocalCluster  # noqa: PLC0415

    rabbit = {"broker": "rabbitmq", "rabbitmq_nodes": args.rabbitmq_nodes, "management": args.management} \
        if args.broker == "rabbitmq" else {}
    cluster = LocalCluster(workers=args.workers, zookeeper=args.zookeeper, reuse=False, **rabbit)

    def _stop(*_a) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        info = {
            "id": cluster.id, "redis_url": cluster.redis_url, "zk_hosts": cluster.zk_hosts,
            "broker_url": cluster.broker_url, "management_url": cluster.management_url,
            "workers": [w.hostname for w in cluster.workers.values()], "run_dir": str(cluster.run_dir),
            "started_in_s": round(cluster.started_in or 0, 2),
        }
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(cluster, flush=True)
            broker = f" LABKIT_BROKER_URL='{cluster.broker_url}'" if cluster.rabbitmq is not None else ""
            print(f"ready in {info['started_in_s']} s; export LABKIT_REDIS_URL={cluster.redis_url}"
                  f" LABKIT_ZK_HOSTS={cluster.zk_hosts}{broker}; Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.close()
        if not args.json:
            print("cluster closed", flush=True)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    try:
        from .data import main as data_main  # noqa: PLC0415
    except ImportError:
        print("labkit data: the data generator is not installed in this version", file=sys.stderr)
        return 2
    return data_main(args.rest)


def cmd_preflight(args: argparse.Namespace) -> int:
    from .preflight import main as preflight_main  # noqa: PLC0415

    return preflight_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="check what labkit needs")
    p.add_argument("--quiet", action="store_true", help="one line when everything is found")
    p.set_defaults(fn=cmd_doctor)
    p = sub.add_parser("up", help="run a cluster in the foreground until Ctrl-C")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--zookeeper", type=int, default=1, help="0 none, 1 standalone, N ensemble")
    p.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis",
                   help="the Celery broker (Redis stays the result backend)")
    p.add_argument("--rabbitmq-nodes", type=int, default=1, help="with --broker rabbitmq: N >= 2 for a cluster")
    p.add_argument("--management", action="store_true", help="with --broker rabbitmq: the management plugin")
    p.add_argument("--json", action="store_true", help="print one JSON object with the addresses")
    p.set_defaults(fn=cmd_up)
    p = sub.add_parser("status", help="list running clusters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("down", help="stop running clusters")
    p.add_argument("id", nargs="?", default="", help="one cluster id (default: all)")
    p.set_defaults(fn=cmd_down)
    p = sub.add_parser("data", help="generate lesson data (labkit data vehicle-sales --size 200MB --out F)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_data)
    p = sub.add_parser("preflight", help="run every lesson notebook and write an HTML report (instructors)")
    p.add_argument("--lessons", default="", help="comma-separated lesson numbers or names (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="run each notebook at its defaults (small) instead of its lesson's WORKSHOP values")
    p.add_argument("--report", default="labkit-preflight.html", help="the HTML report to write")
    p.add_argument("--json", action="store_true", help="print the report's data as JSON on stdout")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="notebooks run at once (default: 2 where there are 2 cores or more, so each "
                        "lesson also runs under another's load, as on a busy laptop; 1 runs them alone)")
    p.add_argument("--timeout", type=int, default=240, help="seconds one cell may run")
    p.add_argument("--notebooks", default=str(Path(__file__).resolve().parents[1] / "notebooks"),
                   help="the directory holding the lesson notebooks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_preflight)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
