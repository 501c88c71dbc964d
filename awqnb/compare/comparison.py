"""The record of a comparison run (`awqnb.compare.runner.run_comparison`): one `RunRecord` per
(label, calibration seed), and the `Comparison` of them all.

`frame()` has one row per (label, seed, dataset) with the per-unit NLLs; `summary()` the mean and
spread over seeds; `verdicts(baseline)` each method's paired difference against a baseline with its
95% interval and verdict from `awqnb.analysis.stats` (a t interval over the seeds' paired
differences combined with the windows' shared sampling noise; 'cannot separate seeds' with fewer
than 3 seeds); `merge` joins runs split over calls; `to_json`/`read` round-trip it (no pickle, the
format "awqnb-comparison/1") with its provenance.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from awqnb.analysis import stats
from awqnb.analysis.evaluate import PerplexityResult
from awqnb.compare.claims import seed_claims
from awqnb.core.errors import AwqnbError
from awqnb.core.files import atomic_write, read_json
from awqnb.quant.method_config import MethodConfig

FORMAT = "awqnb-comparison/1"

@dataclass
class RunRecord:
    """One label on one calibration seed. status: 'ok', or 'skipped' (with `reason`).
    shared: the method uses no calibration data, so this one run stands for every seed."""

    label: str
    method: str
    seed: int
    status: str = "ok"
    reason: str | None = None
    shared: bool = False
    config: dict | None = None
    calibration: dict | None = None
    quantize_s: float | None = None
    peak_mem_gb: float | None = None
    results: dict[str, PerplexityResult] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # timings (awqnb) or what the reference tool reported

    def to_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k != "results"}
        d["results"] = {ds: r.to_dict() for ds, r in self.results.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        d = dict(d)
        d["results"] = {ds: PerplexityResult.from_dict(r) for ds, r in d.get("results", {}).items()}
        return cls(**d)


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    return str(o)


@dataclass
class Comparison:
    """What `run_comparison` measured (see the module docstring). quant_results: (label, seed) →
    QuantResult of the awqnb methods, in memory only (write them with `QuantResult.save`)."""

    runs: list[RunRecord]
    provenance: dict
    mse: Any = None  # DataFrame of diagnostics.layer_mse rows (+ seed), first seed only, or None
    quant_results: dict = field(default_factory=dict, repr=False)

    # -- access --
    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(r.label for r in self.runs))

    @property
    def seeds(self) -> list[int]:
        return list(self.provenance.get("seeds", sorted({r.seed for r in self.runs})))

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(ds for r in self.runs for ds in r.results))

    @property
    def skipped(self) -> dict[str, str]:
        """label → why it did not run."""
        return {r.label: r.reason for r in self.runs if r.status != "ok"}

    def per_seed(self, label: str, dataset: str) -> dict[int, PerplexityResult]:
        """seed → PerplexityResult of `label` on `dataset` (a shared run stands for every seed)."""
        out = {}
        for r in self.runs:
            if r.label == label and r.status == "ok" and dataset in r.results:
                for s in (self.seeds if r.shared else [r.seed]):
                    out[s] = r.results[dataset]
        return out

    def results(self, seed: int | None = None) -> dict[str, dict[str, PerplexityResult]]:
        """label → dataset → PerplexityResult on one seed (default the first): the shape
        `evaluate.comparison_table` takes."""
        seed = self.seeds[0] if seed is None else seed
        out: dict = {}
        for label in self.labels:
            for ds in self.datasets:
                r = self.per_seed(label, ds).get(seed)
                if r is not None:
                    out.setdefault(label, {})[ds] = r
        return out

    # -- tables --
    def frame(self, nll: bool = True):
        """One row per (label, seed, dataset): method, status, protocol, seqlen, ppl, n_units,
        quantize_s, peak_mem_gb, eval_s, shared, reason (and the per-unit `nll`, `n_tokens` lists)."""
        import pandas as pd

        rows = []
        for r in self.runs:
            base = {"label": r.label, "method": r.method, "status": r.status, "shared": r.shared,
                    "quantize_s": r.quantize_s, "peak_mem_gb": r.peak_mem_gb, "reason": r.reason}
            seeds = self.seeds if r.shared else [r.seed]
            if r.status != "ok":
                rows += [{**base, "seed": s, "dataset": None} for s in seeds]
                continue
            for s in seeds:
                for ds, res in r.results.items():
                    row = {**base, "seed": s, "dataset": ds, "protocol": res.protocol, "seqlen": res.seqlen,
                           "ppl": res.ppl, "n_units": res.n_units, "eval_s": res.seconds}
                    if nll:
                        row.update(nll=list(res.nll), n_tokens=list(res.n_tokens))
                    rows.append(row)
        cols = ["label", "method", "seed", "dataset", "status", "protocol", "seqlen", "ppl", "n_units", "quantize_s",
                "peak_mem_gb", "eval_s", "shared", "reason"] + (["nll", "n_tokens"] if nll else [])
        return pd.DataFrame(rows).reindex(columns=cols)

    def summary(self):
        """One row per (label, dataset) that ran: n_seeds, mean and sd (over seeds; NaN with one)
        of the perplexity, min, max, the per-seed values ('seed: ppl' joined), mean quantize_s and
        the largest peak_mem_gb. A shared method (no calibration) has sd 0 by construction."""
        import numpy as np
        import pandas as pd

        f = self.frame(nll=False)
        f = f[f["status"] == "ok"]
        rows = []
        for (label, ds), d in f.groupby(["label", "dataset"], sort=False):
            v = d["ppl"].to_numpy(dtype=float)
            rows.append({"label": label, "method": d["method"].iloc[0], "dataset": ds,
                         "protocol": d["protocol"].iloc[0], "seqlen": int(d["seqlen"].iloc[0]),
                         "n_seeds": len(v), "ppl_mean": float(v.mean()),
                         "ppl_sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                         "ppl_min": float(v.min()), "ppl_max": float(v.max()),
                         "per_seed": " / ".join(f"{s}: {p:.3f}" for s, p in zip(d["seed"], v)),
                         "quantize_s": float(np.nanmean(d["quantize_s"].astype(float))) if d["quantize_s"].notna().any() else None,
                         "peak_mem_gb": float(d["peak_mem_gb"].max()) if d["peak_mem_gb"].notna().any() else None,
                         "shared": bool(d["shared"].iloc[0])})
        return pd.DataFrame(rows)

    def verdicts(self, baseline: str, labels: Iterable[str] | None = None):
        """Each label (but the baseline) against `baseline`, per dataset (`awqnb.analysis.stats`): delta_pct
        (100 (exp(mean over seeds of log(ppl / ppl_baseline)) − 1); negative: better than the
        baseline), ci_low, ci_high (95%: the seeds' t interval combined with the windows' shared
        sampling noise), n_seeds, verdict ('better' / 'worse' / 'within noise', or 'cannot separate
        seeds' with fewer than 3 seeds where a side uses calibration) and noise (what the interval
        carries)."""
        import pandas as pd

        if baseline not in self.labels:
            raise AwqnbError(f"baseline {baseline!r} is not among the labels ({', '.join(self.labels)}).")
        if baseline in self.skipped:
            raise AwqnbError(f"baseline {baseline!r} did not run ({self.skipped[baseline]}); choose another.")
        shared = {r.label for r in self.runs if r.shared}
        rows = []
        for label in (labels or self.labels):
            if label == baseline or label in self.skipped:
                continue
            for ds in self.datasets:
                a, b = self.per_seed(label, ds), self.per_seed(baseline, ds)
                if not a or not b:
                    continue
                iv = stats.paired_interval(a, b, calibrated=not {label, baseline} <= shared)
                rows.append({"label": label, "baseline": baseline, "dataset": ds, "delta_pct": iv.delta_pct,
                             "ci_low": iv.ci_low, "ci_high": iv.ci_high, "n_seeds": iv.n_seeds,
                             "verdict": iv.verdict, "noise": iv.noise})
        return pd.DataFrame(rows, columns=["label", "baseline", "dataset", "delta_pct", "ci_low", "ci_high", "n_seeds",
                                           "verdict", "noise"])

    def seeds_note(self) -> str:
        """What this comparison's number of seeds can and cannot show (`stats.seeds_note`)."""
        calibrated = [r.seed for r in self.runs if not r.shared and r.status == "ok"]
        return stats.seeds_note(len(set(calibrated)) or len(self.seeds))

    def claims(self):
        """`compare.seed_claims` on this comparison (every seed)."""
        return seed_claims(self, None)

    def configs(self) -> dict[str, MethodConfig]:
        """label → MethodConfig of the awqnb methods (first seed's)."""
        out = {}
        for m in self.provenance.get("methods", []):
            if m.get("kind") == "awqnb" and m.get("config"):
                out[m["label"]] = MethodConfig.from_dict(m["config"])
        return out

    @classmethod
    def merge(cls, *comps: "Comparison") -> "Comparison":
        """One comparison from several runs of the same setting (e.g. methods or seeds split over
        calls): the runs of all, a label/seed pair once (the first), a shared run (fp, rtn) once.
        AwqnbError unless model, bits, group size, symmetry, calibration and datasets agree."""
        if not comps:
            raise AwqnbError("nothing to merge.")
        keys = ("model", "bits", "group_size", "symmetric", "calibration", "datasets")
        first = comps[0].provenance
        for c in comps[1:]:
            bad = [k for k in keys if c.provenance.get(k) != first.get(k)]
            if bad:
                raise AwqnbError(f"cannot merge comparisons that differ in {', '.join(bad)}.")
        runs, seen, methods, quant_results = [], set(), [], {}
        for c in comps:
            for r in c.runs:
                key = (r.label,) if r.shared else (r.label, r.seed)
                if key not in seen:
                    seen.add(key)
                    runs.append(r)
            for m in c.provenance.get("methods", []):
                if m["label"] not in {x["label"] for x in methods}:
                    methods.append(m)
            quant_results.update(c.quant_results)
        seeds = sorted({s for c in comps for s in c.seeds})
        # complete when every method has its run for every seed, whichever piece holds it
        grid = all((m["label"],) in seen or (m["label"], s) in seen for m in methods for s in seeds)
        prov = {**first, "methods": methods, "seeds": seeds,
                "complete": grid,
                "merged_from": [{k: c.provenance.get(k) for k in ("seeds", "device", "versions", "argv")} for c in comps]}
        frames = [c.mse for c in comps if c.mse is not None]
        mse = None
        if frames:
            import pandas as pd

            mse = pd.concat(frames, ignore_index=True)
            mse = mse.drop_duplicates(subset=[x for x in ("method", "seed", "layer", "module") if x in mse.columns])
        return cls(runs, prov, mse, quant_results)

    # -- serialisation --
    def to_dict(self) -> dict:
        return {"format": FORMAT, "provenance": self.provenance, "runs": [r.to_dict() for r in self.runs],
                "mse": None if self.mse is None else self.mse.to_dict("records")}

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        try:
            return atomic_write(path, json.dumps(self.to_dict(), indent=1, default=_jsonable))
        except OSError as e:
            raise AwqnbError(f"cannot write {path} ({e.strerror or e}); choose a writable path.") from e

    @classmethod
    def from_dict(cls, d: Mapping) -> "Comparison":
        import pandas as pd

        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise AwqnbError(f"not an awqnb comparison (format {d.get('format') if isinstance(d, Mapping) else None!r}, "
                             f"expected {FORMAT!r}); pass a file written by Comparison.to_json.")
        mse = pd.DataFrame(d["mse"]) if d.get("mse") else None
        return cls([RunRecord.from_dict(r) for r in d["runs"]], dict(d["provenance"]), mse)

    @classmethod
    def read(cls, path: str | Path) -> "Comparison":
        return cls.from_dict(read_json(path, "comparison file", "", "; pass a file written by Comparison.to_json"))
