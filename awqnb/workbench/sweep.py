"""Sweeps: a grid of report runs, each known by the hash of its config, run in this process or on Ray.

A grid (command line or YAML: models × method sets × seeds × group sizes, plus fixed notebook
parameters) expands to `RunSpec`s. A run's identity is the SHA-256 of everything that decides its
result: the notebook's code, every parameter after defaults are filled in, the model's fingerprint
(alias, or the files of a local model), the data files it can read (calibration, evaluation), and
the versions of awqnb, torch and transformers. Its directory is `<out>/<model>/<tag>_<id>/`.

Resume: a run whose directory holds a complete `run.json` in state 'ok' is skipped (`force` redoes
it); a failed or interrupted run is redone. A run is built in a hidden temporary directory, its
`run.json` (with the size of every file it lists) is written last, and the directory is renamed into
place, so a half-written run never shows as done.

Two sweeps may share an output directory: a run is claimed with an advisory lock on
`<out>/<model>/.<name>.claim` (flock: released by the kernel when its holder dies, so an
interrupted sweep leaves no stale lock). A sweep that finds a run claimed waits for the other
sweep's result instead of computing it twice; the index is rewritten under a lock of its own.
Locks are local to one file system: sweeps on different hosts sharing a network directory may
both compute a run (the second result replaces the first, nothing is lost).

Executors: 'local' runs the notebooks one after another here; 'ray' submits each run as a Ray task
with its resource request (`cpus_per_run`, `gpus_per_run`, fractions allowed) and lets Ray schedule
and retry it (`max_retries`, for crashed workers: a failing notebook is a result, not retried). The
task returns the run's files to the driver, which commits them: the cluster needs no shared disk.
"""
from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from awqnb.core import progress
from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.files import (atomic_write, clean_stale, current_umask, is_write_error, read_yaml_mapping,
                              run_prefix, temp_prefix, write_error_text)
from awqnb.workbench import report

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
CLAIM_SUFFIX = ".claim"
INDEX_LOCK = ".index.lock"
# Parameters that only say where files go: not part of a run's identity.
NOT_IDENTITY = frozenset({"output_dir"})


# --- the grid -------------------------------------------------------------------------------

