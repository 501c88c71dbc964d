"""Report runs: execute a parameterised notebook with papermill, export it to HTML, keep an index.

Layout (ARCHITECTURE.md): `<output_dir>/<model>/<run>/` holds one executed notebook
(`<notebook>.ipynb`), its HTML export (`<notebook>.html`, plotly.js embedded: it opens offline),
the `metrics.json` the notebook wrote and `run.json` (state 'ok' or 'failed', parameters, error).
`run` = timestamp + a short config tag (`20250101-120000_w4_g128_rtn-awq_1a2b3c`). A run is built
in a temporary directory next to it and moved into place when done, failed runs included: the
executed copy keeps the error, and a batch goes on with the next model.
`<output_dir>/index.html` links every run found under `output_dir` with its headline numbers.
`run_models` (what `awqnb report` calls) runs one notebook per model, rewrites the index after
each and returns every run's outcome, so the command can exit non-zero naming the failed ones.

Parameters: each line of a notebook's `parameters` cell is `name: type = literal  # help`, the form
papermill parses, so `papermill --help-notebook notebooks/<notebook>.ipynb` documents all of them.

The notebook side: `write_metrics` is the one writer of `metrics.json` (schema below) and
`read_metrics` its reader, so the index and the notebooks agree on one format.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from awqnb.analysis import stats
from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.files import atomic_write, clean_stale, current_umask, temp_prefix

log = logging.getLogger(__name__)

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
KERNEL_NAME = "python3"
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
METRICS_SCHEMA = 1
# What every number in metrics.json carries (and the index shows).
HEADLINE = ("model", "method", "bits", "group_size", "calibration", "dataset", "protocol", "seqlen", "ppl")


# --- small helpers shared with the notebooks ----------------------------------------------

def as_list(value: str | Iterable[str]) -> list[str]:
    """'rtn,awq' or ['rtn', 'awq'] → ['rtn', 'awq'] (papermill passes either)."""
    if isinstance(value, str):
        items = value.split(",")
    else:
        items = list(value)
    out = [str(v).strip() for v in items if str(v).strip()]
    if not out:
        raise AwqnbError("no methods given; pass e.g. methods='rtn,awq'.")
    return out


def as_list_or_empty(value) -> list[str]:
    """`as_list`, but [] instead of an error when nothing is given."""
    try:
        return as_list(value)
    except AwqnbError:
        return []


def clean_json(o):
    """JSON-safe copy: NaN/Inf → None, numpy scalars → Python, tensors → lists, Paths → str."""
    if isinstance(o, Mapping):
        return {str(k): clean_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_json(v) for v in o]
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, (str, int, bool)) or o is None:
        return o
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):  # numpy scalar/array, torch tensor
        return clean_json(o.tolist())
    if hasattr(o, "item"):
        return clean_json(o.item())
    return str(o)


def write_metrics(output_dir: str | Path, results: Mapping[str, Mapping[str, Any]], table=None,
                  **provenance) -> Path:
    """Write `<output_dir>/metrics.json` atomically.

    results: label → dataset → `PerplexityResult` (the shape `comparison_table` takes); each
    result's `meta` should hold model, method, bits, group_size and calibration (None for FP /
    RTN). table: the `comparison_table` of those results (adds delta_pct, ci_low, ci_high,
    verdict and noise: awqnb.analysis.stats). provenance: anything else to record (params, versions, seed,
    device, timings...).

    Schema: {"schema": 1, "created": ISO time, **provenance, "results": [one row per number:
    label, model, method, bits, group_size, calibration, dataset, protocol, seqlen, n_units,
    ppl, eval_seconds, delta_pct, ci_low, ci_high, verdict, noise, plus any other meta keys]}.
    """
    deltas = {}
    if table is not None:
        for r in table.to_dict("records"):
            deltas[(r["method"], r["dataset"])] = {k: r[k] for k in ("delta_pct", "ci_low", "ci_high", "verdict", "noise")
                                                   if k in r}
    rows = []
    for label, per_ds in results.items():
        for ds, res in per_ds.items():
            meta = dict(res.meta)
            row = {"label": label}
            row.update({k: meta.pop(k, None) for k in ("model", "method", "bits", "group_size", "calibration")})
            if row["method"] is None:
                row["method"] = label
            row.update(dataset=res.dataset, protocol=res.protocol, seqlen=res.seqlen, n_units=res.n_units,
                       ppl=res.ppl, eval_seconds=res.seconds)
            row.update(deltas.get((label, ds), {}))
            row.update(meta)
            rows.append(row)
    doc = {"schema": METRICS_SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           **provenance, "results": rows}
    text = json.dumps(clean_json(doc), indent=1, allow_nan=False)
    return atomic_write(Path(output_dir) / METRICS_FILE, text)


def read_metrics(path: str | Path) -> dict:
    """A `metrics.json` (file or run directory) as a dict; AwqnbError if missing or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AwqnbError(f"cannot read {path}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise AwqnbError(f"{path} is not an awqnb metrics file (no 'results' list).")
    return doc


def style_comparison(table):
    """The comparison table as a pandas Styler: numbers rounded, verdicts that tell (better, worse)
    in bold, deltas coloured (green = lower perplexity than the baseline)."""
    fmt = {"ppl": "{:.3f}", "delta_pct": "{:+.2f}", "ci_low": "{:+.2f}", "ci_high": "{:+.2f}",
           "seqlen": "{:.0f}", "units": "{:.0f}", "bits": "{:.0f}", "group_size": "{:.0f}"}

    def colour(v):
        if not isinstance(v, (int, float)) or v != v or v == 0:
            return ""
        return "color: #1a7f37" if v < 0 else "color: #b42318"

    sty = table.style.format({k: v for k, v in fmt.items() if k in table.columns}, na_rep="—")
    if "delta_pct" in table.columns:
        sty = sty.map(colour, subset=["delta_pct"])
    if "verdict" in table.columns:
        sty = sty.map(lambda v: "font-weight: bold" if v in (stats.BETTER, stats.WORSE) else "", subset=["verdict"])
    return sty.hide(axis="index")


# --- kernel, parameters -------------------------------------------------------------------

def kernel_name(name: str = KERNEL_NAME) -> str:
    """The Jupyter kernel to run notebooks with, checked to be this environment's Python.

    `make setup` installs it into the venv (`python -m ipykernel install --sys-prefix`); Jupyter
    finds the venv's kernels first when running from the venv. A spec whose argv[0] is a bare
    'python'/'python3' is run by jupyter_client with this interpreter (`sys.executable`); an
    absolute path must be in this environment's bin directory."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    fix = f"run `{sys.executable} -m ipykernel install --sys-prefix --name {name}` (make setup does this)"
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel as e:
        raise AwqnbError(f"no Jupyter kernel named {name!r}; {fix}.") from e
    exe = spec.argv[0] if spec.argv else ""
    bare = {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}
    if exe in bare:
        return name
    here = Path(sys.executable).absolute().parent
    if Path(exe).absolute().parent != here:
        raise AwqnbError(f"the Jupyter kernel {name!r} ({spec.resource_dir}) runs {exe}, not this environment's "
                         f"Python ({sys.executable}), so it would not see this awqnb; {fix}.")
    return name


def notebook_path(notebook: str) -> Path:
    """`notebooks/<notebook>.ipynb` (a name), or an explicit .ipynb path."""
    p = Path(notebook)
    if p.suffix == ".ipynb" and p.is_file():
        return p
    cand = NOTEBOOK_DIR / f"{notebook}.ipynb"
    if not cand.is_file():
        known = sorted(f.stem for f in NOTEBOOK_DIR.glob("*.ipynb"))
        raise AwqnbError(f"unknown notebook {notebook!r}: no {cand}; available: {', '.join(known) or 'none'}.")
    return cand


def notebook_parameters(path: Path) -> dict:
    """name → default (as written) of the notebook's `parameters` cell."""
    import papermill as pm

    return {k: v.get("default") for k, v in pm.inspect_notebook(str(path)).items()}


# counts and lengths that must be whole numbers of at least this (zero or negative means nothing)
_MINIMUM = {"n_calib": 1, "calib_seqlen": 2, "eval_seqlen": 2, "eval_windows": 1, "n_samples": 1,
            "sample_max_length": 2, "n_grid": 1, "max_tokens": 2, "n_seq": 1, "n_boot": 1, "diag_samples": 0,
            "worst_n": 1, "top_k": 1}


def _type_ok(value, type_name: str, name: str) -> bool:
    t = type_name.replace(" ", "").strip("'\"")
    if t.startswith("Optional[") and t.endswith("]"):
        return value is None or _type_ok(value, t[len("Optional["):-1], name)
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "bool":
        return isinstance(value, bool)
    if t == "str":
        return isinstance(value, str)
    if t.startswith("list[str]"):  # `methods` also takes one comma-separated string
        return (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)) or (
            name == "methods" and isinstance(value, str))
    if t.startswith("dict"):
        return isinstance(value, Mapping)
    return True  # a type this check does not know: the notebook's own checks apply


