"""Report run records: the `metrics.json` a report notebook writes and the `run.json` beside it.

Layout (ARCHITECTURE.md): `<output_dir>/<model>/<run>/` holds one executed notebook
(`<notebook>.ipynb`), its HTML export (`<notebook>.html`), the `metrics.json` the notebook wrote and
`run.json` (state 'ok' or 'failed', parameters, error, and the manifest of the files written).
Running the notebooks: `awqnb.workbench.notebook_run` (one) and `awqnb.workbench.sweep` (a grid);
the `reports/index.html` over every run: `awqnb.workbench.report_index`.

The notebook side: `write_metrics` is the one writer of `metrics.json` (schema below) and
`read_metrics` its reader, so the index and the notebooks agree on one format; `as_list`,
`clean_json` and `style_comparison` are the small helpers the notebooks share.
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