def _items(value, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        value = [value]
    out = [v.strip() if isinstance(v, str) else v for v in value]
    return [v for v in out if v != ""]


def _method_sets(value) -> list[tuple[str, ...]]:
    """'rtn,awq' → [(rtn, awq)]; 'rtn,awq;rtn,awq_sh' or [[rtn, awq], [rtn, awq_sh]] → two sets."""
    if value is None:
        return []
    if isinstance(value, str):
        return [tuple(_items(s, "methods")) for s in value.split(";") if _items(s, "methods")]
    value = list(value)
    if value and all(isinstance(v, (list, tuple)) for v in value):
        return [tuple(str(m).strip() for m in v) for v in value if v]
    return [tuple(str(m).strip() for m in value if str(m).strip())] if value else []


def _ints(value, what: str) -> list[int]:
    out = []
    for v in _items(value, what):
        try:
            out.append(int(v))
        except (TypeError, ValueError):
            raise AwqnbError(f"{what}: {v!r} is not an integer.") from None
    return out


@dataclass(frozen=True)
class Grid:
    """What to run: every model × method set × seed × group size (an empty axis keeps the
    notebook's default), each with the same fixed notebook `params`."""
    models: tuple[str, ...]
    methods: tuple[tuple[str, ...], ...] = (("rtn", "awq"),)
    seeds: tuple[int, ...] = ()
    group_sizes: tuple[int, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    notebook: str = "model_report"


GRID_KEYS = ("models", "methods", "seeds", "group_sizes", "params", "notebook")


def load_grid_file(path: str | Path) -> dict:
    """A grid YAML: {models, methods, seeds, group_sizes, params, notebook} (all optional)."""
    doc = read_yaml_mapping(path, "grid file", f"with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(doc) - set(GRID_KEYS))
    if unknown:
        raise AwqnbError(f"grid file {path}: unknown key(s) {unknown}; use {', '.join(GRID_KEYS)} "
                         "(notebook parameters go under 'params').")
    if not isinstance(doc.get("params") or {}, dict):
        raise AwqnbError(f"grid file {path}: 'params' must be a mapping of notebook parameter: value.")
    return doc


def make_grid(models=None, methods=None, seeds=None, group_sizes=None, params=None, notebook=None,
              grid_file: str | Path | None = None) -> Grid:
    """A `Grid` from a YAML file overlaid with explicit values (command-line flags win)."""
    doc = load_grid_file(grid_file) if grid_file else {}
    pick = lambda k, v: v if v not in (None, "", [], ()) else doc.get(k)  # noqa: E731
    ms = [str(m) for m in _items(pick("models", models), "models")]
    if not ms:
        raise AwqnbError("no models given; pass e.g. --models tiny-random-llama,smollm2-135m.")
    sets = _method_sets(pick("methods", methods))
    merged = {**(doc.get("params") or {}), **(params or {})}
    for k, flag in (("model", "models"), ("models", "models"), ("methods", "methods"), ("seed", "seeds"),
                    ("group_size", "group_sizes")):
        if k in merged and (k not in ("seed", "group_size") or pick(flag, None)):
            raise AwqnbError(f"parameter {k!r} is a grid axis: give it as {flag} (--{flag.replace('_', '-')}).")
    return Grid(models=tuple(ms), methods=tuple(sets) or ((),),
                seeds=tuple(_ints(pick("seeds", seeds), "seeds")),
                group_sizes=tuple(_ints(pick("group_sizes", group_sizes), "group sizes")),
                params=merged, notebook=str(pick("notebook", notebook) or "model_report"))


# --- identity -------------------------------------------------------------------------------

_SHA_CACHE: dict[tuple, str] = {}
_BIG = 64 << 20  # files above this are fingerprinted by size and mtime, not read


def _file_fp(p: Path) -> dict:
    st = p.stat()
    if st.st_size > _BIG:
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return {"size": st.st_size, "sha256": _SHA_CACHE[key]}


def model_fingerprint(name: str) -> dict:
    """What identifies a model's weights: an alias (built or shipped by a pinned package), the files
    of a local directory or GGUF, or a Hub id. AwqnbError for a name that is none of these."""
    from awqnb.model.models import ALIASES, GGUF_ALIASES  # local: this module loads without torch

    if name in ALIASES:
        return {"alias": name, "source": GGUF_ALIASES.get(name, {}).get("install", "awqnb.model.models.build_tiny")}
    p = Path(name).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return {"file": p.name, **_file_fp(p)}
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise AwqnbError(f"model {name!r}: {p} is not a Hugging Face model directory (no config.json).")
        return {"dir": p.name, "files": {f.relative_to(p).as_posix(): _file_fp(f)
                                         for f in sorted(p.rglob("*")) if f.is_file()}}
    if "/" in name and not name.startswith((".", "/")) and not p.exists():
        return {"hub": name}
    raise AwqnbError(f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), not an existing directory "
                     "or .gguf file, and not a Hub id (owner/name).")


def data_fingerprint() -> dict:
    """The local data files a run can read (first match of each source, as `awqnb.model.data` resolves it)."""
    from awqnb.model.data import SOURCES, data_dirs  # local: this module loads without torch

    out = {}
    for name, (rel, _hub) in sorted(SOURCES.items()):
        for d in data_dirs():
            f = d / rel
            if f.is_file():
                out[name] = _file_fp(f)
                break
        else:
            out[name] = None  # the Hub, or missing (the run says so)
    return out


def _versions() -> dict:
    out = {}
    for pkg in ("awqnb", "torch", "transformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _literal(src):
    try:
        return ast.literal_eval(src) if isinstance(src, str) else src
    except (ValueError, SyntaxError):
        return src


def notebook_code_hash(nb_path: Path) -> str:
    """SHA-256 of the notebook's code cells (markdown and outputs do not change a result)."""
    import nbformat

    nb = nbformat.read(str(nb_path), as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]
    return hashlib.sha256("\n\x00".join(code).encode()).hexdigest()


@dataclass
class RunSpec:
    """One run of a sweep: its model, the parameters papermill injects, its identity and directory."""
    model: str
    notebook: Path
    params: dict
    identity: dict
    run_id: str
    name: str

    @property
    def model_dir(self) -> str:
        return report.safe_name(self.model)

    @property
    def rel(self) -> str:
        return f"{self.model_dir}/{self.name}"

    @property
    def methods(self) -> list[str]:
        return list(self.params.get("methods") or [])


def _run_tag(params: Mapping[str, Any]) -> str:
    parts = []
    if "bits" in params and "group_size" in params:
        parts.append(f"w{params['bits']}_g{'ch' if params['group_size'] == -1 else params['group_size']}")
    if params.get("methods"):
        parts.append("-".join(params["methods"])[:40])
    if "seed" in params:
        parts.append(f"s{params['seed']}")
    return "_".join(str(p) for p in parts) or "run"


def _own_data_files(params: Mapping) -> dict:
    """sha256 of every user text file named by a data parameter (calibration or evaluation)."""
    import hashlib

    from awqnb.model.data import is_text_file  # local: this module loads without torch

    out = {}
    for k in ("calib_dataset", "eval_dataset", "sample_dataset", "sample_datasets"):
        v = params.get(k)
        for name in (v if isinstance(v, (list, tuple)) else [v]):
            p = Path(str(name)).expanduser() if isinstance(name, str) else None
            if p is not None and (is_text_file(name) or p.suffix == ".txt") and p.is_file():
                out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def expand(grid: Grid) -> list[RunSpec]:
    """Every run of the grid, checked before any runs: unknown notebook, parameter, model or
    method → AwqnbError."""
    import re

    from awqnb.quant.methods import get_method  # local: this module loads without torch

    nb_path = report.notebook_path(grid.notebook)
    known = report.notebook_parameters(nb_path)
    defaults = {k: _literal(v) for k, v in known.items()}
    params = dict(grid.params)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise AwqnbError(f"unknown notebook parameter(s) {unknown} for {nb_path.name}; it takes {sorted(known)}.")
    report.check_parameter_types(nb_path, params)
    for axis, name in ((grid.seeds, "seed"), (grid.group_sizes, "group_size")):
        if axis and name not in known:
            raise AwqnbError(f"{nb_path.name} has no {name!r} parameter, so it cannot be swept over.")
    takes_methods = "methods" in known
    sets = [s for s in grid.methods if s]
    if takes_methods and not sets:
        raise AwqnbError("no methods given; pass e.g. --methods rtn,awq.")
    if not takes_methods:
        if sets:
            log.warning("%s has no `methods` parameter; ignoring methods=%s", nb_path.name, sets)
        sets = [()]
    for s in sets:
        for m in s:
            get_method(m)  # unknown method → AwqnbError naming the available ones
    fps = {m: model_fingerprint(m) for m in grid.models}
    code = notebook_code_hash(nb_path)
    data = data_fingerprint()
    vers = _versions()
    specs, seen = [], set()
    for model, ms, seed, gs in itertools.product(grid.models, sets, grid.seeds or [None], grid.group_sizes or [None]):
        inj = {**params, "model": model}
        if takes_methods:
            inj["methods"] = list(ms)
        if seed is not None:
            inj["seed"] = seed
        if gs is not None:
            inj["group_size"] = gs
        if "output_dir" in known:
            inj["output_dir"] = "."
        full = {k: v for k, v in {**defaults, **inj}.items() if k not in NOT_IDENTITY}
        if "bits" in full and "group_size" in full:
            try:
                QuantConfig(int(full["bits"]), int(full["group_size"]))
            except (TypeError, ValueError) as e:
                raise AwqnbError(f"bits={full['bits']!r}, group_size={full['group_size']!r}: {e}") from e
        identity = {"notebook": nb_path.stem, "notebook_code": code, "parameters": full, "model": fps[model],
                    "data": data, "versions": vers}
        own = _own_data_files(full)
        if own:  # the user's own text files by content: an edited file is a new run
            identity["data_files"] = own
        run_id = hashlib.sha256(json.dumps(report.clean_json(identity), sort_keys=True).encode()).hexdigest()[:16]
        if run_id in seen:
            continue
        seen.add(run_id)
        name = re.sub(r"[^A-Za-z0-9._+-]+", "_", f"{_run_tag(full)}_{run_id}")
        specs.append(RunSpec(model, nb_path, inj, identity, run_id, name))
    return specs


# --- run state on disk ----------------------------------------------------------------------

def run_state(run_dir: Path) -> str | None:
    """'ok' / 'failed' / ... for a complete run directory; None when absent or incomplete."""
    rec = report.read_json_file(run_dir / report.RUN_FILE)
    if not rec.get("complete") or not report.manifest_ok(run_dir, rec):
        return None
    return rec.get("state")


class Claim:
    """An advisory lock on one run (see the module docstring)."""

    def __init__(self, out: Path, spec: RunSpec):
        self.path = out / spec.model_dir / f".{spec.name}{CLAIM_SUFFIX}"
        self.spec = spec
        self.fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())

    def try_acquire(self, sweep_id: str, block: bool = False) -> bool:
        """Take the claim (waiting for its holder to let go when `block`); False if someone holds it."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        info = {"model": self.spec.model, "run": self.spec.name, "run_id": self.spec.run_id, "sweep": sweep_id,
                "notebook": self.spec.notebook.stem, "parameters": self.spec.params, "host": socket.gethostname(),
                "pid": os.getpid(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(report.clean_json(info)).encode(), 0)
        return True

    def release(self, done: bool) -> None:
        """Let go; a finished run's claim file goes (an interrupted one stays: the index shows it)."""
        if self.fd is None:
            return
        try:
            mine = os.fstat(self.fd).st_ino == self.path.stat().st_ino  # not a newer claim someone else made
        except OSError:
            mine = False
        if done and mine:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


@contextmanager
def _index_lock(out: Path, remove: bool = False):
    """The index lock; remove: delete its file before letting go (a sweep that leaves nothing).
    A waiter that then gets the lock of the deleted file sees it is not the current one and retries."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / INDEX_LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == path.stat().st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
        if remove:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def write_index(out: Path) -> Path:
    """`report.write_index` under a lock: the last writer has seen every run moved in before it."""
    with _index_lock(out):
        return report.write_index(out)


def commit(out: Path, spec: RunSpec, result: Mapping[str, Any], sweep_id: str) -> Path:
    """Write a run's files into a temporary directory, `run.json` last (with every file's size),
    then rename it into `<out>/<model>/<name>` (an older attempt there is moved aside first).
    A failed write (disk full) leaves nothing of the run and keeps an older attempt: AwqnbError."""
    model_dir = out / spec.model_dir
    tmp = old = None
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(spec.name), dir=model_dir))
        os.chmod(tmp, 0o777 & ~current_umask())
        sizes = {}
        for rel, data in sorted(result["files"].items()):
            p = (tmp / rel).resolve()
            if tmp.resolve() not in p.parents or rel == report.RUN_FILE:
                log.warning("%s: ignoring returned file %r", spec.rel, rel)
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            sizes[rel] = len(data)
        rec = dict(result["record"])
        rec.update(run_id=spec.run_id, identity=spec.identity, sweep=sweep_id, files=sizes, complete=True,
                   committed=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        atomic_write(tmp / report.RUN_FILE, json.dumps(report.clean_json(rec), indent=1))
        dest = model_dir / spec.name
        if dest.exists():  # named like a temporary: if we die before the swap, the next sweep puts it back
            old = model_dir / (temp_prefix(spec.name, "old") + uuid.uuid4().hex[:8])
            dest.rename(old)
        tmp.rename(dest)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not (model_dir / spec.name).exists():
            old.rename(model_dir / spec.name)
        if isinstance(e, Exception) and is_write_error(e):
            raise AwqnbError(f"could not write run {spec.rel} into {out} ({write_error_text(e)}); nothing of it "
                             "was kept. Free some space and rerun the same command (complete runs are "
                             "skipped).") from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


# --- executing one run (here, or on a Ray worker) ------------------------------------------

def _make_bar(kind: str):
    if kind == "ray":
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return lambda desc, total: ray_tqdm(desc=desc, total=total)
    from tqdm.std import tqdm as std_tqdm

    return lambda desc, total: std_tqdm(desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


def execute_run(payload: Mapping[str, Any]) -> dict:
    """Run one notebook in a private temporary directory; return {"record": run.json fields,
    "files": {relative path: bytes}} (executed notebook, HTML, metrics.json, anything else it
    wrote). Plain data in and out, so it runs the same here and as a Ray task on any node. The work
    directory is `awqnb-run-<host>-<pid>-…`; a killed run's is removed by the next run on its host."""
    clean_stale(tempfile.gettempdir(), legacy=True, runs=True)
    with tempfile.TemporaryDirectory(prefix=run_prefix()) as work:
        work = Path(work)
        nb_in = work / "in" / payload["notebook_file"]
        nb_in.parent.mkdir()
        nb_in.write_text(payload["notebook_source"], encoding="utf-8")
        run_dir = work / "run"
        run_dir.mkdir()
        prog = work / "progress.jsonl"
        prog.touch()
        env = {progress.ENV: str(prog), **(payload.get("env") or {})}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the kernel inherits this process's environment
        try:
            bars = payload.get("bars", "std")
            ctx = (_follow(prog, bars, payload.get("label", "")) if bars != "none" else _nullcontext())
            with ctx:
                rec = report.execute_into(nb_in, run_dir, payload["params"], model=payload["model"],
                                          methods=payload["params"].get("methods") or [],
                                          hide_code=payload.get("hide_code", False), timeout=payload.get("timeout"))
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        rec["host"] = socket.gethostname()
        files = {f.relative_to(run_dir).as_posix(): f.read_bytes() for f in sorted(run_dir.rglob("*")) if f.is_file()}
        return {"record": rec, "files": files}


@contextmanager
def _nullcontext():
    yield


def _follow(path: Path, bars: str, label: str):
    return progress.follow(path, _make_bar(bars), prefix=label)


# --- the sweep ------------------------------------------------------------------------------

@dataclass
class SweepRun:
    """One run of a sweep as it ended: state 'ok' / 'failed' / 'interrupted', whether it was
    skipped (already complete) or finished by another sweep, its directory and error."""
    spec: RunSpec
    state: str
    dir: Path | None
    error: str | None = None
    skipped: bool = False
    by_other: bool = False

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def ok(self) -> bool:
        return self.state == "ok"


@dataclass
class SweepResult:
    index: Path
    runs: list[SweepRun]
    sweep_id: str
    seconds: float

    @property
    def failed(self) -> list[SweepRun]:
        return [r for r in self.runs if not r.ok]

    @property
    def executed(self) -> list[SweepRun]:
        return [r for r in self.runs if not r.skipped and not r.by_other]


def _payload(spec: RunSpec, bars: str, hide_code: bool, timeout, env: Mapping[str, str]) -> dict:
    return {"notebook_file": spec.notebook.name, "notebook_source": spec.notebook.read_text(encoding="utf-8"),
            "params": spec.params, "model": spec.model, "bars": bars, "hide_code": hide_code, "timeout": timeout,
            "label": f"{spec.model} {spec.name.rsplit('_', 1)[0]}", "env": dict(env)}


def _outcome_from_disk(out: Path, spec: RunSpec, **kw) -> SweepRun:
    d = out / spec.model_dir / spec.name
    rec = report.read_json_file(d / report.RUN_FILE)
    return SweepRun(spec, run_state(d) or "interrupted", d if d.exists() else None, rec.get("error"), **kw)


def _committed(d: Path):
    rec = report.read_json_file(d / report.RUN_FILE)
    return rec.get("sweep"), rec.get("committed")


def _failed_result(spec: RunSpec, error: str) -> dict:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"record": {"state": "failed", "model": spec.model, "methods": spec.methods, "notebook": spec.notebook.stem,
                       "parameters": spec.params, "started": now, "finished": now, "error": error},
            "files": {}}


