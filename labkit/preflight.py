"""``labkit preflight``: will every lesson work on this machine tomorrow morning?

For an instructor, the night before a workshop, on the room's machines:

1. ``labkit doctor`` — every program and package the cluster needs;
2. every lesson notebook (``notebooks/NN_*.ipynb`` with NN < 90, or the ones
   chosen with ``--lessons 01,12``), each run from top to bottom by papermill
   in its own process, exactly as a learner would run it:

   * by default at its lesson's ``WORKSHOP`` parameters — the bigger values a
     workshop uses (a notebook whose lesson has none runs at its defaults);
   * with ``--quick`` at the notebook's own defaults, which every lesson keeps
     small (each runs in well under a minute on 2 cores): the smallest
     parameters a lesson ships;

3. one self-contained HTML report — the machine, the versions, and per lesson
   pass/fail, every claim it checked with the figures it measured (through
   ``$LABKIT_CLAIMS_LOG``, see :func:`labkit.measure.verify`), its wall time
   and its first error — and the exit status: non-zero if anything failed.

The executed notebooks are kept next to the report, so a failure can be read
in full. Every process a notebook starts must be gone when it ends; one that
is not is reported (and killed).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import html
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RUN_MARK = "LABKIT_PREFLIGHT"
PACKAGES = ("celery", "kombu", "billiard", "redis", "kazoo", "jupyterlab", "ipykernel", "ipywidgets",
            "papermill", "matplotlib")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class LessonResult:
    """One notebook's run: what it was run with, what it measured, how it ended."""

    notebook: str
    parameters: dict[str, Any]
    ok: bool = False
    seconds: float = 0.0
    claims: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    error_cell: int | None = None
    leftovers: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def claims_failed(self) -> int:
        return sum(not c["ok"] for c in self.claims)


# --------------------------------------------------------------------------- choosing lessons

def lesson_notebooks(directory: Path = NOTEBOOKS) -> list[Path]:
    """The lesson notebooks: ``NN_topic.ipynb`` with NN < 90 (99_playground is no lesson)."""
    return sorted(p for p in directory.glob("[0-8][0-9]_*.ipynb"))


def select(notebooks: list[Path], wanted: str | None) -> list[Path]:
    """``"01,12"`` (numbers or stems) -> those notebooks; unknown names raise ``ValueError``.

    A number chooses every notebook that carries it: ``"10"`` is both of lesson 10's.
    """
    if not wanted:
        return notebooks
    chosen = []
    for item in (w.strip() for w in wanted.split(",") if w.strip()):
        match = [p for p in notebooks if p.stem == item or p.name == item or p.stem.split("_", 1)[0] == item.zfill(2)]
        if not match:
            known = ", ".join(p.stem for p in notebooks)
            raise ValueError(f"no lesson notebook {item!r}; lessons: {known}")
        chosen += [p for p in match if p not in chosen]
    return chosen


def parameters_for(notebook: Path, quick: bool) -> dict[str, Any]:
    """``{}`` (the notebook's defaults) with ``quick``, else its lesson's ``WORKSHOP`` values."""
    if quick:
        return {}
    from .lessons import catalogue  # noqa: PLC0415

    lesson = catalogue().get(notebook.name)
    return dict(getattr(lesson, "WORKSHOP", None) or {})


# --------------------------------------------------------------------------- running one notebook

def _first_error(nb_path: Path) -> tuple[str, int | None]:
    """The first error output of an executed notebook: (traceback text, code cell number)."""
    try:
        nb = json.loads(nb_path.read_text())
    except (OSError, ValueError):
        return "", None
    number = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        number += 1
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                tb = _ANSI.sub("", "\n".join(out.get("traceback") or []))
                head = f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"
                return (tb if head.split(":")[0] in tb else f"{tb}\n{head}").strip(), number
    return "", None


