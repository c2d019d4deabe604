"""labkit's pytest plugin in real pytest sessions (subprocesses): cost, sharing, workers, errors.

The example project ``examples/my_tasks`` is run by ``make test`` itself.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from labkit.testing import leftover_processes

pytestmark = pytest.mark.cluster


def _pytest(project: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=project, capture_output=True, text=True, timeout=timeout)


def _project(tmp_path: Path, files: dict[str, str], ini: str = "") -> Path:
    (tmp_path / "pytest.ini").write_text("[pytest]\n" + textwrap.dedent(ini))
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def test_the_plugin_costs_nothing_unless_asked(tmp_path):
    project = _project(tmp_path, {"test_plain.py": """
        import sys

        def test_nothing_heavy_was_imported(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("labkit")
            loaded = [m for m in ("celery", "redis", "kombu", "labkit.cluster", "psutil") if m in sys.modules]
            assert not loaded, loaded
        """})
    proc = _pytest(project)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_modules_with_the_same_options_share_one_cluster(tmp_path):
    shared = """
        import pytest
        from labkit.lessons.welcome import add

        def test_cluster(labkit_cluster, labkit_app):
            assert add.delay(1, 2).get(timeout=20) == 3
            with open("ids.txt", "a") as fh:
                fh.write(f"{__name__} {labkit_cluster.id}\\n")
        """
    other = """
        import pytest
        pytestmark = pytest.mark.labkit(workers=[{"name": "solo1", "pool": "solo"}])

        def test_cluster(labkit_cluster):
            assert list(labkit_cluster.workers) == ["solo1"]
            with open("ids.txt", "a") as fh:
                fh.write(f"{__name__} {labkit_cluster.id}\\n")

        @pytest.mark.labkit_worker(concurrency=1, soft_time_limit=5)
        def test_extra_worker(labkit_cluster, labkit_worker):
            from labkit.lessons.welcome import add
            assert labkit_worker.queue == labkit_worker.name
            assert labkit_worker.send(add, 2, 2).get(timeout=20) == 4
            assert labkit_worker.name in labkit_cluster.workers

        def test_extra_worker_is_gone(labkit_cluster):
            assert list(labkit_cluster.workers) == ["solo1"]
        """
    project = _project(tmp_path, {"test_a.py": shared, "test_b.py": shared, "test_c.py": other},
                       ini="labkit_max_idle = 1\nlabkit_include = labkit.lessons.welcome\n")
    proc = _pytest(project, "-p", "no:randomly")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = dict(line.split() for line in (project / "ids.txt").read_text().splitlines())
    assert ids["test_a"] == ids["test_b"] != ids["test_c"], ids
    assert not leftover_processes(timeout=10)


def test_a_marker_on_one_test_is_refused_with_a_remedy(tmp_path):
    project = _project(tmp_path, {"test_wrong.py": """
        import pytest

        @pytest.mark.labkit(workers=2)
        def test_it(labkit_cluster):
            pass
        """})
    proc = _pytest(project)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "must be set on the module" in proc.stdout + proc.stderr
