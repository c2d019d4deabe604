"""How the seeded suite runs its tasks: ``run`` (a runner for ``--level``) and ``code`` (buggy or fixed).

Levels 1–3 run in this process; levels 4–6 ask labkit's pytest plugin for
``labkit_cluster`` (its shape comes from the ``labkit_cluster`` ini setting,
which lesson 07 sets per level with ``-o``). The fixed code keeps state in a
Redis (``--redis-url``, else ``$LABKIT_REDIS_URL``, else the plugin's cluster).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from labkit.lessons import testing


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("seeded suite (labkit lesson 07)")
    group.addoption("--level", type=int, default=4, choices=sorted(testing.LEVELS),
                    help="how the tests run their tasks: 1 call ... 6 ramp up (see labkit.lessons.testing)")
    group.addoption("--jobs", type=int, default=8, help="jobs the concurrency tests send at once")
    group.addoption("--margin", type=float, default=30.0,
                    help="seconds between 'now' and the reminders of the clock test")
    group.addoption("--redis-url", default="", help="the Redis the fixed code keeps its state in")
    group.addoption("--ramp", default="",
                    help="level 6: comma-separated concurrencies, e.g. 1,2,4,8: the whole suite runs once per "
                         "step, on the cluster's worker c<N> (N pool children, queue c<N>)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    steps = [int(c) for c in metafunc.config.getoption("--ramp").split(",") if c.strip()]
    if steps and "concurrency" in metafunc.fixturenames:
        metafunc.parametrize("concurrency", steps, indirect=True, scope="module", ids=[f"c{c}" for c in steps])


@pytest.fixture(scope="module")
def concurrency(request: pytest.FixtureRequest) -> int:
    """Level 6: how many jobs run at once in this step of the ramp (0: no ramp)."""
    return getattr(request, "param", 0)


@pytest.fixture(scope="module")
def run(request: pytest.FixtureRequest, concurrency: int) -> Iterator[testing.Runner]:
    """The level's runner, active for the whole module (for each step of a ramp)."""
    level = request.config.getoption("--level")
    with pytest.MonkeyPatch.context() as mp:
        if level >= 4:
            cluster = request.getfixturevalue("labkit_cluster")
            queue = testing.ramp_worker(concurrency) if concurrency else None
            if queue and queue not in cluster.workers:
                raise pytest.UsageError(f"--ramp step {concurrency} needs a worker {queue!r} "
                                        f"(labkit_cluster = {testing.ramp_config([concurrency])!r})")
            runner: testing.Runner = testing.ClusterRunner(cluster, level, queue)
        else:
            url = request.config.getoption("--redis-url") or os.environ.get("LABKIT_REDIS_URL") \
                or request.getfixturevalue("labkit_cluster").redis_url
            mp.setenv("LABKIT_REDIS_URL", url)  # the fixed code's Redis, for tasks run in this process
            runner = testing.local_runner(level, url)
        with runner.active():
            yield runner


@pytest.fixture(params=["buggy", "fixed"])
def code(request: pytest.FixtureRequest) -> type:
    """The application code under test, with its bugs or fixed."""
    return testing.CODE[request.param]
