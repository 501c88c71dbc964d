"""A sweep's grid and each run's identity.

A grid (command line or YAML: models × method sets × seeds × group sizes, plus fixed notebook
parameters) expands to `RunSpec`s. A run's identity is the SHA-256 of everything that decides its
result: the notebook's code, every parameter after defaults are filled in, the model's source
fingerprint (alias, or the files of a local model), the data files it can read (calibration,
evaluation), and the versions of awqnb, torch and transformers. Its directory is
`<out>/<model>/<tag>_<id>/`. Running a grid: `awqnb.workbench.sweep`.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.files import read_yaml_mapping
from awqnb.workbench import notebook_run
from awqnb.workbench.report import clean_json

log = logging.getLogger(__name__)

# Parameters that only say where files go: not part of a run's identity.
NOT_IDENTITY = frozenset({"output_dir"})
IDENTITY_PACKAGES = ("awqnb", "torch", "transformers")


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


def source_fingerprint(name: str) -> dict:
    """What identifies a model by its source (not a hash of its weights, which it does not load): an alias (built or shipped by a pinned package), the files
    of a local directory or GGUF, or a Hub id. AwqnbError for a name that is none of these."""
    from awqnb.model.sources import ALIASES, GGUF_ALIASES  # local: this module loads without torch

    if name in ALIASES:
        return {"alias": name, "source": GGUF_ALIASES.get(name, {}).get("install", "awqnb.model.models.build_tiny")}  # (a name kept as it was: run ids stay)
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


def identity_versions() -> dict:
    """The package versions in a run's identity: those of awqnb, torch and transformers, read from the
    one `versions()` (the rest it records, e.g. the driver's GPU, does not make a new run)."""
    from awqnb.model.provenance import versions  # local: this module loads without torch

    v = versions()
    return {pkg: v.get(pkg) for pkg in IDENTITY_PACKAGES}


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
        return notebook_run.safe_name(self.model)

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

    nb_path = notebook_run.notebook_path(grid.notebook)
    known = notebook_run.notebook_parameters(nb_path)
    defaults = {k: _literal(v) for k, v in known.items()}
    params = dict(grid.params)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise AwqnbError(f"unknown notebook parameter(s) {unknown} for {nb_path.name}; it takes {sorted(known)}.")
    notebook_run.check_parameter_types(nb_path, params)
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
    fps = {m: source_fingerprint(m) for m in grid.models}
    code = notebook_code_hash(nb_path)
    data = data_fingerprint()
    vers = identity_versions()
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
        run_id = hashlib.sha256(json.dumps(clean_json(identity), sort_keys=True).encode()).hexdigest()[:16]
        if run_id in seen:
            continue
        seen.add(run_id)
        name = re.sub(r"[^A-Za-z0-9._+-]+", "_", f"{_run_tag(full)}_{run_id}")
        specs.append(RunSpec(model, nb_path, inj, identity, run_id, name))
    return specs
