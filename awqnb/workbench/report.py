"""Report run records: the `metrics.json` a report notebook writes and the `run.json` beside it.

Layout (ARCHITECTURE.md): `<output_dir>/<model>/<run>/` holds one executed notebook
(`<notebook>.ipynb`), its HTML export (`<notebook>.html`), the `metrics.json` the notebook wrote and
`run.json` (state 'ok' or 'failed', parameters, error, and the manifest of the files written).
Running the notebooks: `awqnb.workbench.notebook_run` (one) and `awqnb.workbench.sweep` (a grid);
the `reports/index.html` over every run: `awqnb.workbench.report_index`.

The notebook side: `write_metrics` is the one writer of `metrics.json` (schema below) and
`read_metrics` its reader, so the index and the notebooks agree on one format; `headline` writes
the words of the report's first screen (which method wins, by how much, whether beyond the noise,
which layers hurt, what it cost); `run_setup` / `run_setup_words` the model's size and where it ran;
`as_list`, `clean_json` and `style_comparison` are the small helpers the notebooks share.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from awqnb.analysis import stats
from awqnb.core.errors import AwqnbError
from awqnb.core.files import atomic_write

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


# --- the first screen --------------------------------------------------------------------

VERDICT_WORDS = {stats.BETTER: "**better**, beyond the noise", stats.WORSE: "**worse**, beyond the noise",
                 stats.NOISE: "within the noise: not distinguishable",
                 stats.NO_SEEDS: "cannot separate seeds: too few calibration seeds to tell it from the noise"}


def _records(frame) -> list[dict]:
    if frame is None:
        return []
    if hasattr(frame, "to_dict"):
        return frame.to_dict("records")
    return [dict(r) for r in frame]


def _num(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def mean_sd(row: Mapping[str, Any]) -> str:
    """'22.957 ± 0.143' from a seed-summary row (ppl_mean, ppl_sd); the mean alone when sd is unknown."""
    m, sd = _num(row.get("ppl_mean")), _num(row.get("ppl_sd"))
    if m is None:
        return "—"
    return f"{m:.3f} ± {sd:.3f}" if sd is not None else f"{m:.3f}"


def delta_words(v: Mapping[str, Any]) -> str:
    """'−2.31 % [95% CI −3.10, −1.52]: **better**, beyond the noise' from a verdicts row."""
    d, lo, hi = _num(v.get("delta_pct")), _num(v.get("ci_low")), _num(v.get("ci_high"))
    ci = f" [95% CI {lo:+.2f}, {hi:+.2f}]" if lo is not None and hi is not None else ""
    num = f"{d:+.2f} %{ci}" if d is not None else "—"
    return f"{num}: {VERDICT_WORDS.get(v.get('verdict'), v.get('verdict') or 'no verdict')}"


def headline(seed_summary, verdicts=None, *, dataset: str | None = None, baseline: str = "rtn",
             fp_description: str | None = None, sensitive_layer: int | None = None, sens_method: str | None = None,
             worst=None, layers: bool = True, setup: Mapping[str, Any] | None = None) -> str:
    """The words of a report's first screen (markdown): on `dataset` (default: the first in
    `seed_summary`), which label has the lowest mean perplexity (mean ± sd over the seeds), each
    label's delta % against `baseline` with its 95% interval and `awqnb.analysis.stats` verdict
    (whether the difference is beyond the noise), what FP is (`fp_description`), which layer hurts
    most (`sensitive_layer` from the Sensitivity section; without it the (layer, module) with the
    largest relative output error in `worst`, a `layer_error.worst_layers` frame, saying which
    measurement it is), and what quantizing cost (quantize_s, mean over seeds).

    seed_summary: `Comparison.summary()` rows; verdicts: `Comparison.verdicts(baseline)` rows;
    layers=False leaves the layer sentence out (before the layer sections have run); setup (a
    `run_setup` dict) adds the model's size and where it ran."""
    rows = _records(seed_summary)
    if not rows:
        return "No perplexity results: nothing ran (see the cells below)."
    dataset = dataset if dataset is not None else rows[0].get("dataset")
    on = {r["label"]: r for r in rows if r.get("dataset") == dataset}
    if not on:
        return f"No perplexity results on {dataset}."
    first = next(iter(on.values()))
    where = f"{dataset} ({first.get('protocol')}, seqlen {first.get('seqlen')})"
    quantized = {k: r for k, r in on.items() if k != "fp" and _num(r.get("ppl_mean")) is not None}
    n_seeds = max((int(r.get("n_seeds") or 1) for r in on.values()), default=1)
    lines = []
    win = None
    if quantized:
        win = min(quantized, key=lambda k: quantized[k]["ppl_mean"])
        lines.append(f"**Lowest perplexity on {where}: `{win}`**, {mean_sd(on[win])} "
                     f"(mean ± sd over {n_seeds} calibration seed{'s' if n_seeds != 1 else ''}).")
    vs = {v["label"]: v for v in _records(verdicts) if v.get("dataset") == dataset and v.get("label") != "fp"}
    if vs:
        base = f"`{baseline}` ({mean_sd(on[baseline])})" if baseline in on else f"`{baseline}`"
        parts = [f"`{k}` {mean_sd(on.get(k, {}))}, {delta_words(v)}" for k, v in vs.items()]
        lines.append(f"Against {base}: " + "; ".join(parts) + ".")
    elif quantized:
        lines.append(f"No verdict against `{baseline}` (only one method ran).")
    if "fp" in on:
        what = f" ({fp_description})" if fp_description else ""
        lines.append(f"FP, the baseline{what}: {mean_sd(on['fp'])}.")
    if not layers:
        pass
    elif sensitive_layer is not None:
        lines.append(f"**Layer that hurts most: {sensitive_layer}** (the largest KL to FP with its linears quantized "
                     f"alone{f' by `{sens_method}`' if sens_method else ''}, summed over families: Sensitivity section).")
    else:
        w = _records(worst)
        w = [r for r in w if r.get("method") == win] or w  # the winner's own worst layer
        if w:
            top = max(w, key=lambda r: _num(r.get("rel_mse")) or -1.0)
            lines.append(f"**Largest quantization error: layer {top.get('layer')} `{top.get('module')}`** under "
                         f"`{top.get('method')}` (relative output MSE {top.get('rel_mse'):.3g}, the layer judged alone: "
                         "output-error section); the Sensitivity section, which measures what hurts the model's "
                         "predictions, did not run.")
        else:
            lines.append("Which layers hurt: not measured (the Sensitivity section and the diagnostics did not run).")
    cost = [f"`{k}` {r['quantize_s']:.1f} s" for k, r in on.items() if _num(r.get("quantize_s")) is not None]
    if cost:
        lines.append("Cost, quantizing (mean over seeds): " + ", ".join(cost) + ".")
    if setup:
        lines.append(run_setup_words(setup))
    return "\n\n".join(lines)