def _leftovers(mark: str) -> list[str]:
    """Processes of this run still alive (killed after being named)."""
    import psutil  # noqa: PLC0415

    from .poll import poll_until  # noqa: PLC0415

    def mine() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.pid != os.getpid() and p.environ().get(RUN_MARK) == mark:
                    out.append(p)
        return out

    poll_until(lambda: not mine(), 10, 0.25)  # a guard sweeps within a second of its owner's death
    left = mine()
    names = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.pid} {p.name()}")
            p.kill()
    return names


def run_notebook(notebook: Path, parameters: dict[str, Any], out_dir: Path,
                 cell_timeout: int = 240) -> LessonResult:
    """Run one notebook with papermill in its own process group; never raises for a failing lesson."""
    result = LessonResult(notebook.name, parameters)
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / notebook.name
    claims_log = out_dir / f"{notebook.stem}.claims.jsonl"
    claims_log.unlink(missing_ok=True)
    mark = uuid.uuid4().hex
    env = dict(os.environ, LABKIT_CLAIMS_LOG=str(claims_log), **{RUN_MARK: mark})
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(executed), "--cwd", str(notebook.parent),
           "-k", "python3", "--no-progress-bar", "--execution-timeout", str(cell_timeout),
           "-y", json.dumps(parameters)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=cell_timeout * 8 + 120)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[preflight] the whole notebook exceeded {cell_timeout * 8 + 120} s and was killed"
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result.seconds = time.perf_counter() - t0
    result.output = output[-4000:]
    if claims_log.exists():
        for line in claims_log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                result.claims.append(json.loads(line))
    result.error, result.error_cell = _first_error(executed)
    if proc.returncode != 0 and not result.error:
        result.error = output.strip()[-3000:] or f"papermill exited with status {proc.returncode}"
    result.leftovers = _leftovers(mark)
    result.ok = proc.returncode == 0 and not result.claims_failed and not result.leftovers
    if result.leftovers and not result.error:
        result.error = f"processes left running after the notebook ended: {', '.join(result.leftovers)}"
    return result


# --------------------------------------------------------------------------- the whole run

def machine() -> dict[str, Any]:
    """Where this ran: host, OS, CPUs, memory, load, Python, and the versions that matter."""
    import importlib.metadata as md  # noqa: PLC0415

    import psutil  # noqa: PLC0415

    from . import __version__  # noqa: PLC0415

    u = os.uname()  # (platform.processor() and platform.platform() would run `uname -p`)
    cpu = u.machine
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"labkit": __version__}
    for pkg in PACKAGES:
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    return {
        "host": socket.gethostname(), "os": f"{u.sysname} {u.release} {u.machine}", "cpu": cpu, "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()], "python": sys.version.split()[0],
        "versions": versions,
    }


def doctor() -> list[dict[str, Any]]:
    from .cli import _doctor_rows  # noqa: PLC0415

    return [{"what": w, "ok": ok, "found": found, "remedy": remedy} for w, ok, found, remedy in _doctor_rows()]


