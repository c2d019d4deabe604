"""Shared fixtures and the suite's two guarantees.

* **No leaks.** After every test module, no process this session started is
  still running (:func:`labkit.testing.assert_no_leftovers`).
* **The fast tier starts nothing.** Tests are marked ``cluster`` (real
  processes) or ``notebook`` (runs a notebook); the rest are unit tests, and
  ``make quick`` runs just those. A unmarked test that tries to start a
  process fails at once, so the fast tier stays fast and honest.

``make test`` runs the suite on two pytest-xdist workers. A test module
that shares a module-scoped cluster stays on one worker (its tests form one
``xdist_group``), so the cluster starts once; notebook runs are spread one
by one.
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is None and item.path.name != "test_notebooks.py":
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


@pytest.fixture(scope="module")
def cluster():
    """Two prefork workers and a standalone ZooKeeper, shared by one test module."""
    with testing.cluster(workers=2) as c:
        yield c


@pytest.fixture(autouse=True, scope="module")
def _no_leaked_processes(request: pytest.FixtureRequest):
    yield
    testing.assert_no_leftovers(what=request.module.__name__)


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
