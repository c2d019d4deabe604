"""Lesson 14's pure parts: lock paths, the slide's own bugs, the cluster layout (no process started)."""

from __future__ import annotations

import pytest

from labkit.cluster import LocalCluster
from labkit.lessons import mutex


def test_fixed_lock_paths_are_keyed_escaped_and_never_collide():
    path = mutex.fixed_export.lock_path(("r", "a/b", 0.1), {})
    assert path == "/labkit/mutex/mutex.fixed_export/job=a%2Fb"
    assert mutex.fixed_export.lock_path(("r", "12", 0.1), {}) != mutex.fixed_export.lock_path(("r", "1", 0.1), {})
    assert mutex.fixed_export.lock_path(("r", 0, 0.1), {}).endswith("job=0")
    assert mutex.unkeyed_export.lock_path(("r", "a", 0.1), {}) == mutex.unkeyed_export.lock_path(("r", "b", 0.1), {})


def test_talk_paths_collide_and_drop_falsy_keys():
    talk = mutex.talk_export
    assert talk._get_node(("r", "", 0.1), {}) == f"{mutex.TALK_ROOT}/{talk.name}"
    assert talk._get_node(("r", "12", 0.1), {}).endswith("12")


def test_the_slides_mutex_keys_is_a_string_so_every_schedule_shares_one_node():
    assert isinstance(mutex.slide_export.mutex_keys, str)
    node = mutex.slide_export._get_node
    assert node(("r", "job-1", 0.1), {}) == node(("r", "job-2", 0.1), {}) == f"{mutex.TALK_ROOT}/mutex.slide_export"


def test_the_slides_after_return_cannot_find_its_node():
    """Celery calls after_return(status, retval, task_id, args, kwargs, einfo); the slide takes them as *args."""
    with pytest.raises(TypeError, match="positional arguments but 6 were given"):
        mutex.slide_export.after_return("SUCCESS", {}, "id", ("r", "job", 0.1), {}, None)


def test_the_slides_apply_async_needs_kwargs():
    with pytest.raises(TypeError, match="must be a mapping"):
        mutex.slide_export._get_node(("r", "job", 0.1), None)


def test_the_fix_does_not_set_abstract_but_the_slide_does():
    assert "abstract" not in vars(mutex.ZkMutexTask)
    assert vars(mutex.MutexTask)["abstract"] is True


def test_cluster_config_puts_the_session_timeout_on_the_victim_only():
    cfg = mutex.cluster_config(session_timeout=2.5)
    LocalCluster.check_options(**cfg)
    envs = {w["name"]: w.get("env", {}) for w in cfg["workers"]}
    assert envs["w3"] == {"LABKIT_ZK_SESSION_TIMEOUT": "2.5"} and not envs["w1"]
    with pytest.raises(ValueError, match="0.5-30"):
        mutex.cluster_config(session_timeout=0.1)
