"""What a person sees, checked in headless Chromium (Debian's, driven by Playwright; `make
setup-browser` installs it): the exported report renders its plotly figures offline, the index
links to it, and in JupyterLab a notebook runs and moving an ipywidgets slider changes a plotly
FigureWidget.

Select with `-m browser`. Without Chromium the tests skip, except under CI=true, where they fail.
Screenshots land in each test's tmp dir.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
TIMEOUT_MS = 60_000
# The α explorer on tiny-random-llama: its own parameters where it declares them.
ALPHA_EXPLORER_PARAMS = dict(model="tiny-random-llama", n_calib=4, calib_seqlen=32, n_grid=4, max_tokens=64,
                             n_seq=2, device="cpu")


def chromium_path() -> str | None:
    cand = os.environ.get("AWQNB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return cand if Path(cand).is_file() and os.access(cand, os.X_OK) else None


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must run the browser tests: `make test` runs `make setup-browser`)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        _unavailable("no Chromium (run `make setup-browser`, or set AWQNB_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (it is pinned in requirements.txt: `make setup`)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=["--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, tmp_path):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(TIMEOUT_MS)
    pg = ctx.new_page()
    pg.console_errors = []
    pg.dialogs_seen = []
    pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
    pg.on("pageerror", lambda e: pg.console_errors.append(f"uncaught: {e}"))
    try:
        yield pg
    finally:
        try:
            pg.screenshot(path=str(tmp_path / "last.png"), full_page=True)
        except Exception:  # noqa: BLE001  best effort, for a failing test's tmp dir
            pass
        ctx.close()


# JS: what each plotly figure on the page holds and draws.
FIGURES_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(el => {
  const svg = el.querySelector('.main-svg');
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  const title = el.querySelector('.gtitle');
  return {
    traces: (el._fullData || el.data || []).length,
    svgs: el.querySelectorAll('.main-svg').length,
    width: box.width, height: box.height,
    drawn: el.querySelectorAll('g.trace, .trace, .hm image, .imagelayer image, .heatmaplayer image').length,
    title: title ? title.textContent : null,
    data: JSON.stringify((el.data || []).map(t => [t.x, t.y, t.z].map(v => v ? Array.from(v) : null))),
  };
})"""


# --- the exported report ----------------------------------------------------------------

def test_report_html_renders_its_figures_offline(report_batch, page, tmp_path):
    run = report_batch.runs["tiny-random-llama"]
    assert run["state"] == "ok", run["error"]
    remote = []  # the export must not need the network (nor is there one here)
    page.on("request", lambda r: r.url.startswith(("http:", "https:")) and remote.append(r.url))
    page.goto(run["html"].as_uri(), wait_until="load")
    page.wait_for_selector(".js-plotly-plot .main-svg", state="attached")
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 3")
    figs = page.evaluate(FIGURES_JS)
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert len(figs) >= 3, figs  # perplexity bars, α curves, α map
    for f in figs:
        assert f["traces"] > 0 and f["svgs"] > 0 and f["drawn"] > 0, f
        assert f["width"] > 100 and f["height"] > 100, f
    assert not remote, f"the report asked the network for {remote}"
    assert not page.console_errors, page.console_errors
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_index_lists_runs_and_opens_a_report(report_batch, page, tmp_path):
    page.goto(report_batch.index.as_uri())
    rows = page.locator("tbody tr")
    assert rows.count() >= 4  # failed run (one row) + fp, rtn, awq of the good one
    assert page.locator("tr.failed", has_text="no-such-model").count() == 1
    ok = report_batch.runs["tiny-random-llama"]
    link = page.locator(f'a[href="{ok["html"].relative_to(report_batch.out).as_posix()}"]')
    assert link.count() == 1
    page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
    link.click()
    page.wait_for_url(ok["html"].as_uri())
    page.wait_for_selector(".js-plotly-plot .main-svg", state="attached")
    assert not page.console_errors, page.console_errors


# --- JupyterLab ---------------------------------------------------------------------------

DEMO_CELLS = [
    "import ipywidgets as widgets\n"
    "import numpy as np\n"
    "import plotly.graph_objects as go\n"
    "from IPython.display import display",
    "x = np.linspace(0.0, 1.0, 41)\n"
    "fig = go.FigureWidget(go.Scatter(x=x, y=x ** 1.0, mode='lines', name='x^alpha'),\n"
    "                      layout=dict(title=dict(text='alpha = 1.00'), width=520, height=340))\n"
    "slider = widgets.FloatSlider(value=1.0, min=0.5, max=3.0, step=0.25, description='alpha')\n"
    "def redraw(change):\n"
    "    with fig.batch_update():\n"
    "        fig.data[0].y = x ** change['new']\n"
    "        fig.layout.title.text = f\"alpha = {change['new']:.2f}\"\n"
    "slider.observe(redraw, names='value')\n"
    "display(widgets.VBox([slider, fig]))",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook_for_lab(dest: Path) -> Path:
    """alpha_explorer.ipynb with tiny-random-llama parameters if it exists, else a minimal
    slider + FigureWidget notebook."""
    src = NOTEBOOK_DIR / "alpha_explorer.ipynb"
    if src.is_file():
        from papermill.iorw import load_notebook_node
        from papermill.parameterize import parameterize_notebook

        from awqnb.workbench import notebook_run

        nb = load_notebook_node(str(src))  # what papermill's parameterize expects (every cell has tags)
        known = notebook_run.notebook_parameters(src)
        nb = parameterize_notebook(nb, {k: v for k, v in ALPHA_EXPLORER_PARAMS.items() if k in known})
        path = dest / "alpha_explorer.ipynb"
    else:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in DEMO_CELLS])
        path = dest / "widget_demo.ipynb"
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")  # this environment's (notebook_run.kernel_name checks it)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": spec.display_name, "language": "python"}
    nbformat.write(nb, path)
    return path


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and every process it started (kernels run in their own sessions)."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # jupyter shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for k in kids:
        try:
            k.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(kids, timeout=10)


