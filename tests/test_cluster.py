"""The cluster contract, on real processes: start, faults, errors, teardown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import celery.exceptions
import pytest
import redis.exceptions
from kazoo.client import KazooClient

from labkit import LocalCluster, ServiceError, Status
from labkit.cluster import run_root
from labkit.lessons.welcome import add, slow, where
from labkit.poll import poll_until
from labkit.services.base import labkit_processes
from labkit.testing import leftover_processes

pytestmark = pytest.mark.cluster


def test_lifecycle_and_idempotent_close():
    c = LocalCluster(workers=2, reuse=False)
    try:
        assert c.state == "running"
        assert {s["state"] for s in c.status()} == {"running"}
        assert c.redis_url.startswith("redis://127.0.0.1:")
        assert c.zk_hosts.startswith("127.0.0.1:")
        assert c.task(add).delay(2, 3).get(timeout=20) == 5
        assert c.ping() == {"w1": True, "w2": True}
        assert "w1" in repr(c) and "<table>" in c._repr_html_()
        assert len(labkit_processes(c.id)) >= 2 + 2 * 3  # redis, zk, 2 workers with 2 children each
    finally:
        c.close()
    c.close()  # idempotent
    assert c.state == "closed"
    assert not leftover_processes(c.id, timeout=5)
    assert not c.run_dir.exists()


def test_close_does_not_wait_for_celerys_cold_shutdown():
    """Closing kills the workers: what a clean stop would save (held messages) dies with the broker.

    A worker's cold shutdown is 1.5 s of fixed sleeps in Celery; every notebook
    and most tests close a cluster, so it added up to minutes of ``make test``.
    """
    c = LocalCluster(workers=3, zookeeper=1, reuse=False)
    try:
        t0 = time.perf_counter()
        c.service("w3").stop()  # one worker, stopped the clean way
        clean = time.perf_counter() - t0
    finally:
        t0 = time.perf_counter()
        c.close()  # everything else: two workers, Redis, ZooKeeper, the launcher
        closed = time.perf_counter() - t0
    assert closed < clean / 2, f"close() took {closed:.2f} s, a single worker's clean stop {clean:.2f} s"
    assert not leftover_processes(c.id, timeout=5)


def test_rerunning_the_start_cell_returns_the_running_cluster():
    first = LocalCluster(workers=1, zookeeper=0)
    try:
        again = LocalCluster(workers=1, zookeeper=0)
        assert again is first
        other = LocalCluster(workers=1, zookeeper=0, reuse=False)
        try:
            assert other is not first
        finally:
            other.close()
    finally:
        first.close()
    fresh = LocalCluster(workers=1, zookeeper=0)  # a closed cluster is never handed back
    try:
        assert fresh is not first and fresh.state == "running"
    finally:
        fresh.close()


def test_a_closed_clusters_app_is_no_longer_celerys_current_app():
    """Task objects resolve attributes in the current app; a closed cluster's made imports raise NotRegistered."""
    import celery

    outer = LocalCluster(workers=0, zookeeper=0, reuse=False)
    try:
        inner = LocalCluster(workers=0, zookeeper=0, reuse=False)
        assert {inner, outer} <= set(LocalCluster._instances.values()), "both are closed at exit"
        assert celery.current_app._get_current_object() is inner.app
        inner.close()
        assert celery.current_app._get_current_object() is outer.app, "the running cluster's app takes over"
    finally:
        outer.close()
    assert celery.current_app._get_current_object() not in (inner.app, outer.app)
    assert add.name == "welcome.add" and add.max_retries == 3  # the proxy resolves in a live app


def test_two_clusters_at_once_are_isolated():
    with LocalCluster(workers=1, zookeeper=0, reuse=False) as a, LocalCluster(workers=1, zookeeper=0, reuse=False) as b:
        assert a.redis_url != b.redis_url
        ra, rb = a.task(where).delay().get(timeout=20), b.task(where).delay().get(timeout=20)
        assert ra["pid"] in a.children("w1") and rb["pid"] in b.children("w1")
        a.redis_client().set("only-in-a", 1)
        assert b.redis_client().get("only-in-a") is None


