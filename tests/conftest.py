"""Shared fixtures and the suite's two guarantees.

* **No leaks.** After every test module, no process this session started is
  still running (:func:`labkit.testing.assert_no_leftovers`), except the
  clusters labkit's pytest plugin keeps for the session (``labkit_cluster``;
  the kit sets ``labkit_max_idle = 0``, so it keeps none between modules).
* **The fast tier starts nothing.** Tests are marked ``cluster`` (real
  processes) or ``notebook`` (runs a notebook); the rest are unit tests, and
  ``make quick`` runs just those. A unmarked test that tries to start a
  process fails at once, so the fast tier stays fast and honest.

``make test`` runs the suite on two pytest-xdist workers. A test module
stays on one worker (its module-scoped cluster starts once); notebook runs
are spread one by one (:func:`pytest_xdist_make_scheduler`).
"""

from __future__ import annotations

import subprocess

import pytest

from labkit import testing

PROCESS_MARKERS = ("cluster", "notebook")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--nb-cell-timeout", type=int, default=240,
        help="seconds one notebook cell may run under nbval before the kernel is killed",
    )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """One work unit per test module, except notebook runs, which are spread one by one.

    A module's tests share its module-scoped cluster and sometimes its state
    (an IPython shell), so they stay together and in order on one worker.
    (xdist's ``loadgroup`` would do this with marks, but it renames node ids,
    which pytest 9.2 no longer allows.)
    """
    from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415

    class ModulesAndNotebooks(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path.endswith("test_notebooks.py") else path

    return ModulesAndNotebooks(config, log)


@pytest.fixture(scope="module")
def cluster(labkit_clusters: testing.ClusterPool):
    """Two prefork workers and a standalone ZooKeeper, for one test module (closed when it ends)."""
    with labkit_clusters.use(workers=2, zookeeper=1) as c:
        yield c


@pytest.fixture(autouse=True, scope="module")
def _no_leaked_processes(request: pytest.FixtureRequest, labkit_clusters: testing.ClusterPool):
    yield
    testing.assert_no_leftovers(what=request.module.__name__, ignore=labkit_clusters.ids())


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    if any(request.node.get_closest_marker(m) for m in PROCESS_MARKERS):
        return

    def refuse(self, args, *a, **kw):
        raise RuntimeError(
            f"{request.node.nodeid} started a process ({args!r}) but is not marked "
            "@pytest.mark.cluster or @pytest.mark.notebook: mark it, or keep it a unit test"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
