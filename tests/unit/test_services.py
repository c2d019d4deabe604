"""Command lines, environments and argument checks: what a service *would* run, without running it."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit.app import merge_settings
from labkit.cluster import LocalCluster
from labkit.faketime import skew_environment
from labkit.services.base import ServiceError, free_port, log_tail
from labkit.services.beat import BeatService
from labkit.services.redis import RedisService
from labkit.services.worker import WorkerService, WorkerSpec


def worker(tmp_path: Path, **spec) -> WorkerService:
    return WorkerService(name="w1", run_dir=tmp_path, cluster_id="lkt", redis_url="redis://127.0.0.1:1/0",
                         spec=WorkerSpec(name="w1", **spec))


def test_worker_command_carries_every_option(tmp_path):
    cmd = worker(tmp_path, queues=("short", "long"), concurrency=3, prefetch_multiplier=1,
                 max_tasks_per_child=5, soft_time_limit=2, time_limit=3, events=True).command()
    text = " ".join(cmd)
    for part in ("--hostname w1@lkt", "--queues short,long", "--concurrency 3", "--prefetch-multiplier 1",
                 "--max-tasks-per-child 5", "--soft-time-limit 2", "--time-limit 3", "--task-events",
                 "--without-gossip", "--without-mingle", "--without-heartbeat"):
        assert part in text, part


def test_solo_pool_has_no_concurrency_and_autoscale_is_max_comma_min(tmp_path):
    assert "--concurrency" not in worker(tmp_path, pool="solo").command()
    assert "4,1" in worker(tmp_path, autoscale=(1, 4)).command()


def test_worker_environment_names_the_cluster_and_its_local_disk(tmp_path):
    env = worker(tmp_path, env={"EXTRA": "1"}).environment()
    assert env["LABKIT_REDIS_URL"] == "redis://127.0.0.1:1/0" and env["LABKIT_WORKER_NAME"] == "w1"
    assert env["LABKIT_LOCAL_DIR"] == str(tmp_path / "local" / "w1") and env["EXTRA"] == "1"
    assert "LD_PRELOAD" not in env


@pytest.mark.parametrize(("field", "value", "message"), [
    ("pool", "gevent", "pool must be one of"),
    ("concurrency", 0, "concurrency must be >= 1"),
    ("queues", (), "at least one queue"),
    ("clock_offset", float("nan"), "clock_offset must be a finite"),
])
def test_worker_spec_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        WorkerSpec(name="w1", **{field: value})


def test_worker_spec_names_unknown_options():
    with pytest.raises(TypeError, match="unknown worker option"):
        WorkerSpec.from_options("w1", concurency=2)


def test_beat_command_and_describe(tmp_path):
    beat = BeatService(name="beat", run_dir=tmp_path, cluster_id="lkt", redis_url="redis://x:1/0",
                       scheduler="labkit.lessons.clocks:StampingScheduler", clock_offset=-20)
    cmd = " ".join(beat.command())
    assert " beat " in f" {cmd} " and "--scheduler labkit.lessons.clocks:StampingScheduler" in cmd
    assert "--max-interval 1" in cmd and "clock -20 s" in beat.describe()


def test_redis_command_binds_loopback_without_persistence(tmp_path):
    cmd = RedisService(name="redis", run_dir=tmp_path, port=6399, binary="/bin/redis").command()
    text = " ".join(cmd)
    assert "--bind 127.0.0.1" in text and "--port 6399" in text and "--appendonly no" in text


def test_an_occupied_port_is_refused_before_starting(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServiceError, match="already in use"):
            RedisService(name="redis", run_dir=tmp_path).claim_port(port)
    assert isinstance(free_port(), int)


def test_service_error_quotes_command_log_and_remedy(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("\n".join(f"line {i}" for i in range(30)))
    text = str(ServiceError("redis", "exited", command=["redis-server", "--port", "1"], log=log, remedy="fix it"))
    assert "redis: exited" in text and "redis-server --port 1" in text and "line 29" in text
    assert "line 10" not in text and "remedy: fix it" in text
    assert log_tail(tmp_path / "missing.log") == []


def test_settings_merge_one_level_deep():
    merged = merge_settings({"a": 1, "opts": {"x": 1, "y": 1}}, {"opts": {"y": 2}}, None, {"b": 3})
    assert merged == {"a": 1, "b": 3, "opts": {"x": 1, "y": 2}}


def test_skew_environment_preloads_libfaketime_only_when_skewed():
    assert skew_environment(0) == {}
    env = skew_environment(30)
    if env:  # libfaketime installed
        assert "faketime" in env["LD_PRELOAD"] and env["FAKETIME"].startswith("+30")


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"workers": -1}, "workers must be >= 0"),
    ({"workers": True}, "workers must be a count"),
    ({"zookeeper": -2}, "zookeeper must be"),
    ({"workers": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"workers": [{"name": "redis"}]}, "reserved"),
    ({"redis_port": 70000}, "redis_port must be"),
    ({"include": "labkit.lessons.herd"}, "include must be a list"),
])
def test_bad_cluster_arguments_fail_before_touching_the_disk(kwargs, error, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RUN_ROOT", str(tmp_path))
    with pytest.raises((ValueError, TypeError), match=error):
        LocalCluster(reuse=False, **kwargs)
    assert list(tmp_path.iterdir()) == [], "a rejected cluster left a run directory behind"


def test_labkit_down_prunes_ownerless_and_empty_run_dirs(tmp_path, monkeypatch):
    import json
    import os
    import time

    from labkit.cli import _prune_run_dirs

    monkeypatch.setenv("LABKIT_RUN_ROOT", str(tmp_path))
    dead = tmp_path / "lkdead-1"
    dead.mkdir()
    (dead / "cluster.json").write_text(json.dumps({"owner_pid": 2**22 + 12345}))
    empty_old = tmp_path / "lkempty-1"
    empty_old.mkdir()
    os.utime(empty_old, (time.time() - 3600, time.time() - 3600))
    starting = tmp_path / "lknew-1"
    starting.mkdir()  # young and without a state file: a cluster being created right now
    live = tmp_path / "lklive-1"
    live.mkdir()
    (live / "cluster.json").write_text(json.dumps({"owner_pid": os.getpid()}))
    assert _prune_run_dirs(keep=set()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lklive-1", "lknew-1"]


def test_heartbeats_are_off_unless_a_worker_asks_for_them(tmp_path):
    assert "--without-heartbeat" in worker(tmp_path).command()
    cmd = " ".join(worker(tmp_path, heartbeat=2).command())
    assert "--heartbeat-interval 2" in cmd and "--without-heartbeat" not in cmd
    with pytest.raises(ValueError, match="heartbeat must be"):
        WorkerSpec(name="w1", heartbeat=0.5)


def test_cluster_events_turn_on_task_events_unless_a_worker_says_no():
    specs = LocalCluster.check_options([{"name": "a"}, {"name": "b", "events": False}], events=True)
    assert [s.events for s in specs] == [True, False]
    assert [s.events for s in LocalCluster.check_options(2)] == [False, False]
    with pytest.raises(TypeError, match="events must be"):
        LocalCluster.check_options(1, events="yes")


def test_flower_binds_loopback_and_keeps_its_password_off_the_command_line(tmp_path):
    from labkit.services.flower import FlowerService

    flower = FlowerService(name="flower", run_dir=tmp_path, cluster_id="lkt", redis_url="redis://x:1/0", port=5599)
    cmd = " ".join(flower.command())
    assert "--address=127.0.0.1" in cmd and "--port=5599" in cmd and "--enable_events=False" in cmd
    assert flower.password not in cmd
    assert flower.environment()["FLOWER_BASIC_AUTH"] == f"labkit:{flower.password}"
    assert flower.auth == ("labkit", flower.password) and flower.url == "http://127.0.0.1:5599"