def check_parameter_types(path: Path, params: Mapping[str, Any]) -> None:
    """AwqnbError for a parameter of the wrong type for the notebook's parameters cell (e.g.
    n_calib="16", sample_datasets="ag_news") or a count / length below its minimum, before any
    notebook starts."""
    import papermill as pm

    types = {k: v.get("inferred_type_name") or "" for k, v in pm.inspect_notebook(str(path)).items()}
    for k, v in params.items():
        t = types.get(k)
        if t and not _type_ok(v, t, k):
            raise AwqnbError(f"notebook parameter {k}={v!r} ({type(v).__name__}) must be {t} for {path.name}; "
                             f"e.g. --param {k}={_example(t)}.")
        lo = _MINIMUM.get(k)
        if lo is not None and v is not None and _type_ok(v, "int", k) and v < lo:
            raise AwqnbError(f"notebook parameter {k}={v} must be at least {lo}.")


def _example(type_name: str) -> str:
    return {"int": "16", "float": "0.5", "bool": "true", "str": "wikitext2", "Optional[int]": "8"}.get(
        type_name, "[ag_news]" if type_name.startswith("list") else "{}")


def safe_name(name: str) -> str:
    """A model name as a directory name: its short name, unsafe characters replaced, at most 80 characters."""
    from awqnb.model.models import short_name  # local: report loads without torch

    s = re.sub(r"[^A-Za-z0-9._+-]+", "_", short_name(str(name))).strip("._") or "model"
    return s[:80]


