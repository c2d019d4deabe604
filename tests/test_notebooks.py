"""Every notebook is committed clean, parses under papermill, and runs under nbval twice.

Each notebook runs in its own ``pytest --nbval-lax`` subprocess with a cell
timeout (without one a killed kernel can hang pytest): once at its default
parameters, and once at its lesson's ``WORKSHOP`` parameters, injected after
the ``parameters`` cell the way papermill does. After each run no process
the notebook started may survive.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.lessons import catalogue
from labkit.testing import describe, leftover_processes

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
LESSONS = catalogue()


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_without_outputs(path: Path):
    nb = json.loads(path.read_text())
    dirty = [
        i for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_papermill_reads_every_parameter(path: Path, caplog: pytest.LogCaptureFixture):
    """``papermill --help-notebook`` lists each parameter; no line of the cell is skipped with a warning."""
    from papermill.inspection import inspect_notebook

    with caplog.at_level(logging.WARNING, logger="papermill"):
        params = inspect_notebook(str(path))
    assert params, f"{path.name}: no `parameters`-tagged cell, or papermill found no parameter in it"
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warned, f"{path.name}: papermill warned while reading the parameters: {warned}"
    undocumented = [name for name, p in params.items() if not p.get("help")]
    assert not undocumented, f"{path.name}: give these parameters a trailing comment: {undocumented}"


def _run_nbval(path: Path, cwd: Path, timeout: int, logs: Path) -> subprocess.CompletedProcess:
    """Run one notebook under nbval; every cluster it starts leaves its service logs under ``logs``."""
    cmd = [
        sys.executable, "-m", "pytest", "--nbval-lax", f"--nbval-cell-timeout={timeout}",
        "-p", "no:cacheprovider", "-q", "--rootdir", str(path.parent), str(path),
    ]
    env = dict(os.environ, LABKIT_KEEP_LOGS=str(logs))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout * 4 + 120)


def _failure_report(stdout: str) -> str:
    """nbval's report, cut to what explains a failure: the first failing cell whole, then the summary.

    Later cells usually fail only because the first one did (a name it
    should have defined); the first one's traceback is the one to read.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", stdout)  # nbval colours its output
    first = re.search(r"^_{3,} .*::Cell \d+ _{3,}$", text, re.MULTILINE)
    if first is None:
        return text[-8000:]
    end = re.search(r"^_{3,} .*::Cell \d+ _{3,}$", text[first.end():], re.MULTILINE)
    cell = text[first.start(): first.end() + end.start()] if end else text[first.start():]
    summary = text[text.rfind("short test summary info"):] if "short test summary info" in text else ""
    return cell[-12000:] + "\n...\n" + summary[-3000:]


def _log_tails(logs: Path, lines: int = 15, budget: int = 24000) -> str:
    """The last ``lines`` lines of every service log the notebook's clusters kept, workers first."""
    services = ("redis", "replica", "sentinel", "zk", "rabbit", "epmd", "launcher", "guard", "flower")
    files = sorted(logs.glob("*/*.log"), key=lambda f: (f.stem.startswith(services) or "relay" in f.stem, str(f)))
    parts = []
    for f in files:
        tail = f.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {f.parent.name}/{f.name}\n" + "\n".join(tail))
    text = "\n".join(parts)
    return text if len(text) <= budget else text[:budget] + "\n... (cut)"


def _check(proc: subprocess.CompletedProcess, name: str, logs: Path) -> None:
    left = leftover_processes(timeout=10)
    assert proc.returncode == 0, (f"{name} failed under nbval:\n{_failure_report(proc.stdout)}\n"
                                  f"{proc.stderr[-2000:]}\nservice logs:\n{_log_tails(logs)}")
    assert not left, f"{name} left processes running: {describe(left)}"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path: Path, tmp_path: Path, request: pytest.FixtureRequest):
    logs = tmp_path / "logs"
    _check(_run_nbval(path, path.parent, request.config.getoption("--nb-cell-timeout"), logs), path.name, logs)


WORKSHOP = [p for p in NOTEBOOKS if getattr(LESSONS.get(p.name), "WORKSHOP", None)]


@pytest.mark.notebook
@pytest.mark.parametrize("path", WORKSHOP, ids=[p.stem for p in WORKSHOP])
def test_notebook_runs_at_workshop_parameters(path: Path, tmp_path: Path, request: pytest.FixtureRequest):
    """The same notebook with its lesson's ``WORKSHOP`` values: thresholds must follow the parameters."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    params = LESSONS[path.name].WORKSHOP
    # papermill's own loader gives every cell a `tags` list, which parameterize_notebook expects
    nb = parameterize_notebook(load_notebook_node(str(path)), params, kernel_name="python3", language="python")
    copy = tmp_path / path.name
    nbformat.write(nb, copy)
    logs = tmp_path / "logs"
    _check(_run_nbval(copy, path.parent, request.config.getoption("--nb-cell-timeout"), logs),
           f"{path.name} with {params}", logs)


@pytest.mark.notebook
def test_a_notebook_killed_by_nbval_timeout_leaves_nothing(tmp_path: Path):
    """The trap from the pilots: nbval SIGKILLs the kernel's group, so atexit never runs."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("from labkit import LocalCluster\ncluster = LocalCluster(workers=2)"),
        nbformat.v4.new_code_cell("import time\ntime.sleep(600)  # never finishes: nbval's timeout kills the kernel"),
    ]
    path = tmp_path / "hangs.ipynb"
    nbformat.write(nb, path)
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-cell-timeout=15", "-p", "no:cacheprovider",
           "-q", "--rootdir", str(tmp_path), str(path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, "the hanging cell should have failed"
    left = leftover_processes(timeout=10)
    assert not left, f"left running after the kernel was killed: {describe(left)}"