class _Committer:
    """Commits results, releases claims, keeps the index current."""

    def __init__(self, out: Path, sweep_id: str, bar, total: int):
        self.out, self.sweep_id, self.bar, self.total, self.n = out, sweep_id, bar, total, 0

    def __call__(self, spec: RunSpec, claim: Claim, result: Mapping) -> SweepRun:
        try:
            d = commit(self.out, spec, result, self.sweep_id)
        finally:
            claim.release(done=True)
        rec = result["record"]
        self.n += 1
        if rec.get("state") != "ok":
            log.error("run %s failed: %s", spec.rel, rec.get("error"))
        else:
            log.info("run %d/%d ok: %s (%.1f s)", self.n, self.total, spec.rel, rec.get("seconds") or 0)
        self.bar.update(1)
        try:
            write_index(self.out)
        except OSError as e:
            log.error("could not update %s: %s", self.out / "index.html", e)
        return SweepRun(spec, rec.get("state") or "failed", d, rec.get("error"))


LOOPBACK = "127.0.0.1"


@contextmanager
def _loopback_only():
    """A local cluster that listens on 127.0.0.1 only (GCS, raylet, workers, agents), not on every
    interface. Ray binds its servers to all interfaces unless the node's address is 127.0.0.1, and
    ray.init turns a 127.0.0.1 `_node_ip_address` into the host's own address; only its
    single-machine mode (macOS/Windows, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read at import)
    keeps the loopback address. That is what this switches on, for the ray.init call only."""
    from ray._private import ray_constants

    old = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if old is None:
            del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = old