def run_name(params: Mapping[str, Any], now: datetime | None = None) -> str:
    """timestamp + short config tag: `20250101-120000_w4_g128_rtn-awq_1a2b3c` (the hash covers
    every parameter, so two configs never share a name)."""
    now = now or datetime.now()
    try:
        qtag = QuantConfig(int(params.get("bits", 4)), int(params.get("group_size", 128))).tag
    except (AwqnbError, TypeError, ValueError):
        qtag = f"w{params.get('bits')}_g{params.get('group_size')}"
    methods = "-".join(as_list(params.get("methods", "")))[:40] if params.get("methods") else "none"
    h = hashlib.sha1(json.dumps(clean_json(params), sort_keys=True).encode()).hexdigest()[:6]
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", f"{now:%Y%m%d-%H%M%S}_{qtag}_{methods}_{h}")


# --- running ------------------------------------------------------------------------------

# The export opens offline: plotly.js is embedded by the notebook (plots.offline_notebook); the lab
# template's require.js (nothing here uses it) and MathJax (unless a markdown cell has `$` math)
# would come from a CDN, and so would the MathJax script plotly's notebook renderer puts before
# every figure (plotly draws without it: it only typesets LaTeX in figure text, which we don't use).
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- if resources.awqnb_mathjax -%}{{ super() }}{%- endif -%}{%- endblock html_head_js_mathjax -%}
"""
_REMOTE_MATHJAX = re.compile(r'<script\b[^>]*\bsrc="https?://[^"]*mathjax[^"]*"[^>]*>\s*</script>\s*', re.I)


def _strip_remote_mathjax(nb) -> int:
    """Remove `<script src="https://…mathjax…">` tags from the notebook's HTML outputs (in memory)."""
    n = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data") or {}
            h = data.get("text/html")
            if h is None:
                continue
            text = "".join(h) if isinstance(h, list) else h
            new, k = _REMOTE_MATHJAX.subn("", text)
            if k:
                data["text/html"] = new
                n += k
    return n


