"""A real Celery cluster in any pytest suite: labkit's pytest plugin, and its leak check.

Installing labkit registers this module as a pytest plugin (the ``pytest11``
entry point ``labkit``). It costs nothing until a test asks for one of its
fixtures: importing it reads no process table, starts nothing and imports
neither Celery nor redis-py.

Fixtures
    ``labkit_cluster``
        A :class:`~labkit.cluster.LocalCluster` — a real ``redis-server`` and
        prefork ``celery worker`` subprocesses — started on first use and kept
        for the session: every test module asking for the same options shares
        it. Options: the ini setting ``labkit_cluster`` (a Python dict literal
        of ``LocalCluster`` keyword arguments), overridden per module by
        ``pytestmark = pytest.mark.labkit(**options)``. ``labkit_include``
        (ini, one module per line) names the modules whose tasks the workers
        import.
    ``labkit_app``
        That cluster's Celery app, made current, so ``my_task.delay()`` of a
        ``@shared_task`` goes to the cluster.
    ``labkit_worker``
        One more worker for one test, on a queue of its own, stopped after the
        test; its options come from ``@pytest.mark.labkit_worker(**options)``
        (any ``WorkerSpec`` field: ``concurrency``, ``pool``,
        ``clock_offset``, ``soft_time_limit``, ...).
    ``labkit_clusters``
        The session's pool of clusters, for a session-scoped fixture of your
        own: ``labkit_clusters.get(workers=2)``.
    ``labkit_leak_check``
        Fails the test if it left a labkit process running (a cluster it
        opened and did not close).

Workers import your task modules from the paths your tests import them from:
the plugin passes the session's own ``sys.path`` entries (those outside the
Python installation: your project, ``pythonpath`` ini entries) to the workers
through ``PYTHONPATH``.

Every process a test session starts — clusters, notebook kernels and the
services they start — inherits ``LABKIT_TEST_SESSION`` from the session's
environment, so a leak check only ever blames processes of *this* session,
never a cluster somebody else runs on the same machine.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import itertools
import os
import sys
import sysconfig
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # pragma: no cover
    import psutil
    from celery import Celery
    from celery.result import AsyncResult

    from .cluster import LocalCluster
    from .services.worker import WorkerService

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

#: What ``labkit_cluster`` starts when neither the ini setting nor a marker says otherwise.
DEFAULT_OPTIONS: dict[str, Any] = {"workers": 1, "zookeeper": 0}


# ============================================================================ leak check
def _ours(p: psutil.Process) -> bool:
    import psutil  # noqa: PLC0415

    with contextlib.suppress(psutil.Error, OSError):
        return p.environ().get(SESSION_ENV) == SESSION
    return False


def _cluster_of(p: psutil.Process) -> str | None:
    import psutil  # noqa: PLC0415

    from .services.base import ENV_MARK  # noqa: PLC0415

    with contextlib.suppress(psutil.Error, OSError):
        return p.environ().get(ENV_MARK)
    return None


def leftover_processes(cluster_id: str | None = None, timeout: float = 10.0,
                       ignore: Iterable[str] = ()) -> list[psutil.Process]:
    """This session's processes still carrying labkit's mark after up to ``timeout`` s (empty is good).

    ``ignore`` lists cluster ids that are allowed to be running (a cluster
    the session keeps on purpose). Teardown is asynchronous (a SIGKILLed
    owner's guard sweeps within a second), so it waits for the set to empty
    before reporting what is left.
    """
    from .poll import poll_until  # noqa: PLC0415
    from .services.base import labkit_processes  # noqa: PLC0415

    skip = set(ignore)

    def mine() -> list[psutil.Process]:
        return [p for p in labkit_processes(cluster_id) if _ours(p) and _cluster_of(p) not in skip]

    poll_until(lambda: not mine(), timeout, 0.2)
    return mine()


def describe(processes: list[psutil.Process]) -> str:
    """``"1234 celery, 1240 redis-server"`` for an assertion message."""
    import psutil  # noqa: PLC0415

    out = []
    for p in processes:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {p.name()}")
    return ", ".join(out)


def assert_no_leftovers(cluster_id: str | None = None, timeout: float = 10.0, what: str = "the test",
                        ignore: Iterable[str] = ()) -> None:
    """Raise ``AssertionError`` naming every labkit process ``what`` left running."""
    left = leftover_processes(cluster_id, timeout, ignore)
    assert not left, f"{what} left processes running: {describe(left)}"


def open_cluster_ids() -> set[str]:
    """Ids of the clusters this process has started and not closed (none if labkit.cluster was never used)."""
    module = sys.modules.get("labkit.cluster")
    if module is None:
        return set()
    return {c.id for c in list(module.LocalCluster._instances.values())}


@contextlib.contextmanager
def cluster(**options: Any) -> Iterator[LocalCluster]:
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


# ============================================================================ the pool
def _key(options: dict[str, Any]) -> str:
    return repr(sorted(options.items()))


def worker_pythonpath(paths: Iterable[str] | None = None) -> list[str]:
    """The entries of ``sys.path`` a worker needs to import what the tests import.

    Directories outside the Python installation (stdlib, site-packages): the
    project's root, ``pythonpath`` ini entries, the directories pytest put
    on the path for the test modules.
    """
    installed = {os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix,
                                               *sysconfig.get_paths().values()} if p}
    out = []
    for p in (sys.path if paths is None else paths):
        if not p or not os.path.isdir(p):
            continue
        real = os.path.realpath(p)
        if any(real == i or real.startswith(i + os.sep) for i in installed) or "site-packages" in real:
            continue
        if real not in out:
            out.append(real)
    return out


@dataclass
class _Entry:
    cluster: LocalCluster
    owned: bool  # started by the pool (closed by it), or reused from this process (never closed by it)
    users: int = 0


@dataclass
class ClusterPool:
    """The session's clusters, one per distinct set of options, shared by the modules that ask for it.

    ``max_idle`` clusters nobody uses are kept for a later module with the
    same options (a cluster takes a second or two to start); beyond that,
    the least recently released are closed. With ``reuse`` a cluster with
    the same options already running in this process (a notebook's) is used
    and never closed by the pool.
    """

    max_idle: int = 1
    reuse: bool = False
    entries: dict[str, _Entry] = field(default_factory=dict)
    _idle: list[str] = field(default_factory=list)
    _env: pytest.MonkeyPatch | None = None

    def get(self, **options: Any) -> LocalCluster:
        """A running cluster with these ``LocalCluster`` options (started if needed); not counted as in use."""
        from .cluster import LocalCluster  # noqa: PLC0415
        from .status import Status  # noqa: PLC0415

        key = _key(options)
        entry = self.entries.get(key)
        if entry is not None and entry.cluster.state == Status.RUNNING:
            return entry.cluster
        if entry is not None:  # closed behind our back (a test closed it): forget it
            self._forget(key)
        self._export_pythonpath()
        LocalCluster.check_options(**options)
        c = LocalCluster(**options, reuse=self.reuse)
        owned = not getattr(c, "_reused", False)
        self.entries[key] = _Entry(c, owned)
        return c

    @contextlib.contextmanager
    def use(self, **options: Any) -> Iterator[LocalCluster]:
        """Hold a cluster while a module runs; when released it becomes idle (and may be closed)."""
        c = self.get(**options)
        key = _key(options)
        entry = self.entries[key]
        entry.users += 1
        if key in self._idle:
            self._idle.remove(key)
        try:
            yield c
        finally:
            entry.users -= 1
            if entry.users == 0:
                self._idle.append(key)
                while len(self._idle) > self.max_idle:
                    self._close(self._idle.pop(0))

    def ids(self) -> set[str]:
        """Ids of the clusters the pool holds (running or idle)."""
        return {e.cluster.id for e in self.entries.values()}

    def _forget(self, key: str) -> None:
        self.entries.pop(key, None)
        if key in self._idle:
            self._idle.remove(key)

    def _close(self, key: str) -> None:
        entry = self.entries.get(key)
        self._forget(key)
        if entry is not None and entry.owned:
            entry.cluster.close()
            assert_no_leftovers(entry.cluster.id, what=f"labkit cluster {entry.cluster.id}")

    def close(self) -> None:
        """Close every cluster the pool started; check each left nothing behind."""
        errors = []
        for key in list(self.entries):
            try:
                self._close(key)
            except AssertionError as exc:
                errors.append(str(exc))
        if self._env is not None:
            self._env.undo()
            self._env = None
        if errors:
            raise AssertionError("\n".join(errors))

    def _export_pythonpath(self) -> None:
        if self._env is not None:
            return
        self._env = pytest.MonkeyPatch()
        old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        paths = worker_pythonpath()
        self._env.setenv("PYTHONPATH", os.pathsep.join(paths + [p for p in old if p not in paths]))


# ============================================================================ options
def _literal(config: pytest.Config, name: str) -> dict[str, Any]:
    text = (config.getini(name) or "").strip()
    if not text:
        return {}
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise pytest.UsageError(f"ini setting {name} must be a Python dict literal, "
                                f"e.g. {{'workers': 2, 'zookeeper': 0}}; got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise pytest.UsageError(f"ini setting {name} must be a dict of LocalCluster options, not {value!r}")
    return value


def cluster_options(config: pytest.Config, marker: pytest.Mark | None = None) -> dict[str, Any]:
    """What ``labkit_cluster`` starts: defaults, then the ini setting, then the module's ``labkit`` marker."""
    options = {**DEFAULT_OPTIONS, **_literal(config, "labkit_cluster")}
    include = config.getini("labkit_include")
    if include:
        options["include"] = list(include)
    if marker is not None:
        if marker.args:
            raise pytest.UsageError("pytest.mark.labkit takes keyword arguments only (LocalCluster options)")
        options.update(marker.kwargs)
    for module in options.get("include") or []:
        if not _importable(module):
            raise pytest.UsageError(
                f"labkit: the workers are told to import {module!r}, but this session cannot import it "
                "either; fix labkit_include, or put its directory on `pythonpath` (ini)")
    return options


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False


# ============================================================================ hooks
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("labkit_cluster", "LocalCluster options for labkit_cluster, a Python dict literal "
                  f"(default {DEFAULT_OPTIONS!r})", default="")
    parser.addini("labkit_include", "modules whose tasks labkit's workers import (one per line)",
                  type="linelist", default=[])
    parser.addini("labkit_max_idle", "clusters kept running while no test module uses them (default 1)",
                  default="1")
    parser.addini("labkit_reuse", "use a cluster with the same options already running in this process "
                  "(a notebook's) instead of starting one", type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "labkit(**options): LocalCluster options for this module's "
                            "labkit_cluster (put it in the module's pytestmark)")
    config.addinivalue_line("markers", "labkit_worker(**options): WorkerSpec options for labkit_worker")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A ``labkit`` marker on a test or class cannot choose a module-wide cluster: say so now."""
    for item in items:
        mark = item.get_closest_marker("labkit")
        if mark is None or "labkit_cluster" not in getattr(item, "fixturenames", ()):
            continue
        module = item.getparent(pytest.Module)
        if module is None or module.get_closest_marker("labkit") is not mark:
            raise pytest.UsageError(
                f"{item.nodeid}: pytest.mark.labkit must be set on the module "
                "(pytestmark = pytest.mark.labkit(...)): its cluster is shared by the whole module. "
                "For one test, add a worker with pytest.mark.labkit_worker(...) and the labkit_worker fixture")


# ============================================================================ fixtures
@pytest.fixture(scope="session")
def labkit_clusters(pytestconfig: pytest.Config) -> Iterator[ClusterPool]:
    """The session's pool of clusters; closes them all (and checks they left nothing) at the end."""
    try:
        max_idle = int(pytestconfig.getini("labkit_max_idle"))
    except ValueError:
        raise pytest.UsageError("ini setting labkit_max_idle must be an integer") from None
    pool = ClusterPool(max_idle=max_idle, reuse=bool(pytestconfig.getini("labkit_reuse")))
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def labkit_cluster(request: pytest.FixtureRequest, labkit_clusters: ClusterPool) -> Iterator[LocalCluster]:
    """A running LocalCluster for this module (shared with other modules that ask for the same options)."""
    options = cluster_options(request.config, request.node.get_closest_marker("labkit"))
    with labkit_clusters.use(**options) as c:
        yield c


@pytest.fixture
def labkit_app(labkit_cluster: LocalCluster) -> Celery:
    """The cluster's Celery app, set as the current and default app for this test."""
    labkit_cluster.app.set_current()
    labkit_cluster.app.set_default()
    return labkit_cluster.app


@dataclass
class LabkitWorker:
    """The extra worker a test got from ``labkit_worker``: where to send tasks so that it runs them."""

    cluster: LocalCluster
    service: WorkerService

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def hostname(self) -> str:
        return self.service.hostname

    @property
    def queue(self) -> str:
        return self.service.spec.queues[0]

    def send(self, task: Any, *args: Any, **kwargs: Any) -> AsyncResult:
        """``task.apply_async(args, kwargs)`` on this worker's queue."""
        return self.cluster.task(task).apply_async(args, kwargs, queue=self.queue)


_worker_numbers = itertools.count(1)


@pytest.fixture
def labkit_worker(request: pytest.FixtureRequest, labkit_cluster: LocalCluster) -> Iterator[LabkitWorker]:
    """One more worker on a queue of its own (``@pytest.mark.labkit_worker(**options)``), stopped after the test."""
    mark = request.node.get_closest_marker("labkit_worker")
    options = dict(mark.kwargs) if mark is not None else {}
    name = options.pop("name", None) or f"t{next(_worker_numbers)}"
    options.setdefault("queues", [name])
    service = labkit_cluster.add_worker(name, **options)
    try:
        yield LabkitWorker(labkit_cluster, service)
    finally:
        if name in labkit_cluster.workers:
            labkit_cluster.remove_worker(name)


@pytest.fixture
def labkit_leak_check(request: pytest.FixtureRequest, labkit_clusters: ClusterPool) -> Iterator[None]:
    """After the test: no labkit process of this session runs, except the pool's and clusters open before it."""
    before = open_cluster_ids()
    yield
    assert_no_leftovers(what=request.node.nodeid, ignore=before | labkit_clusters.ids())
