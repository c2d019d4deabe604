"""Every notebook runs clean under nbval, leaves no process behind, and is committed clean.

Each notebook runs in its own ``pytest --nbval-lax`` subprocess with a cell
timeout (without one a killed kernel can hang pytest), then the test checks
that no process carrying labkit's mark survives it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_no_leftovers

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(path: Path):
    nb = json.loads(path.read_text())
    dirty = [
        i for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, request: pytest.FixtureRequest):
    timeout = request.config.getoption("--nb-cell-timeout")
    cmd = [
        sys.executable, "-m", "pytest", "--nbval-lax", f"--nbval-cell-timeout={timeout}",
        "-p", "no:cacheprovider", "-q", "--rootdir", str(path.parent), str(path),
    ]
    proc = subprocess.run(cmd, cwd=path.parent, capture_output=True, text=True, timeout=timeout * 4 + 120)
    left = wait_no_leftovers(timeout=10)
    assert proc.returncode == 0, f"{path.name} failed under nbval:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert not left, f"{path.name} left processes running: " + ", ".join(f"{p.pid} {p.name()}" for p in left)


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
    left = wait_no_leftovers(timeout=10)
    assert not left, "left running after the kernel was killed: " + ", ".join(f"{p.pid} {p.name()}" for p in left)
