"""Seven tests a team would write for seven pieces of Celery code; each one runs at every level.

Each test is parametrised over the buggy and the fixed code (``code``), and
runs its tasks through ``run`` — the level decides what "running a task"
means (see ``conftest.py``).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from labkit.lessons.testing import EXPORT_ROWS


def test_non_json_argument(run, code):
    assert code.count_tags(run, ["red", "blue", "red"]) == 2


def test_json_result(run, code):
    assert code.stock_level(run, [3, 5], 3) == 30


def test_get_in_task(run, code):
    assert code.total(run, [1, 2, 3]) == 18


def test_module_state(run, code, request):
    jobs = request.config.getoption("--jobs")
    sent = code.welcomes_sent(run, f"user-{uuid.uuid4().hex}", jobs)  # a retried sign-up fires it `jobs` times
    request.node.user_properties.append(("extra_emails", sent - 1))
    assert sent == 1, f"{sent} welcome e-mails for one user"


def test_shared_temp_file(run, code, request, tmp_path: Path):
    ids = list(range(request.config.getoption("--jobs")))
    code.render(run, ids, str(tmp_path))
    corrupted = [i for i in ids if (tmp_path / f"report-{i}.txt").read_text()
                 != "".join(f"report {i} line {k}\n" for k in range(4))]
    request.node.user_properties.append(("corrupted", len(corrupted)))
    assert not corrupted, f"reports {corrupted} hold lines of another report"


def test_soft_time_limit(run, code):
    assert code.export(run, EXPORT_ROWS) == EXPORT_ROWS


def test_clock(run, code, request):
    import time

    margin = request.config.getoption("--margin")
    now = time.time()
    reminders = [["pay the invoice", now - margin], ["call the client", now + margin]]
    answers = code.due(run, reminders)  # one answer per place the task can run
    assert answers == [["pay the invoice"]] * len(answers), f"due reminders, per worker: {answers}"


@pytest.fixture(autouse=True)
def _level(run, request):
    request.node.user_properties.append(("level", run.level))