def _loopback_cluster(host: str, port: int) -> bool:
    """Whether the cluster at host:port listens on 127.0.0.1 only (as a local one awqnb started):
    a driver must then connect in loopback mode too, or ray.init turns 127.0.0.1 into this host's
    own address, where nothing answers."""
    if host not in (LOOPBACK, "localhost"):
        return False
    from ray._private import services

    own = services.get_node_ip_address()
    if own == LOOPBACK:
        return False
    try:
        socket.create_connection((own, port), timeout=2).close()
        return False
    except OSError:
        return True


def check_ray(address: str | None, cpus_per_run: float, gpus_per_run: float | None, num_cpus: int | None = None):
    """Connect to Ray (an existing cluster at `address`, the one already initialised here, or a new
    local one: listening on 127.0.0.1 only, with the token authentication Ray turns on for it unless
    RAY_AUTH_MODE says otherwise) and check that some node can hold one run; returns the GPUs each
    run asks for. AwqnbError for an unreachable address or a request no node can satisfy."""
    try:
        import ray
    except ImportError as e:
        raise AwqnbError("the ray executor needs Ray: pip install ray (pinned in requirements.txt).") from e
    loopback = False
    if address and address != "auto":  # a quick probe: ray.init would retry for a minute
        hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise AwqnbError(f"cannot reach the Ray cluster at --ray-address {address}: {e}. "
                             "Start it (`ray start --head`) or fix the address.") from None
        loopback = "://" not in address and _loopback_cluster(host, int(port))
    if not ray.is_initialized():
        # Ray's own notices (dashboard, auth token) stay out of the terminal; errors still show
        kw = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True)
        try:
            if address:
                with _loopback_only() if loopback else _nullcontext():
                    ray.init(address=address, **kw)
            else:
                with _loopback_only():
                    ray.init(num_cpus=num_cpus, **kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise AwqnbError(f"cannot start or reach Ray ({address or 'local'}): {str(e).strip().splitlines()[-1]} "
                             "(a cluster with token authentication also needs its token: RAY_AUTH_TOKEN, "
                             "or `ray get-auth-token`).") from None
        if not address:
            host = ray.get_runtime_context().gcs_address.rpartition(":")[0]
            if host != LOOPBACK:
                ray.shutdown()
                raise AwqnbError(f"the local Ray cluster would listen on {host}, not only on {LOOPBACK} (this Ray "
                                 f"version, {ray.__version__}, binds differently from the pinned one); start a "
                                 "cluster yourself and pass --ray-address (README: Sweeps on Ray).")
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    max_gpu = max((r.get("GPU", 0) for r in nodes), default=0)
    max_cpu = max((r.get("CPU", 0) for r in nodes), default=0)
    if gpus_per_run is None:
        gpus_per_run = 1.0 if max_gpu >= 1 else 0.0  # a whole GPU where there is one, else CPU only
    if gpus_per_run < 0 or cpus_per_run <= 0:
        raise AwqnbError(f"a run must ask for > 0 CPUs and >= 0 GPUs (got {cpus_per_run} CPUs, {gpus_per_run} GPUs).")
    if gpus_per_run > 1 and gpus_per_run != int(gpus_per_run):
        raise AwqnbError(f"--gpus-per-run {gpus_per_run}: a fraction must be below 1 (Ray shares one GPU, "
                         "it does not split a run across part of several).")
    fits = [r for r in nodes if r.get("CPU", 0) >= cpus_per_run and r.get("GPU", 0) >= gpus_per_run]
    if not fits:
        raise AwqnbError(f"no Ray node can run a report with {cpus_per_run:g} CPU(s) and {gpus_per_run:g} GPU(s): "
                         f"the largest node has {max_cpu:g} CPUs and {max_gpu:g} GPUs. Lower --gpus-per-run / "
                         "--cpus-per-run or add a node.")
    return gpus_per_run


def run_sweep(grid: Grid, output_dir: str | Path = "reports", executor: str = "local", *, force: bool = False,
              ray_address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float | None = None,
              max_retries: int = 1, hide_code: bool = False, timeout: int | None = None, bars: str | None = None,
              ray_num_cpus: int | None = None) -> SweepResult:
    """Run every run of `grid` that is not complete yet into `output_dir`; see the module docstring.

    Everything that can be checked is checked before the first run (grid, kernel, Ray address and
    resources). A failing run is kept and does not stop the others; KeyboardInterrupt stops the
    sweep (runs done so far stay; the rest show as interrupted) and is re-raised.
    bars: 'std' (terminal), 'ray' (Ray's progress display), 'none'; default by executor.
    """
    if executor not in EXECUTORS:
        raise AwqnbError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}.")
    t0 = time.perf_counter()
    specs = expand(grid)
    report.kernel_name()
    out = Path(output_dir)
    from awqnb.model.models import check_writable  # local: this module loads without torch

    check_writable(out)  # a file in the way, read-only or full: refused before any notebook starts
    env: dict[str, str] = {}
    if executor == "ray":
        gpus = check_ray(ray_address, cpus_per_run, gpus_per_run, ray_num_cpus)
        if gpus == 0:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only task must not reach for a GPU Ray gave someone else
    if bars is None:  # bars redraw in place on a terminal; in a log file they would be noise
        bars = ("ray" if executor == "ray" else "std") if sys.stderr.isatty() else "none"
    sweep_id = f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    # what this sweep adds around its runs, taken away again if it cannot finish (disk full)
    made = [p for p in (out, *out.parents) if not p.exists()]
    existed = {p: p.exists() for p in [out / INDEX_LOCK, out / "index.html"] + [out / s.model_dir for s in specs]}
    for d in {out / s.model_dir for s in specs}:
        clean_stale(d)  # runs of sweeps that were killed while committing
    clean_stale(tempfile.gettempdir(), legacy=True, runs=True)  # their work directories

    from tqdm.std import tqdm as std_tqdm

    results: dict[str, SweepRun] = {}
    todo: list[tuple[RunSpec, Claim]] = []
    waiting: list[tuple[RunSpec, tuple]] = []
    claims: list[Claim] = []
    bar = committer = saved = None
    aborted = interrupted = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        if existed[out / "index.html"]:  # a second name for the index as it is (no space needed): put back on failure
            saved = out / (temp_prefix("index.html", "old") + uuid.uuid4().hex[:8])
            try:
                os.link(out / "index.html", saved)
            except OSError:
                saved = None
        for spec in specs:
            d = out / spec.model_dir / spec.name
            before = _committed(d)
            if not force and run_state(d) == "ok":
                results[spec.run_id] = _outcome_from_disk(out, spec, skipped=True)
                continue
            claim = Claim(out, spec)
            if not claim.try_acquire(sweep_id):
                waiting.append((spec, before))
            elif _committed(d) != before and run_state(d) == "ok":  # another sweep finished it just now
                claim.release(done=True)
                results[spec.run_id] = _outcome_from_disk(out, spec, by_other=True)
            else:
                todo.append((spec, claim))
                claims.append(claim)
        log.info("sweep %s: %d run(s): %d complete (skipped), %d to run, %d claimed by another sweep; executor %s",
                 sweep_id, len(specs), len(results), len(todo), len(waiting), executor)
        bar = std_tqdm(total=len(specs), initial=len(results), desc="sweep runs", file=sys.stderr,
                       dynamic_ncols=True, disable=bars == "none")
        committer = _Committer(out, sweep_id, bar, len(todo) + len(waiting))
        write_index(out)
        pending = todo
        run = _run_ray if executor == "ray" else _run_local
        while pending or waiting:
            for r in run(pending, committer, bars, hide_code, timeout, env, cpus_per_run,
                         gpus if executor == "ray" else 0, max_retries):
                results[r.spec.run_id] = r
            pending = []
            # runs another sweep holds: wait for its result; if it was interrupted, run it here
            for spec, before in waiting:
                d = out / spec.model_dir / spec.name
                claim = Claim(out, spec)
                claim.try_acquire(sweep_id, block=True)
                if run_state(d) is not None and _committed(d) != before:
                    claim.release(done=True)
                    results[spec.run_id] = _outcome_from_disk(out, spec, by_other=True)
                    bar.update(1)
                else:  # the other sweep was interrupted: run it here
                    claims.append(claim)
                    pending.append((spec, claim))
            waiting = []
    except KeyboardInterrupt:
        interrupted = True
        for claim in claims:
            claim.release(done=False)
        log.warning("sweep %s interrupted: %d of %d run(s) complete; rerun the same command to finish it",
                    sweep_id, sum(1 for r in results.values() if r.state in ("ok", "failed")), len(specs))
        raise
    except Exception as e:  # e.g. the disk filled up: complete runs stay, nothing else of this sweep does
        aborted = True
        for claim in claims:
            claim.release(done=True)
        _take_back(out, made, existed, saved, committer.n if committer is not None else 0)
        saved = None
        if is_write_error(e):
            raise AwqnbError(f"could not write under {out} ({write_error_text(e)}); runs completed before are "
                             "kept, nothing else of this sweep is. Free some space and rerun the same "
                             "command.") from e
        raise
    finally:
        if bar is not None:
            bar.close()
        if not aborted:
            try:
                index = write_index(out)
            except OSError as e:
                if not interrupted:  # (the interruption in flight says more)
                    raise AwqnbError(f"could not write {out / 'index.html'} ({write_error_text(e)}); every run "
                                     "is complete, rerun the same command to write the index.") from e
                index = out / "index.html"
        if saved is not None:
            saved.unlink(missing_ok=True)
    runs = [results.get(s.run_id) or SweepRun(s, "interrupted", None, None) for s in specs]
    res = SweepResult(index, runs, sweep_id, time.perf_counter() - t0)
    if res.failed:
        log.warning("%d of %d run(s) failed", len(res.failed), len(runs))
    return res