_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _strip_widgets(nb) -> int:
    """Drop widget outputs (tqdm bars from loaders) and the saved widget state: a static report
    cannot drive them, and their presence makes nbconvert load the widget manager from a CDN."""
    n = 0
    for cell in nb.cells:
        outs = cell.get("outputs")
        if not outs:
            continue
        keep = [o for o in outs if _WIDGET_VIEW not in (o.get("data") or {})]
        n += len(outs) - len(keep)
        cell["outputs"] = keep
    nb.metadata.pop("widgets", None)
    return n


def _export_html(ipynb: Path, dest: Path, hide_code: bool) -> None:
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(ipynb), as_version=4)
    math = any(c.cell_type == "markdown" and "$" in c.source for c in nb.cells)
    n = _strip_remote_mathjax(nb)
    log.debug("%s: removed %d remote MathJax script(s) from figure outputs", ipynb, n)
    log.debug("%s: left %d widget output(s) out of the HTML", ipynb, _strip_widgets(nb))
    exporter = HTMLExporter(template_name="lab", template_file="awqnb_offline.html.j2",
                            extra_loaders=[jinja2.DictLoader({"awqnb_offline.html.j2": _OFFLINE_TEMPLATE})])
    exporter.exclude_input = hide_code
    exporter.exclude_input_prompt = hide_code
    body, _ = exporter.from_notebook_node(nb, resources={"awqnb_mathjax": math})
    atomic_write(dest, body)


def _check_request(notebook: str, params: Mapping[str, Any] | None, methods) -> tuple[Path, dict, list[str], dict]:
    """The checks run before any work: (notebook path, params, methods list, the notebook's
    parameters); AwqnbError for an unknown notebook or parameter, or no methods."""
    nb_in = notebook_path(notebook)
    known = notebook_parameters(nb_in)
    if params is not None and not isinstance(params, Mapping):
        raise AwqnbError(f"notebook parameters must be a mapping of name to value, not {type(params).__name__}.")
    params = dict(params or {})
    if "output_dir" in params:
        log.warning("ignoring params['output_dir']=%r: the notebook writes into its run directory",
                    params.pop("output_dir"))
    for k in ("model", "methods"):
        if k in params:
            raise AwqnbError(f"pass {k} as run_report's argument, not in params.")
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise AwqnbError(f"unknown notebook parameter(s) {unknown} for {nb_in.name}; it takes {sorted(known)}.")
    check_parameter_types(nb_in, params)
    # a notebook without a `methods` parameter (alpha_explorer) takes none: nothing is injected
    takes_methods = "methods" in known
    method_list = as_list(methods) if takes_methods else as_list_or_empty(methods or "")
    if method_list and not takes_methods:
        log.warning("%s has no `methods` parameter; ignoring methods=%s", nb_in.name, method_list)
        method_list = []
    return nb_in, params, method_list, known


# How long nbclient waits, after a cell's reply, for the rest of its output (IOPub) before giving up
# on it: its default, 4 s, runs out on a loaded machine (load 10 on 2 cores failed a sweep run)
# and papermill makes that an error. Waiting longer costs nothing when the output comes; an error
# is still raised (a cell's output is never dropped silently) if it does not come at all.
IOPUB_TIMEOUT_S = 600


def _quiet_papermill_kwargs() -> dict:
    """papermill/nbclient settings that keep the kernel off the user's terminal: IPC transport
    (nothing listens on TCP, so ipykernel has no "running over TCP without encryption" warning to
    give) and the kernel's own log at ERROR."""
    from traitlets.config import Config

    kw = {"extra_arguments": ["--IPKernelApp.log_level=ERROR"]}
    if os.name == "posix":
        kw["config"] = Config({"KernelManager": {"transport": "ipc"}})
    return kw


