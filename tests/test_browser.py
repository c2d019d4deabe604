"""The notebooks in a real browser: JupyterLab on loopback, headless Chromium driven by Playwright.

nbval proves the code runs; this proves what a learner *sees*: every cell of
``00_welcome`` and of ``99_playground`` (the most widget-heavy notebook) run
through JupyterLab's UI ("Run All Cells"), then

* no cell shows an error output;
* every plot the kernel sent (``image/png``) is an ``<img>`` the browser decoded;
* every widget the kernel sent is a rendered widget, not its text fallback;
* the kernel dialog is answered: cells run through "Restart Kernel and Run
  All Cells", as a learner would, and JupyterLab asks first; any other dialog
  (a kernel choice) is accepted the same way.

The browser is the system's Chromium (``chromium`` Debian package, installed by
``scripts/system-deps.sh``); Playwright never downloads one. JupyterLab serves a
copy of the notebooks from the test's tmp dir (the committed ones stay clean),
with its own settings, workspaces and runtime dirs. Server and browser run in
their own process groups, are killed in ``finally``, and a leak check scans for
every process that inherited this test's mark. On failure, screenshots are kept
under the test's tmp dir and the message gives their path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from labkit.services.base import free_port

pytestmark = pytest.mark.notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["00_welcome.ipynb", "99_playground.ipynb"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MARK = "LABKIT_BROWSER_TEST"
RUN_TIMEOUT_S = 150  # one notebook, every cell; the notebooks' own target is well under a minute


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "no chromium on PATH: run `make setup` (scripts/system-deps.sh installs the chromium package)"
    return path


def marked(mark: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and p.environ().get(MARK) == mark:
                out.append(p)
    return out


def start_lab(root: Path, port: int, token: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ServerApp.port={port}",
           "--ServerApp.ip=127.0.0.1", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True", "--LabApp.expose_app_in_browser=True",
           f"--LabApp.user_settings_dir={root.parent / 'lab-settings'}",
           f"--LabApp.workspaces_dir={root.parent / 'lab-workspaces'}"]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_lab(proc: subprocess.Popen, url: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"JupyterLab exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.3)
    raise AssertionError(f"JupyterLab did not answer {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the group (JupyterLab shuts its kernels down), then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


# What one notebook's model and its part of the page hold, read in the page (window.jupyterapp is exposed).
MODEL_JS = """(id) => {
  const panel = [...window.jupyterapp.shell.widgets('main')].find(w => w.id === id);
  const out = {code: 0, executed: 0, running: 0, errors: [], images: 0, widgets: 0};
  for (const cell of panel.content.widgets) {
    if (cell.model.type !== 'code') continue;
    out.code += 1;
    if (cell.model.executionCount) out.executed += 1;
    if (cell.promptNode && cell.promptNode.textContent.includes('*')) out.running += 1;
    const outputs = cell.model.outputs;
    for (let i = 0; i < outputs.length; i++) {
      const o = outputs.get(i).toJSON();
      if (o.output_type === 'error') out.errors.push(o.ename + ': ' + o.evalue);
      const data = o.data || {};
      if (data['image/png']) out.images += 1;
      if (data['application/vnd.jupyter.widget-view+json']) out.widgets += 1;
    }
  }
  const imgs = [...panel.node.querySelectorAll('.jp-OutputArea-output img')];
  out.rendered_images = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  // a rendered widget view is a DOM subtree with the jupyter-widgets class; its fallback is plain text
  out.rendered_widgets = [...panel.node.querySelectorAll('.jp-OutputArea-output')]
    .filter(o => o.querySelector('.jupyter-widgets')).length;
  const text = panel.node.innerText;
  out.fallbacks = ['Error displaying widget', 'Loading widget...', 'VBox(children=', 'HBox(children=']
    .filter(t => text.includes(t));
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  out.kernel = kernel ? kernel.status : 'none';
  return out;
}"""

OPEN_JS = """async (path) => {
  const app = window.jupyterapp;
  await app.restored;
  const panel = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
  await panel.context.ready;
  app.shell.activateById(panel.id);
  return panel.id;
}"""

RUN_ALL_JS = """(id) => {
  const app = window.jupyterapp;
  app.shell.activateById(id);
  if (app.shell.currentWidget.id !== id) return false;
  app.commands.execute('notebook:restart-run-all');  // not awaited: it waits for the dialog's answer
  return true;
}"""


def answer_dialogs(page, seen: list[str]) -> None:
    """Accept any JupyterLab dialog (kernel choice, restart) and remember what it asked."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count():
        seen.append(dialog.first.inner_text()[:200])
        page.locator(".jp-Dialog .jp-mod-accept").first.click()


