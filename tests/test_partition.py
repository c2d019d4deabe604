"""Partitions (a relay per worker) and Redis Sentinel: the fault kit lessons 10 and 15 build on.

A partitioned worker cannot reach Redis; healed, it serves again; a test that
fails, or an owner that dies, in the middle of a partition leaves nothing
running. With ``redis="sentinel"`` killing the primary promotes the replica
and every client (kernel, worker) follows it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from celery.exceptions import TimeoutError as ResultTimeout

from labkit import LocalCluster, ServiceError
from labkit.lessons import welcome
from labkit.poll import poll_until
from labkit.services.relay import RelayService
from labkit.testing import assert_no_leftovers, leftover_processes


# ----------------------------------------------------------------------------- unit (no process)
def test_relay_command_and_bad_modes_are_named(tmp_path):
    relay = RelayService(name="w1-relay", run_dir=tmp_path, target_port=6379, port=7000, control_port=7001)
    assert relay.command()[-3:] == ["7000", "6379", "7001"]
    assert relay.url == "redis://127.0.0.1:7000/0"
    with pytest.raises(ValueError, match="mode must be one of"):
        relay.set_mode("drop")


def test_sentinel_and_relay_do_not_mix():
    with pytest.raises(ValueError, match="relay=True needs redis='single'"):
        LocalCluster.check_options([{"name": "w1", "relay": True}], redis="sentinel")
    with pytest.raises(ValueError, match="redis must be one of"):
        LocalCluster.check_options(1, redis="cluster")


# ----------------------------------------------------------------------------- relay
@pytest.fixture(scope="module")
def cut():
    workers = [{"name": "w1", "relay": True, "queues": ["w1q"], "concurrency": 1},
               {"name": "w2", "concurrency": 1}]
    with LocalCluster(workers=workers, zookeeper=0, reuse=False) as c:
        yield c


@pytest.mark.cluster
@pytest.mark.parametrize("mode", ["hold", "reset"])
def test_a_partitioned_worker_cannot_reach_redis_and_serves_again_when_healed(cut, mode):
    assert cut.ping() == {"w1": True, "w2": True}
    stats = cut.partition("w1", mode)
    try:
        assert stats["mode"] == mode
        assert cut.ping(timeout=1.0) == {"w1": False, "w2": True}
        result = cut.task(welcome.where).apply_async(queue="w1q")
        with pytest.raises(ResultTimeout):
            result.get(timeout=1.5)  # the task waits in Redis: w1 cannot fetch it
        assert cut.task(welcome.where).delay().get(timeout=10)["worker"] == "w2"  # the rest still works
    finally:
        cut.heal("w1")
    assert result.get(timeout=30)["worker"] == "w1"
    assert poll_until(lambda: cut.ping(timeout=1.0)["w1"], 30)


@pytest.mark.cluster
def test_a_slow_link_delays_and_heal_removes_the_delay(cut):
    cut.slow_link("w1", 0.3)
    try:
        slow = cut.task(welcome.where).apply_async(queue="w1q")
        assert slow.get(timeout=30)["worker"] == "w1"
        assert cut._relay("w1").stats()["delay"] == 0.3
    finally:
        cut.heal("w1")
    assert cut._relay("w1").stats()["delay"] == 0.0


@pytest.mark.cluster
def test_partitioning_a_worker_without_a_relay_says_how_to_get_one(cut):
    with pytest.raises(ServiceError, match=r"relay=True"):
        cut.partition("w2")
    with pytest.raises(KeyError, match="no worker"):
        cut.partition("nobody")


@pytest.mark.cluster
def test_a_test_that_fails_mid_partition_leaves_nothing():
    with pytest.raises(RuntimeError, match="boom"), \
            LocalCluster(workers=[{"name": "w1", "relay": True}], zookeeper=0, reuse=False) as c:
        cluster_id = c.id
        c.partition("w1")
        raise RuntimeError("boom")
    assert_no_leftovers(cluster_id, what="a cluster closed mid-partition")


OWNER = """
import json, time
from labkit import LocalCluster
c = LocalCluster(workers=[{"name": "w1", "relay": True}], zookeeper=0, reuse=False)
c.partition("w1")
print(json.dumps({"id": c.id}), flush=True)
time.sleep(600)
"""


@pytest.mark.cluster
def test_an_owner_killed_mid_partition_leaves_nothing():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(owner.stdout.readline())
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        left = leftover_processes(info["id"], timeout=10)
        assert not left, f"alive after the owner was SIGKILLed mid-partition: {[p.pid for p in left]}"
    finally:
        owner.kill()
        owner.wait()


# ----------------------------------------------------------------------------- sentinel
@pytest.mark.cluster
def test_sentinel_promotes_the_replica_and_clients_follow():
    with LocalCluster(workers=1, zookeeper=0, redis="sentinel", reuse=False) as c:
        assert c.redis_url.startswith("sentinel://") and c.redis_url.count("sentinel://") == 3
        kept = c.redis_client()
        kept.set("before-failover", 1)
        old = c.sentinel.primary()
        assert old == ("127.0.0.1", c.redis.port)
        c.kill("redis")
        new = poll_until(lambda: (p := c.sentinel.primary()) != old and p, 30, 0.2)
        assert new == ("127.0.0.1", c.sentinel.replica.port), new
        assert c.redis_client().get("before-failover") == b"1"  # replicated before the kill
        assert c.task(welcome.add).delay(2, 3).get(timeout=30) == 5  # the worker followed too
        assert poll_until(lambda: kept.ping(), 10)
    assert_no_leftovers(c.id, what="a sentinel cluster")


def test_sentinel_group_config_and_urls(tmp_path):
    from labkit.services.redis import RedisService
    from labkit.services.sentinel import sentinel_group

    primary = RedisService(name="redis", run_dir=tmp_path, port=6390)
    group = sentinel_group(primary, tmp_path, "lkt")
    assert [s.name for s in group.services] == ["replica", "sentinel1", "sentinel2", "sentinel3"]
    assert group.replica.command()[-3:] == ["--replicaof", "127.0.0.1", "6390"]
    assert group.url.count("sentinel://127.0.0.1:") == 3 and group.url.count(";") == 2
    assert group.settings()["broker_transport_options"] == {"master_name": "labkit"}
    s1 = group.sentinels[0]
    s1.prepare()
    conf = s1.config_path.read_text()
    assert "sentinel monitor labkit 127.0.0.1 6390 2" in conf and "bind 127.0.0.1" in conf
    assert s1.command()[-1] == "--sentinel"
