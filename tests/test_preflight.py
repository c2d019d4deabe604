"""``labkit preflight``: real lessons pass with their claims' figures; a failing claim fails the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from labkit import preflight

ROOT = Path(__file__).resolve().parents[1]


def test_lessons_are_chosen_by_number_or_name():
    notebooks = preflight.lesson_notebooks()
    assert all(int(p.name[:2]) < 90 for p in notebooks)
    assert "99_playground.ipynb" not in [p.name for p in notebooks]
    chosen = preflight.select(notebooks, "15,03_queues")
    assert [p.name for p in chosen] == ["15_deadlock.ipynb", "03_queues.ipynb"]
    with pytest.raises(ValueError, match="no lesson notebook '77'"):
        preflight.select(notebooks, "77")


def test_quick_means_the_notebooks_defaults_and_otherwise_the_workshop_values():
    nb = ROOT / "notebooks" / "15_deadlock.ipynb"
    assert preflight.parameters_for(nb, quick=True) == {}
    from labkit.lessons import deadlock

    assert preflight.parameters_for(nb, quick=False) == deadlock.WORKSHOP


def test_the_report_is_one_self_contained_page():
    report = {"started": "s", "finished": "f", "mode": "quick", "seconds": 1.0, "ok": False,
              "machine": preflight.machine(), "doctor": [{"what": "java", "ok": True, "found": "/j", "remedy": ""}],
              "lessons": [{"notebook": "01_x.ipynb", "parameters": {"N": 3}, "ok": False, "seconds": 2.5,
                           "claims": [{"claim": "a < b", "ok": False, "figures": {"a": 2.0, "b": 1}}],
                           "claims_failed": 1, "error": "AssertionError: claim does not hold: a < b",
                           "error_cell": 7, "leftovers": [], "output": ""}]}
    page = preflight.render_html(report)
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    assert "NOT READY" in page and "a&nbsp;=&nbsp;2" in page and "code cell 7" in page


def _notebook(path: Path, *cells: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    code = [nbformat.v4.new_code_cell(c) for c in cells]
    code[0].metadata["tags"] = ["parameters"]
    nb.cells = code
    nbformat.write(nb, path)


def _preflight(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, dict]:
    cmd = [sys.executable, "-m", "labkit.cli", "preflight", "--json", "--no-progress", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    try:
        return proc, json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"no JSON from preflight:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}") from None


@pytest.mark.notebook
def test_a_failing_claim_fails_the_run_and_the_report_shows_its_figures(tmp_path: Path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _notebook(nbs / "01_holds.ipynb", "N = 3  # items", "from labkit.measure import verify\n"
              "verify('three is three', N == 3, n=N)")
    _notebook(nbs / "02_fails.ipynb", "N = 3  # items", "from labkit.measure import verify\n"
              "verify('N exceeds ten', N > 10, n=N, limit=10)", "print('never runs')")
    report = tmp_path / "out" / "report.html"
    proc, data = _preflight("--quick", "--notebooks", str(nbs), "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert data["ok"] is False
    holds, fails = data["lessons"]
    assert holds["ok"] and holds["claims"][0]["figures"] == {"n": 3}
    assert not fails["ok"] and fails["claims"] == [
        {**fails["claims"][0], "claim": "N exceeds ten", "ok": False, "figures": {"n": 3, "limit": 10}}]
    assert fails["error_cell"] == 2 and "claim does not hold: N exceeds ten (n=3, limit=10)" in fails["error"]
    page = report.read_text()
    assert "NOT READY" in page and "N exceeds ten" in page and "limit&nbsp;=&nbsp;10" in page
    assert (tmp_path / "out" / "report_notebooks" / "02_fails.ipynb").exists()


@pytest.mark.notebook
def test_two_real_lessons_pass_quick_with_their_claims_figures(tmp_path: Path):
    report = tmp_path / "preflight.html"
    proc, data = _preflight("--quick", "--lessons", "00,15", "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 0, json.dumps(data.get("lessons"), indent=1)[-4000:]
    assert [r["notebook"] for r in data["lessons"]] == ["00_welcome.ipynb", "15_deadlock.ipynb"]
    for r in data["lessons"]:
        assert r["ok"] and r["claims"] and all(c["ok"] for c in r["claims"]), r
        assert any(c["figures"] for c in r["claims"]), f"{r['notebook']}: no measured figure was recorded"
    assert data["doctor"] and all(d["ok"] for d in data["doctor"])
    page = report.read_text()
    assert "ALL LESSONS PASS" in page and "15_deadlock.ipynb" in page