def run_all(page, name: str, shots: Path, dialogs: list[str]) -> dict:
    """Open ``name``, wait for its kernel (answering dialogs), run all cells, wait for them all."""
    panel = page.evaluate(OPEN_JS, name)
    deadline = time.monotonic() + 60
    while page.evaluate(MODEL_JS, panel)["kernel"] != "idle":  # the kernel starts (or a dialog asks which)
        answer_dialogs(page, dialogs)
        assert time.monotonic() < deadline, f"{name}: the kernel never became idle"
        time.sleep(0.3)
    assert page.evaluate(RUN_ALL_JS, panel), f"{name}: could not make it the current notebook"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    state: dict = {}
    while time.monotonic() < deadline:
        answer_dialogs(page, dialogs)
        state = page.evaluate(MODEL_JS, panel)
        if state["errors"] or (state["executed"] == state["code"] and not state["running"]
                               and state["kernel"] == "idle"):
            break
        time.sleep(0.5)
    # images decode and widget views render asynchronously after the last output arrives
    with contextlib.suppress(Exception):
        page.wait_for_function(f"(id) => {{ const s = ({MODEL_JS})(id); return s.rendered_images >= s.images "
                               "&& s.rendered_widgets >= s.widgets; }", arg=panel, timeout=15_000)
    state = page.evaluate(MODEL_JS, panel)
    page.screenshot(path=str(shots / f"{Path(name).stem}.png"), full_page=True)
    return state


def test_notebooks_run_in_jupyterlab_in_a_real_browser(tmp_path: Path):
    from playwright.sync_api import sync_playwright

    browser_path = chromium()
    mark = uuid.uuid4().hex
    env = dict(os.environ, **{MARK: mark}, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD="1")
    root = tmp_path / "notebooks"
    root.mkdir()
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / name, root / name)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    port, token = free_port(), uuid.uuid4().hex
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "jupyterlab.log"
    lab = start_lab(root, port, token, env, log)
    old_mark = os.environ.get(MARK)
    os.environ[MARK] = mark  # the Playwright driver and Chromium inherit it, so the leak check finds them
    pw = context = None
    results: dict[str, dict] = {}
    dialogs: list[str] = []
    try:
        wait_for_lab(lab, f"{base}/api/status?token={token}", log)
        pw = sync_playwright().start()
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=browser_path, headless=True,
            args=CHROMIUM_FLAGS, env=env, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(f"{base}/lab?token={token}", wait_until="domcontentloaded")  # sets the auth cookie
        page.wait_for_function("() => !!window.jupyterapp", timeout=60_000)
        for name in NOTEBOOKS:
            results[name] = run_all(page, name, shots, dialogs)
        (tmp_path / "seen.json").write_text(json.dumps({"results": results, "dialogs": dialogs}, indent=1))
        problems = []
        for name, s in results.items():
            if s.get("errors"):
                problems.append(f"{name}: error outputs {s['errors']}")
            if s.get("executed") != s.get("code"):
                problems.append(f"{name}: {s.get('executed')} of {s.get('code')} code cells ran")
            if s.get("rendered_images", 0) < s.get("images", 0) or not s.get("images"):
                problems.append(f"{name}: {s.get('images')} plot(s) sent, {s.get('rendered_images')} shown as images")
            if s.get("fallbacks") or s.get("rendered_widgets", 0) < s.get("widgets", 0):
                problems.append(f"{name}: {s.get('widgets')} widget output(s), {s.get('rendered_widgets')} rendered, "
                                f"text fallbacks on the page: {s.get('fallbacks')}")
        assert not problems, "; ".join(problems) + f"\n(dialogs answered: {dialogs}; screenshots in {shots})"
        assert results["99_playground.ipynb"].get("widgets"), "the playground sent no widget: nothing was checked"
        restarts = [d for d in dialogs if "restart" in d.lower()]
        assert len(restarts) == len(NOTEBOOKS), f"expected one kernel-restart dialog per notebook: {dialogs}"
    except BaseException as exc:
        with contextlib.suppress(Exception):
            if context is not None:
                for i, p in enumerate(context.pages):
                    p.screenshot(path=str(shots / f"failure-{i}.png"), full_page=True)
        if isinstance(exc, AssertionError):
            raise AssertionError(f"{exc}\nscreenshots: {shots}\nJupyterLab log: {log}") from None
        raise
    finally:
        with contextlib.suppress(Exception):
            if context is not None:
                context.close()
        with contextlib.suppress(Exception):
            if pw is not None:
                pw.stop()
        stop_group(lab)
        if old_mark is None:
            os.environ.pop(MARK, None)
        else:
            os.environ[MARK] = old_mark
        # the kernels' clusters go down with their kernels (guard); give them a few seconds
        deadline = time.monotonic() + 20
        while marked(mark) and time.monotonic() < deadline:
            time.sleep(0.3)
        left = marked(mark)
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert not left, f"left running after the browser test: {[(p.pid, p.name()) for p in left]}"