def execute_into(nb_in: Path, run_dir: Path, nb_params: Mapping[str, Any], *, model: str, methods: list[str],
                 hide_code: bool = False, timeout: int | None = None) -> dict:
    """Execute `nb_in` with papermill into `run_dir/<stem>.ipynb` (cwd `run_dir`), export its HTML,
    and return the run record (state 'ok' or 'failed', error, parameters, timings). A failing
    notebook is a 'failed' record, not an exception; KeyboardInterrupt propagates."""
    import papermill as pm

    kernel = kernel_name()
    nb_out = run_dir / f"{nb_in.stem}.ipynb"
    record = {"state": "running", "model": model, "methods": list(methods), "notebook": nb_in.stem,
              "parameters": dict(nb_params), "kernel": kernel, "python": sys.executable,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "error": None}
    t0 = time.perf_counter()
    log.debug("report %s: running %s with %s", model, nb_in.name, dict(nb_params))
    try:
        pm.execute_notebook(str(nb_in), str(nb_out), parameters=dict(nb_params), kernel_name=kernel,
                            cwd=str(run_dir), progress_bar=False, log_output=False, execution_timeout=timeout,
                            iopub_timeout=max(IOPUB_TIMEOUT_S, timeout or 0), raise_on_iopub_timeout=True,
                            **_quiet_papermill_kwargs())
        record["state"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001  a failed notebook must not stop a batch
        record["state"] = "failed"
        # a cell's error reads as the user's own ("AwqnbError: unknown model ..."); anything else
        # (papermill, the kernel) keeps its exception name
        record["error"] = _short_error(e) if getattr(e, "ename", None) else f"{type(e).__name__}: {_short_error(e)}"
        log.error("report %s failed: %s", model, record["error"])
    record["seconds"] = round(time.perf_counter() - t0, 2)
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if nb_out.is_file():
        try:
            _export_html(nb_out, nb_out.with_suffix(".html"), hide_code)
        except Exception as e:  # noqa: BLE001  the notebook itself is kept
            record["html_error"] = f"{type(e).__name__}: {e}"
            log.error("report %s: HTML export failed: %s", model, e)
    return record


def run_report(model: str, methods: list[str] | str, params: dict | None = None, output_dir: str | Path = "reports",
               notebook: str = "model_report", *, hide_code: bool = False, timeout: int | None = None) -> Path:
    """Execute `notebooks/<notebook>.ipynb` for one model into `output_dir/<model>/<run>/`.

    params: overrides of the notebook's parameters (unknown names are an error); `model` and
    `methods` are set from the arguments, `output_dir` inside the notebook is the run directory.
    Returns the run directory. A failing notebook is not an exception: the run is kept with
    state 'failed' (executed copy with the error, its HTML, `run.json` with the message).
    timeout: seconds per cell (default: none). (`awqnb.workbench.sweep` runs grids of these, resumably.)
    """
    nb_in, params, method_list, known = _check_request(notebook, params, methods)
    nb_params = {**params, "model": model}
    if "methods" in known:
        nb_params["methods"] = method_list
    if "output_dir" in known:
        nb_params["output_dir"] = "."
    kernel_name()

    model_dir = Path(output_dir) / safe_name(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(model_dir)  # run directories of killed processes
    name = run_name(nb_params)
    dest = model_dir / name
    n = 2
    while dest.exists():
        dest = model_dir / f"{name}-{n}"
        n += 1
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest.name), dir=model_dir))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        try:
            record = execute_into(nb_in, tmp, nb_params, model=model, methods=method_list, hide_code=hide_code,
                                  timeout=timeout)
        except KeyboardInterrupt:
            record = {"state": "interrupted", "model": model, "notebook": nb_in.stem, "parameters": nb_params,
                      "error": "KeyboardInterrupt"}
            _finish_run(record, tmp, dest)
            raise
        return _finish_run(record, tmp, dest)
    except OSError as e:  # the disk filled up: nothing of the run is kept
        shutil.rmtree(tmp, ignore_errors=True)
        raise AwqnbError(f"could not write the report run {dest} ({e.strerror or e}); nothing of it was kept. "
                         "Free some space or choose another output_dir.") from e
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish_run(record: dict, tmp: Path, dest: Path) -> Path:
    """Write run.json (last, listing every file's size) and move the temporary run directory into place."""
    record["files"] = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*"))
                       if f.is_file() and f.name != RUN_FILE}
    record["complete"] = True
    atomic_write(tmp / RUN_FILE, json.dumps(clean_json(record), indent=1))
    for i in range(100):
        target = dest if i == 0 else dest.with_name(f"{dest.name}-{os.getpid()}-{i}")
        try:
            tmp.rename(target)  # fails if another run took the name meanwhile
            break
        except OSError:
            if i == 99:
                raise
    log.info("report %s: %s (%s s)", target, record["state"], record.get("seconds"))
    return target


