"""The cluster contract, on real processes: start, faults, errors, teardown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import celery.exceptions
import pytest
import redis.exceptions
from conftest import wait_no_leftovers
from kazoo.client import KazooClient

from labkit import LocalCluster, ServiceError
from labkit.lessons.welcome import add, slow, where
from labkit.services.base import labkit_processes


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
    assert not wait_no_leftovers(c.id, timeout=5)
    assert not c.run_dir.exists()


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


def test_two_clusters_at_once_are_isolated():
    with LocalCluster(workers=1, zookeeper=0, reuse=False) as a, LocalCluster(workers=1, zookeeper=0, reuse=False) as b:
        assert a.redis_url != b.redis_url
        ra, rb = a.task(where).delay().get(timeout=20), b.task(where).delay().get(timeout=20)
        assert ra["pid"] in a.children("w1") and rb["pid"] in b.children("w1")
        a.redis_client().set("only-in-a", 1)
        assert b.redis_client().get("only-in-a") is None


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


def test_sigkill_of_the_owner_leaves_nothing_behind():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(owner.stdout.readline())
        assert len(labkit_processes(info["id"])) >= 4
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        time.sleep(5)
        left = labkit_processes(info["id"])
        assert not left, f"alive 5 s after the owner was SIGKILLed: {[(p.pid, p.name()) for p in left]}"
    finally:
        owner.kill()
        owner.wait()


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
        assert not wait_no_leftovers(info["id"], timeout=5)
    finally:
        up.kill()
        up.wait()


def test_attach_to_a_running_cluster(cluster, monkeypatch):
    from labkit import attach

    monkeypatch.setenv("LABKIT_REDIS_URL", cluster.redis_url)
    monkeypatch.setenv("LABKIT_ZK_HOSTS", cluster.zk_hosts)
    with attach() as remote:
        assert remote.task(add).delay(20, 22).get(timeout=20) == 42
        assert {f"{n}@{cluster.id}" for n in cluster.workers} <= set(remote.ping(timeout=2))
        assert remote.zk().exists("/") is not None
        with pytest.raises(RuntimeError, match="needs a LocalCluster"):
            remote.kill("w1")
