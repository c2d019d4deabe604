"""my_tasks on a real cluster: labkit's plugin provides every fixture used here.

No conftest.py, no fixture code: ``labkit_app`` makes the cluster's app
current (so ``add.delay()`` goes to real prefork workers), ``labkit_cluster``
is the cluster itself, ``labkit_worker`` adds a worker for one test, and
``labkit_leak_check`` fails a test that leaves a process behind.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from my_tasks.tasks import add, is_due, render_invoice, wall_clock, word_counts

pytestmark = pytest.mark.usefixtures("labkit_leak_check")


def test_add(labkit_app):
    assert add.delay(2, 3).get(timeout=10) == 5


def test_results_travel_as_json(labkit_app):
    assert word_counts.delay("to be or not to be").get(timeout=10) == {"to": 2, "be": 2, "or": 1, "not": 1}
    assert add.delay(0.5, 0.25).get(timeout=10) == 0.75


def test_invoices_survive_concurrent_rendering(labkit_app, tmp_path):
    results = [render_invoice.delay(i, str(tmp_path)) for i in range(12)]  # the worker runs 2 at a time
    for i, result in enumerate(results):
        path = result.get(timeout=20)
        assert Path(path).read_text().splitlines()[0] == f"invoice {i} line 0"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.labkit_worker(clock_offset=3600)  # this worker's clock is an hour fast
def test_due_dates_ignore_a_skewed_worker_clock(labkit_worker):
    assert labkit_worker.send(wall_clock).get(timeout=20) - time.time() > 3000  # it really is fast
    now = time.time()
    assert labkit_worker.send(is_due, now + 60, now).get(timeout=20) is False
    assert labkit_worker.send(is_due, now - 60, now).get(timeout=20) is True