def test_readiness_pings_from_more_threads_than_the_pool_holds_all_return(cluster):
    """Lesson 03 starts 11 workers, so 11 readiness probes ping at once.

    With the pings on the app's pool (10 connections, two held per control
    call) every thread waited for a second connection for ever and the cluster
    never started (CI, stop 20: a 240 s cell timeout).
    """
    n = cluster.app.conf.broker_pool_limit + 2
    host = cluster.service("w1").hostname
    barrier = threading.Barrier(n)
    answers: list[bool] = []

    def ping() -> None:
        barrier.wait()
        answers.append(cluster._ping_one(host, 2.0))

    threads = [threading.Thread(target=ping, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert answers == [True] * n, f"{n - len(answers)} of {n} pings never returned"


def test_worker_kill_pause_resume_restart(cluster):
    w1_pid = cluster.service("w1").pid
    child = cluster.children("w1")[0]
    assert cluster.kill("w1", child=0) == child
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (child in cluster.children("w1") or len(cluster.children("w1")) < 2):
        time.sleep(0.1)
    assert child not in cluster.children("w1") and len(cluster.children("w1")) == 2, "the pool replaces a killed child"

    cluster.pause("w2")
    assert cluster.ping(timeout=0.5)["w2"] is False
    cluster.resume("w2")
    assert cluster.ping(timeout=3)["w2"] is True

    cluster.kill("w1")
    assert cluster.service("w1").state == "killed"
    assert cluster.ping(timeout=0.5)["w1"] is False
    cluster.restart("w1")
    assert cluster.service("w1").pid != w1_pid
    assert cluster.ping(timeout=3)["w1"] is True
    assert cluster.task(add).delay(1, 1).get(timeout=20) == 2


def test_redis_restart_keeps_its_port(cluster):
    port = cluster.redis.port
    cluster.kill("redis")
    with pytest.raises(redis.exceptions.ConnectionError):
        cluster.redis_client(socket_connect_timeout=0.5).ping()
    cluster.restart("redis")
    assert cluster.redis.port == port and cluster.redis_client().ping()
    # restart() returns once the workers have reconnected: the cluster is usable at once
    assert cluster.ping(timeout=2) == {"w1": True, "w2": True}
    assert cluster.task(add).delay(4, 5).get(timeout=20) == 9


def test_after_a_redis_restart_the_kernel_listens_for_its_pending_results_again(cluster):
    """About one restart in ten, ``get()`` timed out on a task that had succeeded.

    The kernel's result subscriptions lived on a socket to the old server; the
    next ``SUBSCRIBE`` could vanish into it. Now the restart moves them.
    """
    pending = cluster.task(add).apply_async((1, 2), queue="no-worker-reads-this")  # subscribes now
    channel = f"celery-task-meta-{pending.id}"
    assert dict(cluster.redis_client().pubsub_numsub(channel)) == {channel.encode(): 1}
    cluster.kill("redis")
    cluster.restart("redis")
    assert dict(cluster.redis_client().pubsub_numsub(channel)) == {channel.encode(): 1}, \
        "nobody on the restarted Redis listens for the pending result"
    assert cluster.task(add).delay(4, 5).get(timeout=20) == 9


def test_a_caller_sees_a_killed_worker_as_a_lost_task():
    with LocalCluster(workers=1, zookeeper=0, reuse=False, settings={"task_acks_late": False}) as c:
        r = c.task(slow).delay(5)
        deadline = time.monotonic() + 10
        while r.state != "STARTED" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.state == "STARTED"
        c.kill("w1")
        with pytest.raises(celery.exceptions.TimeoutError):  # nobody will ever answer: the caller only sees a timeout
            r.get(timeout=2)
        assert r.state == "STARTED"


def test_three_node_ensemble_serves_a_lock_with_one_node_down():
    with LocalCluster(workers=0, zookeeper=3, reuse=False) as c:
        modes = sorted(zk.mode() for zk in c.zookeepers)
        assert modes == ["follower", "follower", "leader"]
        leader = next(zk.name for zk in c.zookeepers if zk.mode() == "leader")
        c.kill(leader)
        client = KazooClient(hosts=c.zk_hosts, timeout=10)
        client.start(timeout=30)
        try:
            lock = client.Lock("/labkit/test-lock", "tester")
            assert lock.acquire(timeout=30)
            lock.release()
        finally:
            client.stop()
            client.close()


# --------------------------------------------------------------------------- errors

def test_missing_binary_names_service_and_remedy(monkeypatch):
    monkeypatch.setenv("LABKIT_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(ServiceError) as err:
        LocalCluster(workers=0, zookeeper=0, reuse=False)
    text = str(err.value)
    assert "redis" in text and "/nonexistent/redis-server" in text and "remedy:" in text
    assert "apt-get install redis-server" in text


def test_a_binary_that_fails_quotes_command_and_log(monkeypatch, tmp_path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot open the data directory' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LABKIT_REDIS_SERVER", str(fake))
    with pytest.raises(ServiceError) as err:
        LocalCluster(workers=0, zookeeper=0, reuse=False)
    text = str(err.value)
    assert "exited with code 3" in text and str(fake) in text and "FATAL: cannot open the data directory" in text


def test_an_occupied_port_gives_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServiceError) as err:
            LocalCluster(workers=0, zookeeper=0, redis_port=port, reuse=False)
    text = str(err.value)
    assert f"127.0.0.1:{port} is already in use" in text and "remedy:" in text


def test_bad_parameters_are_rejected_before_anything_starts():
    with pytest.raises(ValueError, match="workers must be"):
        LocalCluster(workers=-1, reuse=False)
    with pytest.raises(ValueError, match="zookeeper must be"):
        LocalCluster(zookeeper=-2, reuse=False)
    with pytest.raises(ValueError, match="pool must be one of"):
        LocalCluster(workers=[{"pool": "bogus"}], reuse=False)
    with pytest.raises(TypeError, match="unknown worker option"):
        LocalCluster(workers=[{"concurency": 2}], reuse=False)


def test_a_worker_that_cannot_start_reports_its_log(cluster):
    with pytest.raises(ServiceError) as err:
        cluster.add_worker("broken", env={"LABKIT_INCLUDE": "labkit.lessons.does_not_exist"})
    text = str(err.value)
    assert "broken" in text and "celery" in text and "does_not_exist" in text
    assert "broken" not in cluster.workers


# --------------------------------------------------------------------------- teardown

OWNER = """
import json, sys, time
from labkit import LocalCluster
c = LocalCluster(workers=2, reuse=False)
print(json.dumps({"id": c.id, "pids": [s.pid for s in c.services]}), flush=True)
time.sleep(600)
"""


def test_sigkill_of_the_owner_leaves_nothing_behind(tmp_path):
    """...but the logs, where ``LABKIT_KEEP_LOGS`` asks for them: the guard copies them before it sweeps."""
    env = dict(os.environ, LABKIT_KEEP_LOGS=str(tmp_path))
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        info = json.loads(owner.stdout.readline())
        assert len(labkit_processes(info["id"])) >= 4
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        time.sleep(5)
        left = labkit_processes(info["id"])
        assert not left, f"alive 5 s after the owner was SIGKILLed: {[(p.pid, p.name()) for p in left]}"
        kept = {f.name for f in (tmp_path / info["id"]).glob("*.log")}
        assert {"redis.log", "w1.log", "w2.log"} <= kept, f"logs kept: {sorted(kept)}"
        assert not list(run_root().glob(f"{info['id']}-*")), "the run directory outlived its owner"
    finally:
        owner.kill()
        owner.wait()


def test_close_keeps_the_logs_where_asked(tmp_path, monkeypatch):
    """A failure read after the close (CI's notebook runs) needs the logs the run directory took with it."""
    monkeypatch.setenv("LABKIT_KEEP_LOGS", str(tmp_path))
    c = LocalCluster(workers=1, zookeeper=0, reuse=False)
    c.task(add).delay(1, 1).get(timeout=20)
    c.close()
    assert not c.run_dir.exists()
    worker_log = tmp_path / c.id / "w1.log"
    assert worker_log.exists() and "ready" in worker_log.read_text(), sorted(os.listdir(tmp_path / c.id))


def test_cli_doctor_up_status_down():
    doctor = subprocess.run([sys.executable, "-m", "labkit.cli", "doctor"], capture_output=True, text=True)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "redis-server" in doctor.stdout and "zookeeper" in doctor.stdout
    up = subprocess.Popen([sys.executable, "-m", "labkit.cli", "up", "--workers", "1", "--json"],
                          stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(up.stdout.readline())
        assert info["redis_url"].startswith("redis://127.0.0.1:") and info["zk_hosts"].startswith("127.0.0.1:")
        status = subprocess.run([sys.executable, "-m", "labkit.cli", "status"], capture_output=True, text=True)
        assert info["id"] in status.stdout
        down = subprocess.run([sys.executable, "-m", "labkit.cli", "down", info["id"]], capture_output=True, text=True)
        assert down.returncode == 0
        assert up.wait(20) == 0
        assert not leftover_processes(info["id"], timeout=5)
    finally:
        up.kill()
        up.wait()


def test_attach_to_a_running_cluster(cluster, monkeypatch):
    from labkit import attach

    monkeypatch.setenv("LABKIT_REDIS_URL", cluster.redis_url)
    monkeypatch.setenv("LABKIT_ZK_HOSTS", cluster.zk_hosts)
    with attach() as remote:
        assert remote.task(add).delay(20, 22).get(timeout=20) == 42
        assert set(cluster.workers) <= set(remote.ping(timeout=2))
        assert remote.zk().exists("/") is not None
        assert not hasattr(remote, "kill"), "fault injection is a LocalCluster's alone"
    assert remote.state == Status.CLOSED


@pytest.fixture(params=["local", "attached"])
def client(request, cluster):
    """The same cluster, seen as its owner and as an attached client."""
    from labkit import attach

    if request.param == "local":
        yield cluster
    else:
        with attach(cluster.redis_url, cluster.zk_hosts) as remote:
            yield remote


def test_client_api_is_the_same_local_or_attached(client, cluster):
    from labkit import ClusterLike

    assert isinstance(client, ClusterLike)
    assert client.task(add).delay(1, 2).get(timeout=20) == 3
    assert client.task("welcome.add") is client.task(add)
    with pytest.raises(KeyError, match="no task 'nope'"):
        client.task("nope")
    assert client.ping(timeout=2) == {name: True for name in cluster.workers}  # short names, both kinds
    r = client.redis_client()
    assert r.ping() and r.set("client-api", 1)
    zk = client.zk()
    zk.stop()  # a lost session: zk() hands out a working client again
    assert client.zk().connected and client.zk().exists("/") is not None


def test_a_beat_is_a_service_of_the_cluster():
    schedule = {"tick": {"task": "welcome.add", "schedule": 0.5, "args": [1, 2]}}
    with LocalCluster(workers=1, zookeeper=0, reuse=False, settings={"beat_schedule": schedule}) as c:
        beat = c.add_beat()
        assert beat.state == Status.RUNNING and beat.pid in {int(x) for x in (c.run_dir / "pgids").read_text().split()}
        rows = {s["name"]: s for s in c.status()}
        assert rows["beat"]["kind"] == "beat" and rows["beat"]["state"] == "running"
        assert "beat" in c._repr_html_() and "beat" in repr(c)
        assert poll_until(lambda: "Sending due task tick" in c.logs("beat", 50), 15), c.logs("beat")
        with pytest.raises(ValueError, match="already exists"):
            c.add_beat()
        c.kill("beat")
        assert c.service("beat").state == Status.KILLED
        c.restart("beat")
        assert c.service("beat").alive()
    assert not leftover_processes(c.id, timeout=5)


def test_every_failed_start_is_reported_not_just_the_first():
    broken = [{"name": n, "env": {"LABKIT_INCLUDE": f"labkit.lessons.missing_{n}"}} for n in ("b1", "b2")]
    with pytest.raises(ServiceError) as err:
        LocalCluster(workers=broken, zookeeper=0, reuse=False, start_timeout=30)
    text = str(err.value)
    assert "2 services failed to start" in text and "missing_b1" in text and "missing_b2" in text


def test_a_probe_that_raises_is_quoted_in_the_readiness_error(tmp_path):
    from dataclasses import dataclass

    from labkit.services.base import Service

    @dataclass
    class Broken(Service):
        def command(self) -> list[str]:
            return ["sleep", "30"]

        def probe(self) -> bool:
            raise ValueError("the probe itself is buggy")

    service = Broken(name="broken", run_dir=tmp_path, cluster_id="lktest")
    with pytest.raises(ServiceError, match="probe last raised ValueError: the probe itself is buggy"):
        service.start(timeout=1)
    assert not service.alive() and service.state == Status.FAILED


def test_an_interrupt_during_start_reaches_the_caller_at_once(tmp_path):
    """Ctrl-C (or nbval's timeout) while a service is not ready yet must not wait for its probe.

    The readiness probes ran in a ``with ThreadPoolExecutor`` block, whose exit
    waited for every probe: up to ``start_timeout`` before the interrupt landed
    and the clean-up could stop anything.
    """
    from dataclasses import dataclass
    from types import SimpleNamespace

    from labkit.services.base import Service

    @dataclass
    class NeverReady(Service):
        def command(self) -> list[str]:
            return ["sleep", "60"]

        def probe(self) -> bool:
            return False

    service = NeverReady(name="never", run_dir=tmp_path, cluster_id="lktest")
    service.spawn()
    owner = SimpleNamespace(start_timeout=20.0)
    # SIGINT, as Ctrl-C and Jupyter send, addressed to the waiting thread (a process-wide signal
    # may land on any thread, and then not wake this one), with Python's own handler in place
    timer = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            LocalCluster._wait_all(owner, [service])
        waited = time.perf_counter() - t0
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
        service.stop()
    assert waited < owner.start_timeout / 4, f"the interrupt took {waited:.1f} s to arrive"
    assert poll_until(lambda: not any(t.name.startswith("labkit-ready") for t in threading.enumerate()), 10), \
        "a readiness probe outlived the stopped service"


def test_a_result_collected_after_close_does_not_reconnect(caplog):
    """A pending AsyncResult garbage-collected after close() must not retry the stopped Redis.

    Before the kernel's result consumer was detached on close, each such
    ``__del__`` retried the dead Redis 20 times, a second apart, inside the
    garbage collector.
    """
    import gc

    c = LocalCluster(workers=0, zookeeper=0, reuse=False)
    pending = [c.app.send_task("nobody.runs.this") for _ in range(3)]
    c.close()
    with caplog.at_level("ERROR", logger="celery.backends.redis"):
        del pending
        gc.collect()
    assert not [r for r in caplog.records if "Connection to Redis lost" in r.getMessage()]