@pytest.fixture
def jupyter_lab(tmp_path):
    """`jupyter lab` from this environment, headless and token-less on a free loopback port, rooted
    in a tmp dir holding a copy of the notebook; its own config/settings/workspace dirs."""
    work = tmp_path / "lab"
    work.mkdir()
    nb = _notebook_for_lab(work)
    home = tmp_path / "jupyter-home"
    # No news toast over the notebook (it could cover what the test clicks).
    page_config = home / "config" / "labconfig" / "page_config.json"
    page_config.parent.mkdir(parents=True)
    page_config.write_text(json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               OMP_NUM_THREADS="1")
    port = _free_port()
    log = (tmp_path / "jupyter.log").open("wb")
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           "--ServerApp.port_retries=0", "--IdentityProvider.token=", "--ServerApp.password=",
           f"--ServerApp.root_dir={work}", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--ServerApp.terminals_enabled=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI and these machines run as root
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited ({proc.returncode}):\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer in 60 s:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, nb
    finally:
        _stop(proc)
        log.close()


def _accept_dialog(page) -> None:
    """Accept a JupyterLab dialog if one is up (such as 'Select Kernel', whose default is the
    notebook's own kernel), once: wait for it to close before anything else is clicked."""
    dialog = page.locator(".jp-Dialog")
    if not dialog.count():
        return
    page.dialogs_seen.append(dialog.first.inner_text().replace("\n", " | ")[:200])
    assert len(page.dialogs_seen) <= 5, f"JupyterLab keeps asking: {page.dialogs_seen}"
    dialog.first.locator(".jp-Dialog-button.jp-mod-accept").first.click()
    dialog.first.wait_for(state="detached", timeout=10_000)


def _wait(page, selector: str, timeout_s: float = TIMEOUT_MS / 1000) -> None:
    """Wait until `selector` is on the page, accepting any dialog JupyterLab puts up meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not page.locator(selector).count():
        _accept_dialog(page)
        assert time.monotonic() < deadline, f"no {selector} after {timeout_s:.0f} s"
        page.wait_for_timeout(250)


def _run_all(page) -> None:
    """Run > Run All Cells, as a person would; again if no cell started within 8 s (a click that
    lands while JupyterLab is still settling, or a kernel dialog that popped up over it, is lost)."""
    started = page.locator(".jp-InputPrompt", has_text=re.compile(r"\[(\*|\d+)\]"))
    for attempt in range(4):
        _wait(page, ".jp-Notebook-ExecutionIndicator[data-status='idle']")
        page.wait_for_timeout(1000)
        _accept_dialog(page)
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).first.click()
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            if started.count():
                return
            page.wait_for_timeout(250)
        page.keyboard.press("Escape")  # close a menu left open
    pytest.fail("Run > Run All Cells did not start any cell")


def _plots_state(page) -> str:
    return json.dumps([(f["title"], f["data"]) for f in page.evaluate(FIGURES_JS)])


def test_jupyterlab_runs_notebook_and_slider_moves_the_figure(jupyter_lab, page, tmp_path):
    url, nb = jupyter_lab
    page.goto(f"{url}/lab/tree/{nb.name}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", state="visible")
    _wait(page, ".jp-Notebook-ExecutionIndicator[data-status='idle']")  # the kernel is up
    _run_all(page)
    _wait(page, ".jp-OutputArea .widget-slider", timeout_s=180)
    _wait(page, ".jp-OutputArea .js-plotly-plot .main-svg", timeout_s=180)
    _wait(page, ".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout_s=180)
    sliders = page.locator(".jp-OutputArea .widget-slider")
    alpha = sliders.filter(has=page.locator(".widget-label", has_text=re.compile(r"α|alpha", re.I)))
    slider = alpha.first if alpha.count() else sliders.first
    errors = page.locator(".jp-OutputArea-output", has_text=re.compile(r"Traceback|Error displaying widget|"
                                                                         r"Failed to load model class"))
    assert errors.count() == 0, errors.first.inner_text()
    figs = page.evaluate(FIGURES_JS)
    assert figs and all(f["traces"] > 0 and f["drawn"] > 0 for f in figs), figs
    before = _plots_state(page)
    readout = slider.locator(".widget-readout").first
    value_before = readout.inner_text()
    page.screenshot(path=str(tmp_path / "lab-before.png"), full_page=True)

    handle = slider.locator(".noUi-handle").first
    handle.focus()
    for _ in range(2):
        handle.press("ArrowRight")
    if readout.inner_text() == value_before:  # no keyboard support: drag the handle instead
        box = handle.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2 + 60, box["y"] + box["height"] / 2, steps=5)
        page.mouse.up()
    assert readout.inner_text() != value_before, "the slider did not move"
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while _plots_state(page) == before:
        assert time.monotonic() < deadline, "the figure did not change after moving the slider"
        page.wait_for_timeout(200)
    page.screenshot(path=str(tmp_path / "lab-after.png"), full_page=True)
    if nb.name == "widget_demo.ipynb":  # the callback ran in the kernel and the new title is drawn
        page.wait_for_function("v => Array.from(document.querySelectorAll('.js-plotly-plot .gtitle'))"
                               ".some(t => t.textContent === 'alpha = ' + v)", arg=readout.inner_text())
