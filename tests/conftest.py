"""Shared fixtures: real clusters, and a leak check after every test module.

Tests that need a cluster with special workers start their own
``LocalCluster(...)``; the plain ``cluster`` fixture (2 prefork workers,
standalone ZooKeeper) is shared per module to keep the suite fast.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid

import psutil
import pytest

from labkit import LocalCluster
from labkit.services.base import labkit_processes


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--nb-cell-timeout", type=int, default=240,
        help="seconds one notebook cell may run under nbval before the kernel is killed",
    )


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=2, reuse=False) as c:
        yield c


# Every process this test session starts (notebook kernels and their services
# included) inherits this mark, so the leak check never blames a cluster that
# someone else on the machine is running.
SESSION = os.environ.setdefault("LABKIT_TEST_SESSION", uuid.uuid4().hex)


def _ours(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error, OSError):
        return p.environ().get("LABKIT_TEST_SESSION") == SESSION
    return False


def wait_no_leftovers(cluster_id: str | None = None, timeout: float = 10.0) -> list:
    """This session's processes still carrying labkit's mark after ``timeout`` s (empty is good)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in labkit_processes(cluster_id) if _ours(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.fixture(autouse=True, scope="module")
def _no_leaked_processes():
    yield
    left = wait_no_leftovers()
    assert not left, "processes left behind: " + ", ".join(f"{p.pid} {p.name()}" for p in left)