# --- what ran where --------------------------------------------------------------------------

def model_footprint(model) -> dict:
    """The model as loaded: parameters (tied weights once), their bytes in the dtypes they are held
    in, the dtype holding most of them, and the decoder layers."""
    import torch

    n, nbytes, by_dtype = 0, 0, {}
    for p in model.parameters():  # a tied weight is one Parameter: counted once
        n += p.numel()
        nbytes += p.numel() * p.element_size()
        by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.numel()
    main = max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32
    cfg = getattr(model, "config", None)
    return {"parameters": n, "bytes": nbytes, "dtype": str(main).removeprefix("torch."),
            "dtypes": {str(k).removeprefix("torch."): v for k, v in by_dtype.items()},
            "layers": getattr(cfg, "num_hidden_layers", None), "hidden_size": getattr(cfg, "hidden_size", None)}


def device_description(device) -> str:
    """'NVIDIA H200 (cuda:0, 150.0 GB)', 'CPU (x86_64, 2 cores)' or the device's name."""
    import os
    import platform

    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        return f"{props.name} ({dev}, {props.total_memory / 1e9:.1f} GB)"
    if dev.type == "cpu":
        return f"CPU ({platform.machine() or 'unknown'}, {os.cpu_count()} cores)"
    return str(dev)


def _amount(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


RANDOM_MARKER = "random_weights.json"  # written by bench/make_shaped_model.py beside random weights


def random_weights(model) -> bool:
    """True when the model was loaded from a directory that says its weights are random."""
    src = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not src:
        return False
    doc = read_json_file(Path(str(src)) / RANDOM_MARKER)
    return bool(doc.get("random_weights")) if isinstance(doc, dict) else False


def run_setup(model, device, compute_dtype: str | None = None) -> dict:
    """What a report states about its run: the model's size (`model_footprint`), where it ran
    (`device_description`, the compute dtype: None = the model's own) and whether its weights
    are random (`random_weights`)."""
    fp = model_footprint(model)
    return {**fp, "device": str(device), "device_name": device_description(device),
            "compute_dtype": compute_dtype or fp["dtype"], "random_weights": random_weights(model)}


def run_setup_words(setup: Mapping[str, Any]) -> str:
    """'**Model**: 8.03 B parameters, 16.06 GB in bfloat16, 32 layers. **Ran on** NVIDIA H200 (cuda:0,
    150.0 GB), computing in bfloat16.' (markdown) from `run_setup`."""
    dt = setup.get("dtypes") or {}
    held = setup["dtype"] if len(dt) <= 1 else ", ".join(f"{k} {_amount(v)}" for k, v in dt.items())
    n_layers = setup.get("layers")
    layers = f", {n_layers} layer{'s' if n_layers != 1 else ''}" if n_layers else ""
    words = (f"**Model**: {_amount(setup['parameters'])} parameters ({setup['parameters']:,}), "
             f"{setup['bytes'] / 1e9:.2f} GB in {held}{layers}. **Ran on** {setup['device_name']}, "
             f"computing in {setup['compute_dtype']}.")
    if setup.get("random_weights"):
        words += (" **The weights are random** (a model of a real shape, written by bench/make_shaped_model.py): "
                  "every perplexity and diagnostic here is meaningless; its time and memory are real.")
    return words


def parameters_table(parameters: Mapping[str, Any]):
    """The parameters in effect as a one-column table (values as Python literals)."""
    import pandas as pd

    return pd.DataFrame({"value": {k: repr(v) for k, v in parameters.items()}}).rename_axis("parameter")


def sensitivity_skipped(model: str, methods: Iterable[str]) -> str:
    """What the report says, once, when its Sensitivity section is off: and how to turn it on."""
    return (f"_The Sensitivity section (each layer's KL to FP, the ranked parts, the mixed-precision plans) did not run: "
            f"SENSITIVITY = False (the CPU preset `notebooks/params/cpu.yaml` turns it off)._ To run it: "
            f"`awqnb report --models {model} --methods {','.join(methods)} --param SENSITIVITY=true` "
            "(with `--params notebooks/params/cpu.yaml` on a CPU machine, as `make report` passes there), or "
            "`SENSITIVITY = True` in the parameters cell in Jupyter. What it costs on a CPU: README, *Two commands*.")


# --- run.json ----------------------------------------------------------------------------

def read_json_file(path: Path) -> dict:
    """The JSON object in `path`, or {} when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


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