def manifest_ok(run_dir: Path, rec: Mapping[str, Any]) -> bool:
    """Every file `run.json` lists is there with its size (runs written before the manifest: True)."""
    files = rec.get("files")
    if not isinstance(files, Mapping):
        return True
    for rel, size in files.items():
        f = run_dir / rel
        try:
            if f.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


_CELL_TIMEOUT = re.compile(r"after (?P<t>[\d.]+) seconds\.\s*The message was: (?P<msg>.*?)\.?\s*\n"
                           r".*?-{5,}\s*\n(?P<src>.*?)\n-{5,}", re.S)


def _cell_timeout_text(text: str) -> str | None:
    """nbclient's CellTimeoutError (its text: what timed out, then the cell between rules of
    dashes) as one line saying what timed out, after how long, in which cell."""
    import ast

    m = _CELL_TIMEOUT.search(text)
    if m is None:
        return None
    first = next((ln.strip() for ln in m["src"].splitlines() if ln.strip()), "")
    if first.startswith("["):  # a long cell is previewed as the repr of a list of its lines
        try:
            first = next((ln.strip() for ln in ast.literal_eval(first) if ln.strip()), "")
        except (ValueError, SyntaxError, TypeError):
            pass
    where = f"the cell starting `{first[:80]}`" if first else "a cell"
    if "iopub" in m["msg"].lower():
        return (f"{where} finished, but its output did not arrive within {m['t']} s (the kernel's IOPub "
                f"messages: {m['msg']}); the machine is overloaded or the kernel lost them: run it again")
    return f"{where} ran longer than its {m['t']} s limit ({m['msg']}); raise --timeout or leave it unset"


def _short_error(e: Exception) -> str:
    """papermill's error: the exception name and value from the failing cell, not its traceback; a
    timeout says what timed out, where and after how long."""
    ename, evalue = getattr(e, "ename", None), getattr(e, "evalue", None)
    if ename:
        return f"{ename}: {evalue}"
    text = str(e).strip()
    timed_out = _cell_timeout_text(text) if isinstance(e, TimeoutError) else None
    if timed_out:
        return timed_out
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().strip("-=~")]  # not a rule of dashes
    return lines[-1][:500] if lines else type(e).__name__


@dataclass
class RunOutcome:
    """One model of a batch: its run directory (None if the run could not even be set up),
    state ('ok', 'failed', ...) and error message."""
    model: str
    dir: Path | None
    state: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok"