def run(notebooks: list[Path], *, quick: bool = False, out_dir: Path, cell_timeout: int = 240,
        jobs: int = 1, progress: bool = True) -> dict[str, Any]:
    """Doctor, then every notebook; returns the report's data (``ok`` is the verdict)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    started = time.time()
    t0 = time.perf_counter()
    report: dict[str, Any] = {"started": dt.datetime.now().isoformat(timespec="seconds"),
                              "mode": "quick (notebook defaults)" if quick else "workshop (WORKSHOP parameters)",
                              "machine": machine(), "doctor": doctor(), "lessons": []}
    from .cli import FOR_TESTS  # noqa: PLC0415

    missing = [d for d in report["doctor"] if not d["ok"] and d["what"] not in FOR_TESTS]
    results: dict[str, LessonResult] = {}
    if missing:
        report["skipped"] = (f"labkit doctor found {', '.join(d['what'] for d in missing)} missing; "
                             "no notebook was run")
    else:
        bar = tqdm(total=len(notebooks), unit="lesson", disable=not progress, file=sys.stderr,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(run_notebook, nb, parameters_for(nb, quick), out_dir, cell_timeout): nb
                       for nb in notebooks}
            for future in as_completed(futures):
                r = future.result()
                results[r.notebook] = r
                bar.set_postfix_str(f"{Path(r.notebook).stem} {'ok' if r.ok else 'FAILED'} in {r.seconds:.0f} s")
                bar.update()
        bar.close()
    report["lessons"] = [asdict(results[nb.name]) | {"claims_failed": results[nb.name].claims_failed}
                         for nb in notebooks if nb.name in results]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["finished"] = dt.datetime.fromtimestamp(started + report["seconds"]).isoformat(timespec="seconds")
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["ok"] = not missing and bool(results) and all(r.ok for r in results.values())
    return report


# --------------------------------------------------------------------------- the HTML report

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f4f4f4}.ok{color:#2e7d32;font-weight:600}
.bad{color:#c62828;font-weight:600}pre{background:#f8f8f8;border:1px solid #eee;padding:.6em;
overflow-x:auto;font-size:12px;white-space:pre-wrap}.verdict{font-size:1.3em;padding:.4em .8em;
display:inline-block;border-radius:4px}.verdict.ok{background:#e8f5e9}.verdict.bad{background:#ffebee}
small{color:#666}code{font-size:12px}
"""


def _mark(ok: bool, yes: str = "pass", no: str = "FAIL") -> str:
    return f"<span class='{'ok' if ok else 'bad'}'>{yes if ok else no}</span>"


def _figures(figures: dict[str, Any]) -> str:
    from .table import fmt  # noqa: PLC0415

    shown = []
    for k, v in figures.items():
        value = fmt(v) if isinstance(v, int | float) and not isinstance(v, bool) else str(v)
        shown.append(f"{html.escape(str(k))}&nbsp;=&nbsp;{html.escape(value)}")
    return "<br>".join(shown) or "<small>no figures</small>"


