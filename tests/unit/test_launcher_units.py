"""The preloaded launcher and ZooKeeper's class archive: which worker may be forked, which flags a JVM gets.

Pure decisions only: nothing here starts a process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from labkit.app import lesson_modules
from labkit.services import class_archive, zygote
from labkit.services.launcher import (
    FD_ENV,
    LauncherService,
    fresh_reason,
    include_of,
    preload_enabled,
    startup_variable,
)
from labkit.services.worker import WorkerService, WorkerSpec

LESSONS = lesson_modules()
BASE = {"HOME": "/root", "PATH": "/usr/bin", "LANG": "C.UTF-8", "LABKIT_CLUSTER": "lkt", "PYTHONUNBUFFERED": "1"}


def worker_env(**extra: str) -> dict[str, str]:
    return {**BASE, "LABKIT_WORKER_NAME": "w1", "LABKIT_INCLUDE": ",".join(LESSONS), **extra}


# --------------------------------------------------------------------------- which workers are forked


def test_an_ordinary_worker_is_forked():
    assert fresh_reason(worker_env(), {**BASE, FD_ENV: "5"}, preloaded=LESSONS) is None


def test_a_clock_offset_needs_a_fresh_interpreter():
    reason = fresh_reason(worker_env(), BASE, preloaded=LESSONS, clock_offset=30)
    assert reason is not None and "LD_PRELOAD" in reason and "+30" in reason


@pytest.mark.parametrize("name", ["LD_PRELOAD", "PYTHONPATH", "PYTHONHASHSEED", "MALLOC_ARENA_MAX", "TZ",
                                  "LC_ALL", "LANG", "GLIBC_TUNABLES", "FAKETIME"])
def test_changing_a_start_up_variable_needs_a_fresh_interpreter(name):
    reason = fresh_reason(worker_env(**{name: "changed"}), BASE, preloaded=LESSONS)
    assert reason is not None and name in reason and "interpreter starts" in reason


def test_changing_a_variable_a_preloaded_module_read_at_import_needs_a_fresh_interpreter():
    env = worker_env(AUTOSCALE_KEEPALIVE="1.5", EXTRA="1")
    assert fresh_reason(env, BASE, preloaded=LESSONS, env_read=["HOME"]) is None  # nobody read those two
    reason = fresh_reason(env, BASE, preloaded=LESSONS, env_read=["HOME", "AUTOSCALE_KEEPALIVE"])
    assert reason is not None and "AUTOSCALE_KEEPALIVE" in reason and "EXTRA" not in reason


def test_a_narrower_include_list_needs_a_fresh_interpreter_a_wider_one_does_not():
    narrow = worker_env(LABKIT_INCLUDE="labkit.lessons.welcome")
    reason = fresh_reason(narrow, BASE, preloaded=LESSONS)
    assert reason is not None and "leaves out" in reason and "labkit.lessons.queues" in reason
    wider = worker_env(LABKIT_INCLUDE=",".join([*LESSONS, "labkit.lessons.does_not_exist"]))
    assert fresh_reason(wider, BASE, preloaded=LESSONS) is None  # the child imports the extra one itself


def test_start_up_variables_and_defaults():
    assert startup_variable("LD_LIBRARY_PATH") and startup_variable("PYTHONPATH") and startup_variable("TZ")
    assert not startup_variable("LABKIT_SETTINGS") and not startup_variable("AUTOSCALE_KEEPALIVE")
    assert include_of({}) == LESSONS and include_of({"LABKIT_INCLUDE": "a,b"}) == ["a", "b"]
    assert preload_enabled({}) and preload_enabled({"LABKIT_PRELOAD": "1"})
    assert not any(preload_enabled({"LABKIT_PRELOAD": v}) for v in ("0", "no", "false", "OFF"))


def test_a_worker_says_why_it_starts_fresh_without_starting_the_launcher(tmp_path, monkeypatch):
    fake = tmp_path / "libfaketime.so.1"
    fake.write_bytes(b"")
    monkeypatch.setenv("LABKIT_LIBFAKETIME", str(fake))
    launcher = LauncherService(name="launcher", run_dir=tmp_path, cluster_id="lkt", include=LESSONS)

    def worker(**spec) -> WorkerService:
        return WorkerService(name="w1", run_dir=tmp_path, cluster_id="lkt", redis_url="redis://127.0.0.1:1/0",
                             include=LESSONS, spec=WorkerSpec(name="w1", **spec), launcher=launcher)

    assert worker().fresh_reason(start=False) is None
    assert "clock_offset" in worker(clock_offset=-5).fresh_reason(start=False)
    assert "PYTHONPATH" in worker(env={"PYTHONPATH": "/elsewhere"}).fresh_reason(start=False)
    assert "LABKIT_PRELOAD=0" in WorkerService(name="w2", run_dir=tmp_path).fresh_reason(start=False)
    assert launcher.proc is None, "deciding must not start the launcher"


def test_launcher_command_runs_the_zygote_with_the_include_list(tmp_path):
    launcher = LauncherService(name="launcher", run_dir=tmp_path, include=["a.b", "c"])
    cmd = launcher.command()
    assert cmd[1:3] == ["-m", "labkit.services.zygote"] and cmd[-1] == "a.b,c"
    assert launcher.environment()["PYTHONUNBUFFERED"] == "1"
    assert launcher.describe() == "preloading"


# --------------------------------------------------------------------------- what the zygote preloads


def test_the_zygote_never_preloads_what_depends_on_one_worker():
    assert "labkit.worker_app" in zygote.NEVER  # builds the app from the environment: after the fork
    assert "celery.worker.autoscale" not in zygote.PRELOAD  # reads AUTOSCALE_KEEPALIVE at import


def test_env_reads_are_recorded_and_the_recorder_removed(monkeypatch):
    monkeypatch.setenv("LABKIT_TEST_READ", "x")
    with zygote.EnvReads() as reads:
        assert os.environ.get("LABKIT_TEST_READ") == "x"
        assert os.getenv("LABKIT_TEST_MISSING") is None
        assert "LABKIT_TEST_IN" not in os.environ
    os.environ.get("LABKIT_TEST_AFTER")
    assert {"LABKIT_TEST_READ", "LABKIT_TEST_MISSING", "LABKIT_TEST_IN"} <= reads.names
    assert "LABKIT_TEST_AFTER" not in reads.names
    assert not reads.snapshots


def test_a_copy_of_the_whole_environment_is_a_snapshot_not_a_read(monkeypatch):
    monkeypatch.setenv("LABKIT_TEST_COPIED", "x")
    with zygote.EnvReads() as reads:
        copied = dict(os.environ.items())
        also = os.environ.copy()
    assert copied["LABKIT_TEST_COPIED"] == also["LABKIT_TEST_COPIED"] == "x"
    assert "LABKIT_TEST_COPIED" not in reads.names
    assert reads.snapshots == {__name__}


# --------------------------------------------------------------------------- ZooKeeper's class archive


def fake_java(tmp_path: Path, version: str) -> str:
    home = tmp_path / f"jdk-{version}"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "java").write_text("")
    (home / "release").write_text(f'IMPLEMENTOR="Test"\nJAVA_VERSION="{version}"\n')
    return str(home / "bin" / "java")


def test_java_feature_releases():
    assert class_archive.feature("17.0.15") == 17 and class_archive.feature("1.8.0_392") == 8
    assert class_archive.feature("21") == 21 and class_archive.feature("") == 0


def test_the_archive_is_built_at_exit_then_mapped(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path / "cache"))
    java = fake_java(tmp_path, "17.0.15")
    jar = tmp_path / "zookeeper.jar"
    jar.write_bytes(b"not really a jar")
    flags, tmp = class_archive.jvm_flags(java, str(jar))
    assert tmp is not None and flags[0] == f"-XX:ArchiveClassesAtExit={tmp}"
    tmp.write_bytes(b"archive")
    assert not class_archive.adopt(tmp, -9) and not tmp.exists()  # SIGKILLed: nothing adopted
    flags, tmp = class_archive.jvm_flags(java, str(jar))
    tmp.write_bytes(b"archive")
    assert class_archive.adopt(tmp, 143)  # SIGTERM: the JVM exits normally, having written it
    flags, tmp = class_archive.jvm_flags(java, str(jar))
    assert tmp is None and flags == [f"-XX:SharedArchiveFile={class_archive.archive_path(java, str(jar))}"]


def test_the_archive_name_changes_with_the_jars_and_is_off_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path))
    java = fake_java(tmp_path, "17.0.15")
    jar = tmp_path / "zookeeper.jar"
    jar.write_bytes(b"one")
    first = class_archive.archive_path(java, str(jar))
    jar.write_bytes(b"two, longer")
    assert class_archive.archive_path(java, str(jar)) != first
    assert class_archive.archive_path(fake_java(tmp_path, "11.0.2"), str(jar)) is None  # no dynamic archives
    monkeypatch.setenv("LABKIT_ZK_CDS", "0")
    assert class_archive.archive_path(java, str(jar)) is None
    assert class_archive.jvm_flags(java, str(jar)) == ([], None)
