"""Test helpers shared by the kit's own suite and by users' suites: leak checks and clusters.

Every process a test session starts — clusters, notebook kernels and the
services they start — inherits ``LABKIT_TEST_SESSION`` from the session's
environment, so a leak check only ever blames processes of *this* session,
never a cluster somebody else runs on the same machine.

    >>> from labkit.testing import leftover_processes
    >>> assert not leftover_processes(timeout=10)      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import psutil

from .poll import poll_until
from .services.base import labkit_processes

SESSION_ENV = "LABKIT_TEST_SESSION"


def _session_mark() -> str:
    """This process's mark: the session's, plus the pytest-xdist worker's id when there is one.

    xdist's workers inherit the controller's environment, so without their
    own suffix one worker's leak check would blame the other's live clusters.
    """
    mark = os.environ.setdefault(SESSION_ENV, uuid.uuid4().hex)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and not mark.endswith(f"-{worker}"):
        mark = os.environ[SESSION_ENV] = f"{mark}-{worker}"
    return mark


#: This test session's mark (set once, inherited by every child process).
SESSION = _session_mark()


def _ours(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error, OSError):
        return p.environ().get(SESSION_ENV) == SESSION
    return False


def leftover_processes(cluster_id: str | None = None, timeout: float = 10.0) -> list[psutil.Process]:
    """This session's processes still carrying labkit's mark after up to ``timeout`` s (empty is good).

    Teardown is asynchronous (a SIGKILLed owner's guard sweeps within a
    second), so it waits for the set to empty before reporting what is left.
    """
    def mine() -> list[psutil.Process]:
        return [p for p in labkit_processes(cluster_id) if _ours(p)]

    poll_until(lambda: not mine(), timeout, 0.2)
    return mine()


def describe(processes: list[psutil.Process]) -> str:
    """``"1234 celery, 1240 redis-server"`` for an assertion message."""
    out = []
    for p in processes:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {p.name()}")
    return ", ".join(out)


def assert_no_leftovers(cluster_id: str | None = None, timeout: float = 10.0, what: str = "the test") -> None:
    """Raise ``AssertionError`` naming every labkit process ``what`` left running."""
    left = leftover_processes(cluster_id, timeout)
    assert not left, f"{what} left processes running: {describe(left)}"


@contextlib.contextmanager
def cluster(**options: Any) -> Iterator[Any]:
    """A fresh, unshared :class:`~labkit.cluster.LocalCluster` for one test, always closed.

    ``reuse=False``: a test never gets a cluster another test left running.
    """
    from .cluster import LocalCluster  # noqa: PLC0415

    with LocalCluster(**{"reuse": False, **options}) as c:
        yield c


@contextlib.contextmanager
def booting(**options: Any) -> Iterator[Any]:
    """Like :func:`cluster`, but returned at once, still booting (``start_soon``); ``start()`` waits for it.

    For a cluster a test module needs only later (a RabbitMQ node boots for
    seconds): its boot overlaps the tests before that mostly wait.
    """
    from .cluster import LocalCluster  # noqa: PLC0415

    c = LocalCluster(**{"reuse": False, **options, "start": False}).start_soon()
    try:
        yield c
    finally:
        c.close()