def render_html(report: dict[str, Any], notebooks_link: str = "") -> str:
    """One self-contained page: inline style, no script, no external resource."""
    e = html.escape
    m = report["machine"]
    ok = report["ok"]
    rows = []
    for r in report["lessons"]:
        params = ", ".join(f"{k}={v}" for k, v in r["parameters"].items()) or "defaults"
        n_ok = len(r["claims"]) - r["claims_failed"]
        first = r["error"].strip().splitlines()[-1] if r["error"].strip() else ""
        anchor = e(Path(r["notebook"]).stem)
        rows.append(
            f"<tr><td><a href='#{anchor}'>{e(r['notebook'])}</a></td><td>{_mark(r['ok'])}</td>"
            f"<td>{n_ok}/{len(r['claims'])}</td><td>{r['seconds']:.1f} s</td><td><code>{e(params)}</code></td>"
            f"<td>{e(first[:200])}</td></tr>")
    details = []
    for r in report["lessons"]:
        claims = "".join(
            f"<tr><td>{_mark(c['ok'], 'holds', 'FAILS')}</td><td>{e(c['claim'])}</td>"
            f"<td>{_figures(c.get('figures', {}))}</td></tr>" for c in r["claims"])
        link = (f" — <a href='{e(notebooks_link)}/{e(r['notebook'])}'>executed notebook</a>"
                if notebooks_link else "")
        error = ""
        if r["error"]:
            where = f" (code cell {r['error_cell']})" if r.get("error_cell") else ""
            error = f"<p><b>First error{where}</b></p><pre>{e(r['error'])}</pre>"
        details.append(
            f"<h3 id='{e(Path(r['notebook']).stem)}'>{e(r['notebook'])} {_mark(r['ok'])}</h3>"
            f"<p>{r['seconds']:.1f} s{link}</p>"
            + (f"<table><tr><th></th><th>claim</th><th>measured</th></tr>{claims}</table>" if claims
               else "<p><small>no claim was checked</small></p>") + error)
    doctor = "".join(f"<tr><td>{e(d['what'])}</td><td>{_mark(d['ok'], 'ok', 'MISSING')}</td>"
                     f"<td>{e(d['found'])}</td><td>{e(d['remedy'] if not d['ok'] else '')}</td></tr>"
                     for d in report["doctor"])
    versions = ", ".join(f"{e(k)} {e(v)}" for k, v in m["versions"].items())
    skipped = f"<p class='bad'>{e(report['skipped'])}</p>" if report.get("skipped") else ""
    n_ok = sum(r["ok"] for r in report["lessons"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>labkit preflight — {e(m['host'])}</title>
<style>{_CSS}</style></head><body>
<h1>labkit preflight on {e(m['host'])}</h1>
<p class="verdict {'ok' if ok else 'bad'}">{'ALL LESSONS PASS' if ok else 'NOT READY'} —
{n_ok} of {len(report['lessons'])} lessons passed in {report['seconds']:.0f} s</p>
<p>{e(report['mode'])}; started {e(report['started'])}, finished {e(report['finished'])}.</p>{skipped}
<h2>Machine</h2><table>
<tr><th>host</th><td>{e(m['host'])}</td></tr><tr><th>system</th><td>{e(m['os'])}</td></tr>
<tr><th>CPU</th><td>{e(str(m['cpu']))} — {m['cores']} cores</td></tr>
<tr><th>memory</th><td>{m['memory_gib']} GiB</td></tr>
<tr><th>load average</th><td>{' / '.join(map(str, m['load_average']))} before,
{' / '.join(map(str, m.get('load_average_after', [])))} after (1, 5, 15 min)</td></tr>
<tr><th>Python</th><td>{e(m['python'])}</td></tr><tr><th>versions</th><td>{versions}</td></tr></table>
<h2>labkit doctor</h2><table><tr><th>what</th><th></th><th>found</th><th>remedy</th></tr>{doctor}</table>
<h2>Lessons</h2><table><tr><th>notebook</th><th>result</th><th>checks held</th><th>wall time</th>
<th>parameters</th><th>first error</th></tr>{''.join(rows)}</table>
{''.join(details)}
</body></html>
"""


def main(args: Any) -> int:
    """``labkit preflight`` (arguments parsed in :mod:`labkit.cli`)."""
    try:
        notebooks = select(lesson_notebooks(Path(args.notebooks)), args.lessons)
    except ValueError as exc:
        print(f"labkit preflight: {exc}", file=sys.stderr)
        return 2
    report_path = Path(args.report).resolve()
    out_dir = report_path.with_name(report_path.stem + "_notebooks")
    if not args.json:
        print(f"labkit preflight: {len(notebooks)} lesson(s), {'quick' if args.quick else 'workshop'} "
              f"parameters; report -> {report_path}", file=sys.stderr)
    report = run(notebooks, quick=args.quick, out_dir=out_dir, cell_timeout=args.timeout, jobs=args.jobs,
                 progress=not args.no_progress)
    report["report"] = str(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(render_html(report, notebooks_link=out_dir.name))
    if args.json:
        print(json.dumps({k: v for k, v in report.items()}, indent=1, default=str))
    else:
        for r in report["lessons"]:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['notebook']:28} {r['seconds']:6.1f} s  "
                  f"checks held {len(r['claims']) - r['claims_failed']}/{len(r['claims'])}"
                  + (f"  {r['error'].strip().splitlines()[-1][:100]}" if r["error"].strip() and not r["ok"] else ""))
        if report.get("skipped"):
            print(report["skipped"])
        print(f"{'ALL LESSONS PASS' if report['ok'] else 'NOT READY'} in {report['seconds']:.0f} s; "
              f"report: {report_path}")
    return 0 if report["ok"] else 1
