"""Workers forked from the cluster's preloaded launcher keep every promise a fresh worker made.

Own session and process group, recorded with the guard, the cluster's mark
in /proc, their own environment and log, pool children, a readable error
when they cannot start — and the workers that must be a fresh interpreter
are started as one.
"""

from __future__ import annotations

import os
import textwrap

import psutil
import pytest

from labkit import LocalCluster, ServiceError, Status
from labkit.app import lesson_modules
from labkit.lessons.welcome import add, where
from labkit.poll import poll_until
from labkit.testing import assert_no_leftovers

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def forked():
    with LocalCluster(workers=2, zookeeper=0, reuse=False) as c:
        yield c


def test_workers_are_forked_and_keep_the_process_contract(forked):
    launcher = forked.service("launcher")
    recorded = {int(x) for x in (forked.run_dir / "pgids").read_text().split()}
    assert launcher.pid in recorded
    assert len(os.listdir(f"/proc/{launcher.pid}/task")) == 1, "the launcher must stay single-threaded"
    for name, worker in forked.workers.items():
        assert worker.started_as == "fork"
        assert psutil.Process(worker.pid).ppid() == launcher.pid
        assert os.getsid(worker.pid) == worker.pid and os.getpgid(worker.pid) == worker.pid
        assert worker.pid in recorded
        assert psutil.Process(worker.pid).environ()["LABKIT_CLUSTER"] == forked.id
        assert len(forked.children(name)) == 2
        assert f"{worker.hostname} ready" in worker.log_path.read_text()
    reply = forked.task(where).apply_async(queue="celery").get(timeout=20)
    assert reply["worker"] in forked.workers and reply["pid"] in forked.children(reply["worker"])
    assert {row["name"]: row.get("started_as") for row in forked.status()}["w1"] == "fork"


def test_kill_pause_restart_and_children_work_on_a_forked_worker(forked):
    child = forked.children("w1")[0]
    assert forked.kill("w1", child=0) == child
    assert poll_until(lambda: child not in forked.children("w1") and len(forked.children("w1")) == 2, 15)
    forked.pause("w2")
    assert forked.ping(timeout=0.5)["w2"] is False
    forked.resume("w2")
    assert forked.ping(timeout=3)["w2"] is True
    old = forked.service("w1").pid
    forked.kill("w1")
    assert forked.service("w1").state == Status.KILLED and forked.service("w1").proc.returncode == -9
    forked.restart("w1")
    assert forked.service("w1").pid != old and forked.service("w1").started_as == "fork"
    assert forked.task(add).delay(2, 2).get(timeout=20) == 4


def test_a_forked_worker_that_cannot_import_its_include_list_reports_its_log(forked):
    include = ",".join([*lesson_modules(), "labkit.lessons.does_not_exist"])  # wider: still forked
    with pytest.raises(ServiceError) as err:
        forked.add_worker("broken", env={"LABKIT_INCLUDE": include})
    text = str(err.value)
    assert "broken" in text and "celery" in text and "does_not_exist" in text
    assert "exited with code" in text and "LABKIT_PRELOAD=0" in text
    assert "broken" not in forked.workers


def test_killing_the_launcher_takes_its_workers_with_it(forked):
    pids = [w.pid for w in forked.workers.values()]
    forked.kill("launcher")
    assert poll_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                      for p in pids), 10), "parent-death signal"
    assert poll_until(lambda: all(w.observed_state() == Status.EXITED for w in forked.workers.values()), 5)
    forked.restart("w1")  # a new launcher is started on demand
    assert forked.service("launcher").alive() and forked.ping(timeout=3)["w1"] is True


def test_workers_that_need_a_fresh_interpreter_are_started_as_one():
    workers = [{"name": "plain"},
               {"name": "skewed", "clock_offset": 5},
               {"name": "logged", "env": {"KOMBU_LOG_CONNECTION": "1"}},  # kombu reads it at import
               {"name": "narrow", "env": {"LABKIT_INCLUDE": "labkit.lessons.welcome"}}]
    with LocalCluster(workers=workers, zookeeper=0, reuse=False) as c:
        started = {name: w.started_as for name, w in c.workers.items()}
        assert started["plain"] == "fork"
        assert started["skewed"].startswith("exec: clock_offset +5")
        assert started["logged"].startswith("exec:") and "KOMBU_LOG_CONNECTION" in started["logged"]
        assert started["narrow"].startswith("exec:") and "leaves out" in started["narrow"]
        assert c.ping(timeout=3) == dict.fromkeys(started, True)
    assert_no_leftovers(c.id, what="a cluster of forked and exec'd workers")


def test_without_preloading_every_worker_is_a_fresh_interpreter(monkeypatch):
    monkeypatch.setenv("LABKIT_PRELOAD", "0")
    with LocalCluster(workers=1, zookeeper=0, reuse=False) as c:
        assert c.launcher is None and "launcher" not in {s["name"] for s in c.status()}
        assert c.service("w1").started_as.startswith("exec:")
        assert c.task(add).delay(1, 2).get(timeout=20) == 3


def test_a_module_that_starts_a_thread_at_import_stops_the_launcher(tmp_path, monkeypatch):
    (tmp_path / "labkit_threaded_at_import.py").write_text(textwrap.dedent("""
        import threading, time
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    """))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(ServiceError) as err:
        LocalCluster(workers=1, zookeeper=0, reuse=False,
                     include=[*lesson_modules(), "labkit_threaded_at_import"])
    text = str(err.value)
    assert "launcher" in text and "started threads" in text and "LABKIT_PRELOAD=0" in text