def _take_back(out: Path, made: list[Path], existed: Mapping[Path, bool], saved: Path | None,
               committed: int) -> None:
    """After a failed sweep: put back the index as it was (`saved`: its second name) if no run was
    committed, else bring it up to date; remove what the sweep added that holds no run (an index of
    nothing, its lock, empty model directories, the folders it made)."""
    try:
        if committed == 0 and saved is not None:
            with _index_lock(out):
                os.replace(saved, out / "index.html")
        elif committed or (report.find_runs(out) if out.is_dir() else []) or existed.get(out / "index.html"):
            write_index(out)
        else:
            with _index_lock(out, remove=not existed.get(out / INDEX_LOCK)):
                (out / "index.html").unlink(missing_ok=True)
    except OSError as e:  # still full: the index stays as it is (whole: written atomically)
        log.debug("could not update %s: %s", out / "index.html", e)
    finally:
        if saved is not None:
            saved.unlink(missing_ok=True)
    for p, was in existed.items():
        if not was and p.name != "index.html" and p.name != INDEX_LOCK:
            try:
                p.rmdir()  # only if empty
            except OSError:
                pass
    for p in made:  # deepest first
        try:
            p.rmdir()
        except OSError:
            break


def _run_local(pending, committer, bars, hide_code, timeout, env, cpus, gpus, max_retries) -> Iterable[SweepRun]:
    for spec, claim in pending:
        try:
            result = execute_run(_payload(spec, bars, hide_code, timeout, env))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001  trouble outside the notebook must not stop the sweep
            log.error("run %s could not run: %s: %s", spec.rel, type(e).__name__, e)
            result = _failed_result(spec, f"{type(e).__name__}: {e}")
        yield committer(spec, claim, result)


def _run_ray(pending, committer, bars, hide_code, timeout, env, cpus, gpus, max_retries) -> Iterable[SweepRun]:
    import ray

    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False)(execute_run)
    refs = {}
    for spec, claim in pending:
        ref = task.options(name=f"awqnb:{spec.rel}").remote(_payload(spec, bars, hide_code, timeout, env))
        refs[ref] = (spec, claim)
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                spec, claim = refs.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:  # a worker that died past its retries, a cancelled task
                    log.error("run %s: Ray task failed: %s", spec.rel, str(e).strip().splitlines()[0][:300])
                    result = _failed_result(spec, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
                yield committer(spec, claim, result)
    finally:
        for ref in refs:  # interrupted: stop what is still queued or running
            ray.cancel(ref, force=True)