@dataclass
class BatchResult:
    """What `run_models` did: the index it wrote and one outcome per model, in order."""
    index: Path
    runs: list[RunOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[RunOutcome]:
        return [r for r in self.runs if not r.ok]


def run_models(models: list[str] | str, methods: list[str] | str, params: dict | None = None,
               output_dir: str | Path = "reports", notebook: str = "model_report", **kwargs) -> BatchResult:
    """`run_report` for each model into `output_dir/<model>/<run>/`, updating
    `output_dir/index.html` after each; returns a `BatchResult`.

    Mistakes in the request (unknown notebook or parameter, no methods, no usable kernel) raise
    AwqnbError before any model runs. After that, nothing one model does stops the others: a
    failing notebook is kept as a 'failed' run (executed copy with the error), and an error
    outside the notebook is logged and recorded in the outcome. KeyboardInterrupt stops the batch.
    """
    models = as_list(models) if isinstance(models, str) else [str(m).strip() for m in models if str(m).strip()]
    if not models:
        raise AwqnbError("no models given; pass e.g. models='tiny-random-llama,smollm2-135m'.")
    _check_request(notebook, params, methods)
    kernel_name()
    output_dir = Path(output_dir)
    outcomes: list[RunOutcome] = []
    try:
        for i, m in enumerate(models, 1):
            log.info("batch %d/%d: %s", i, len(models), m)
            try:
                d = run_report(m, methods, params, output_dir=output_dir, notebook=notebook, **kwargs)
            except Exception as e:  # noqa: BLE001  one model's trouble must not stop the batch
                log.error("report for %s could not run: %s: %s", m, type(e).__name__, e)
                outcomes.append(RunOutcome(m, None, "failed", f"{type(e).__name__}: {e}"))
            else:
                rec = read_json_file(d / RUN_FILE)
                outcomes.append(RunOutcome(m, d, rec.get("state") or "unknown", rec.get("error")))
            try:
                write_index(output_dir)
            except OSError as e:
                log.error("could not update %s: %s", output_dir / "index.html", e)
    finally:
        index = write_index(output_dir)
    result = BatchResult(index, outcomes)
    if result.failed:
        log.warning("%d of %d report(s) failed: %s", len(result.failed), len(outcomes),
                    "; ".join(f"{r.model} ({r.dir or 'no run directory'}): {r.error}" for r in result.failed))
    return result


def run_batch(models: list[str] | str, methods: list[str] | str, params: dict | None = None,
              output_dir: str | Path = "reports", notebook: str = "model_report", **kwargs) -> Path:
    """`run_models`, returning only the index path (see `run_models` for the outcomes)."""
    return run_models(models, methods, params, output_dir=output_dir, notebook=notebook, **kwargs).index


# --- index --------------------------------------------------------------------------------

def read_json_file(path: Path) -> dict:
    """The JSON object in `path`, or {} when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def find_runs(output_dir: str | Path) -> list[dict]:
    """Every run under `output_dir` (`<model>/<run>/` holding run.json or metrics.json), newest
    first: {dir, rel, run, model, state, error, started, notebook, html, ipynb, metrics}."""
    root = Path(output_dir)
    out = []
    for d in sorted(root.glob("*/*")):
        if d.name.startswith(".") or d.parent.name.startswith(".") or not d.is_dir():
            continue
        rec = read_json_file(d / RUN_FILE)
        has_metrics = (d / METRICS_FILE).is_file()
        if not rec and not has_metrics:
            continue
        metrics = None
        if has_metrics:
            try:
                metrics = read_metrics(d)
            except AwqnbError as e:
                log.warning("%s", e)
        nb = rec.get("notebook")
        html_f = d / f"{nb}.html" if nb else next(iter(sorted(d.glob("*.html"))), None)
        ipynb = d / f"{nb}.ipynb" if nb else next(iter(sorted(d.glob("*.ipynb"))), None)
        state = rec.get("state") or ("ok" if metrics else "unknown")
        if rec and not manifest_ok(d, rec):
            state = "incomplete"  # a file run.json lists is missing or cut short
        elif state == "ok" and metrics is None:
            state = "ok (no metrics.json)"
        out.append({"dir": d, "rel": d.relative_to(root).as_posix(), "run": d.name,
                    "model": rec.get("model") or d.parent.name, "state": state, "error": rec.get("error"),
                    "started": rec.get("started") or "", "notebook": nb,
                    "html": html_f if html_f is not None and html_f.is_file() else None,
                    "ipynb": ipynb if ipynb is not None and ipynb.is_file() else None, "metrics": metrics})
    _add_claims(root, out)
    out.sort(key=lambda r: (r["started"], r["run"]), reverse=True)
    return out


def claim_state(path: Path) -> str:
    """'running' while a sweep holds the claim on a run (its lock), 'interrupted' once nobody does."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "interrupted"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return "interrupted"
    except BlockingIOError:
        return "running"
    finally:
        os.close(fd)


def _add_claims(root: Path, runs: list[dict]) -> None:
    """Runs a sweep claimed (`<model>/.<run>.claim`, see awqnb.workbench.sweep): shown as running or
    interrupted; a finished run whose redo is under way says so in its state."""
    by_dir = {r["rel"]: r for r in runs}
    for c in sorted(root.glob("*/.*.claim")):
        rel = f"{c.parent.name}/{c.name[1:-len('.claim')]}"
        state = claim_state(c)
        info = read_json_file(c)
        if rel in by_dir:
            if state == "running" or by_dir[rel]["state"] != "ok":  # an unheld claim on a done run is spent
                by_dir[rel]["state"] += f" ({'rerunning' if state == 'running' else 'redo interrupted'})"
            continue
        runs.append({"dir": root / rel, "rel": rel, "run": rel.split("/", 1)[1], "model": info.get("model") or c.parent.name,
                     "state": state, "error": None, "started": info.get("started") or "",
                     "notebook": info.get("notebook"), "html": None, "ipynb": None, "metrics": None})


def _cell(v, fmt=None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if fmt:
        try:
            return fmt.format(v)
        except (TypeError, ValueError):
            pass
    return html.escape(str(v))


def _calib(c) -> str:
    if not c:
        return "—"
    if isinstance(c, Mapping):
        return html.escape(f"{c.get('dataset')} {c.get('n_calib')}×{c.get('seqlen')}")
    return html.escape(str(c))


def _bits(row) -> str:
    b, g = row.get("bits"), row.get("group_size")
    if b is None:
        return "—", "—"
    return f"W{b}", ("per-channel" if g == -1 else _cell(g))


def index_html(runs: list[dict], root: Path) -> str:
    head = ("run", "state", "model", "method", "bits", "group size", "calibration", "dataset", "protocol",
            "seqlen", "ppl", "Δ % vs FP [95% CI]")
    rows = []
    for r in runs:
        link = r["html"] or r["ipynb"]
        name = html.escape(r["run"])
        run_cell = f'<a href="{html.escape(link.relative_to(root).as_posix())}">{name}</a>' if link else name
        extras = []
        if r["ipynb"] and r["html"]:
            extras.append(f'<a href="{html.escape(r["ipynb"].relative_to(root).as_posix())}">ipynb</a>')
        if r["metrics"]:
            extras.append(f'<a href="{html.escape(r["rel"])}/{METRICS_FILE}">metrics</a>')
        run_cell += (" <small>(" + ", ".join(extras) + ")</small>") if extras else ""
        if r["notebook"]:
            run_cell += f'<br><small>{html.escape(r["notebook"])}</small>'  # which report this run is
        state = html.escape(r["state"])
        cls = {"ok": "ok", "running": "running", "interrupted": "interrupted"}.get(r["state"], "failed")
        results = (r["metrics"] or {}).get("results") or []
        if not results:
            err = f'<br><small>{html.escape(r["error"])}</small>' if r["error"] else ""
            what = ("no perplexity results (see the report)" if r["metrics"] else
                    "in progress" if r["state"] == "running" else
                    "not finished: rerun the sweep to complete it" if r["state"] == "interrupted" else "no metrics")
            rows.append(f'<tr class="{cls}"><td>{run_cell}</td><td>{state}{err}</td><td>{html.escape(r["model"])}</td>'
                        + f'<td colspan="9">{what}</td></tr>')
            continue
        for i, m in enumerate(results):
            bits, gs = _bits(m)
            d = m.get("delta_pct")
            baseline = (m.get("verdict") or m.get("winner")) == "(baseline)"  # (runs written before awqnb.analysis.stats: winner)
            delta = "—" if d is None or baseline else (
                f"{d:+.2f} [{_cell(m.get('ci_low'), '{:+.2f}')}, {_cell(m.get('ci_high'), '{:+.2f}')}]")
            first = f"<td>{run_cell}</td><td>{state}</td>" if i == 0 else "<td></td><td></td>"
            rows.append(
                f'<tr class="{cls}">{first}<td>{_cell(m.get("model"))}</td><td>{_cell(m.get("method"))}</td>'
                f"<td>{bits}</td><td>{gs}</td><td>{_calib(m.get('calibration'))}</td><td>{_cell(m.get('dataset'))}</td>"
                f"<td>{_cell(m.get('protocol'))}</td><td>{_cell(m.get('seqlen'))}</td>"
                f"<td class=num>{_cell(m.get('ppl'), '{:.3f}')}</td><td class=num>{delta}</td></tr>")
    now = datetime.now().strftime("%Y-%m-%d %H:%M")
    body = "\n".join(rows) if rows else f'<tr><td colspan="{len(head)}">no runs yet</td></tr>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>awqnb reports</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.failed td {{ background: #fff1f0; }} tr.running td {{ background: #eef6ff; }}
tr.interrupted td {{ background: #fff8e6; }}
</style></head><body>
<h1>awqnb reports</h1>
<p>{len(runs)} run(s) under <code>{html.escape(str(root))}</code>, newest first; written {now}.
Perplexity: protocol and seqlen as listed; Δ is against the FP model with a bootstrap 95% interval.</p>
<table><thead><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""


def write_index(output_dir: str | Path) -> Path:
    """(Re)write `output_dir/index.html` atomically from every run found; returns its path."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    return atomic_write(root / "index.html", index_html(find_runs(root), root))
