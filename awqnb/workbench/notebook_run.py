"""Run one report notebook: papermill executes it into a run directory, which gets its HTML export
and `run.json`.

`run_report(model, methods, params)` → `<output_dir>/<model>/<run>/` (layout: awqnb.workbench.report);
`run` = timestamp + a short config tag (`20250101-120000_w4_g128_rtn-awq_1a2b3c`). A run is built
in a temporary directory next to it and moved into place when done, failed runs included: the
executed copy keeps the error. `execute_into` is the step `awqnb.workbench.sweep` (what
`awqnb report` runs) uses for each run of a grid.

Parameters: each line of a notebook's `parameters` cell is `name: type = literal  # help`, the form
papermill parses, so `papermill --help-notebook notebooks/<notebook>.ipynb` documents all of them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.files import atomic_write, clean_stale, current_umask, temp_prefix
from awqnb.workbench.html_export import export_html
from awqnb.workbench.report import RUN_FILE, as_list, as_list_or_empty, clean_json

log = logging.getLogger(__name__)

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
KERNEL_NAME = "python3"


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
    from awqnb.model.sources import short_name  # local: report loads without torch

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


@functools.cache
def kernel_manager_class():
    """jupyter_client's AsyncKernelManager whose kernel process writes its stdout and stderr to
    `output_file` (a config trait) instead of the terminal: what the kernel prints outside any cell
    (the "ZMQError: Socket operation on non-socket" traceback it logs when Ctrl-C stops the runner
    mid-reply, a crash) goes to the run's kernel log. The kernel runs in a session of its own
    (jupyter_client starts it so), so the terminal's Ctrl-C reaches only the runner, which then
    shuts it down."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import Unicode

    class AwqnbKernelManager(AsyncKernelManager):
        output_file = Unicode("", config=True, help="file for the kernel process's stdout and stderr")

        async def start_kernel(self, **kw):
            if not self.output_file:
                return await super().start_kernel(**kw)
            with open(self.output_file, "ab") as f:  # the kernel keeps its own copy of the descriptor
                kw.setdefault("stdout", f)
                kw.setdefault("stderr", f)
                return await super().start_kernel(**kw)

    return AwqnbKernelManager


def _quiet_papermill_kwargs(kernel_log: Path | None = None) -> dict:
    """papermill/nbclient settings that keep the kernel off the user's terminal: IPC transport
    (nothing listens on TCP, so ipykernel has no "running over TCP without encryption" warning to
    give), the kernel's own log at ERROR, and its stdout/stderr in `kernel_log`."""
    from traitlets.config import Config

    conf: dict = {}
    kw = {"extra_arguments": ["--IPKernelApp.log_level=ERROR"]}
    if os.name == "posix":
        conf["KernelManager"] = {"transport": "ipc"}
    if kernel_log is not None:
        kw["kernel_manager_class"] = kernel_manager_class()
        conf["AwqnbKernelManager"] = {"output_file": str(kernel_log)}
    if conf:
        kw["config"] = Config(conf)
    return kw


def execute_into(nb_in: Path, run_dir: Path, nb_params: Mapping[str, Any], *, model: str, methods: list[str],
                 hide_code: bool = False, timeout: int | None = None, kernel_log: Path | None = None) -> dict:
    """Execute `nb_in` with papermill into `run_dir/<stem>.ipynb` (cwd `run_dir`), export its HTML
    (code cells left out with `hide_code`), and return the run record (state 'ok' or
    'failed', error, parameters, timings). A failing notebook is a 'failed' record, not an
    exception; KeyboardInterrupt propagates. The kernel process's own output (not a cell's) goes to
    `kernel_log` (default: a temporary file); a failed run's record keeps its last lines."""
    import papermill as pm

    if kernel_log is None:
        with tempfile.NamedTemporaryFile(prefix="awqnb-kernel-", suffix=".log", delete=False) as f:
            kernel_log = Path(f.name)
        try:
            return execute_into(nb_in, run_dir, nb_params, model=model, methods=methods, hide_code=hide_code,
                                timeout=timeout, kernel_log=kernel_log)
        finally:
            kernel_log.unlink(missing_ok=True)

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
                            **_quiet_papermill_kwargs(kernel_log))
        record["state"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001  a failed notebook must not stop a batch
        record["state"] = "failed"
        # a cell's error reads as the user's own ("AwqnbError: unknown model ..."); anything else
        # (papermill, the kernel) keeps its exception name
        record["error"] = _short_error(e) if getattr(e, "ename", None) else f"{type(e).__name__}: {_short_error(e)}"
        log.error("report %s failed: %s", model, record["error"])
        tail = _tail(kernel_log)
        if tail:
            record["kernel_output"] = tail
    record["seconds"] = round(time.perf_counter() - t0, 2)
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if nb_out.is_file():
        try:
            export_html(nb_out, nb_out.with_suffix(".html"), hide_code)
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


def _tail(path: Path, n: int = 4000) -> str:
    """The last `n` characters of a text file ('' if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - n))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


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
