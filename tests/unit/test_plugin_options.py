"""labkit's pytest plugin, the parts that start nothing: options, paths, the pool's bookkeeping."""

from __future__ import annotations

import os
import sysconfig

import pytest

from labkit import testing


class _Config:
    """Just enough of pytest.Config for ``cluster_options``."""

    def __init__(self, **ini):
        self.ini = {"labkit_cluster": "", "labkit_include": [], **ini}

    def getini(self, name):
        return self.ini[name]


def test_defaults_when_nothing_is_set():
    assert testing.cluster_options(_Config()) == testing.DEFAULT_OPTIONS


def test_ini_then_marker():
    config = _Config(labkit_cluster="{'workers': 2, 'settings': {'task_acks_late': True}}",
                     labkit_include=["labkit.lessons.welcome"])
    options = testing.cluster_options(config, pytest.mark.labkit(workers=3).mark)
    assert options == {"workers": 3, "zookeeper": 0, "settings": {"task_acks_late": True},
                       "include": ["labkit.lessons.welcome"]}


@pytest.mark.parametrize("text", ["{'workers': ", "[1, 2]", "workers=2"])
def test_a_bad_ini_setting_says_what_is_expected(text):
    with pytest.raises(pytest.UsageError, match="labkit_cluster must be"):
        testing.cluster_options(_Config(labkit_cluster=text))


def test_an_include_the_session_cannot_import_is_refused_early():
    with pytest.raises(pytest.UsageError, match="no_such_module_here"):
        testing.cluster_options(_Config(labkit_include=["no_such_module_here.tasks"]))


def test_the_marker_takes_keywords_only():
    with pytest.raises(pytest.UsageError, match="keyword arguments only"):
        testing.cluster_options(_Config(), pytest.mark.labkit({"workers": 2}).mark)


def test_worker_pythonpath_keeps_project_dirs_and_drops_the_installation(tmp_path):
    site = sysconfig.get_paths()["purelib"]
    paths = testing.worker_pythonpath([str(tmp_path), site, sysconfig.get_paths()["stdlib"], "", str(tmp_path),
                                       str(tmp_path / "missing")])
    assert paths == [os.path.realpath(tmp_path)]


def test_an_empty_pool_closes_quietly():
    pool = testing.ClusterPool()
    assert pool.ids() == set()
    pool.close()
