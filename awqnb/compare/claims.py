"""Comparing methods: the configurations of a comparison run and the seeds' claims checked on it.

`method_configs` turns a list of method specs (`awqnb.compare.specs`) plus named variants (e.g. `awq_l1`: awq with L1
salience) into one MethodConfig per label; `seed_claims` reads a finished comparison (perplexity
results and QuantResults by label) and states, per claim of the seed documents, what this run
measured and whether the claim holds here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

from awqnb.analysis import stats
from awqnb.analysis.stats import BASELINE
from awqnb.compare.specs import parse_spec
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.methods import get_method

VARIANT_KEYS = {"method", "bits", "group_size", "symmetric", "salience", "n_grid", "duo_scaling", "clip", "params"}


def method_configs(methods: Iterable[str], variants: Mapping[str, Mapping[str, Any]] | None, quant: QuantConfig,
                   search: SearchConfig, method_params: Mapping[str, Mapping] | None = None,
                   seed: int = 42, config_fields: Mapping[str, Any] | None = None) -> dict[str, MethodConfig]:
    """label → MethodConfig. Each spec of `methods` (`awqnb.compare.specs`: 'awq', 'awq_ref',
    'awq_sh@outlier_percent=1', ...) is a label using the shared `quant` and `search` settings,
    `method_params[name]` (else `method_params[method]`) and its own overrides; each
    `variants[label]` is a method with some of them overridden: {'method': 'awq', 'salience': 'l1'}
    or {'method': 'awq', 'symmetric': True} (keys: method, bits, group_size, symmetric, salience,
    n_grid, duo_scaling, clip, params). `config_fields` (e.g. dtype, calib_batch_size) are set on
    every config (a spec's own overrides win). Unknown methods or parameters fail here, before any
    work."""
    method_params = dict(method_params or {})
    config_fields = dict(config_fields or {})
    out: dict[str, MethodConfig] = {}
    for m in methods:
        p = parse_spec(m)
        params = method_params.get(p.name, method_params.get(p.method, {}))
        out[p.label] = p.method_config(quant, search, params, seed, **config_fields)
    for label, v in (variants or {}).items():
        v = dict(v)
        unknown = set(v) - VARIANT_KEYS
        if unknown or "method" not in v:
            raise AwqnbError(f"variant {label!r}: needs 'method' and only the keys {sorted(VARIANT_KEYS)} "
                             f"(got {sorted(v)}).")
        if label in out:
            raise AwqnbError(f"variant {label!r} has the name of a method in the list; give it another label.")
        q = dataclasses.replace(quant, **{k: v[k] for k in ("bits", "group_size", "symmetric") if k in v})
        s = dataclasses.replace(search, **{k: v[k] for k in ("salience", "n_grid", "duo_scaling", "clip") if k in v})
        params = v.get("params", method_params.get(v["method"], {}))
        out[label] = MethodConfig(method=v["method"], quant=q, search=s, params=params, seed=seed, **config_fields)
        get_method(out[label].method)(out[label])
    return out


def _cfg_of(res) -> dict:
    """The grid and search settings of a QuantResult or a MethodConfig."""
    c = (res.config if hasattr(res, "config") else res).to_dict()
    return {"method": c["method"], **c["quant"], **{k: c["search"][k] for k in ("salience", "duo_scaling", "clip")},
            "params": c["params"]}


def _find_label(quant_results: Mapping[str, Any], method: str, like: dict | None, **want) -> str | None:
    """The first label whose config has `method`, the `want` values, and otherwise the same grid
    and search settings as `like` (a _cfg_of dict)."""
    for label, res in quant_results.items():
        c = _cfg_of(res)
        if c["method"] != method or any(c.get(k) != v for k, v in want.items()):
            continue
        if like is not None and any(c[k] != like[k] for k in ("bits", "group_size", "symmetric", "salience",
                                                                "duo_scaling", "clip") if k not in want):
            continue
        return label
    return None


def summary_table(table, quant_results: Mapping[str, Any] | None = None, mse=None):
    """One row per label of an `evaluate.comparison_table`: ppl and delta % (95% interval) per
    dataset (columns `ppl <dataset>`, `delta % <dataset>`, `CI <dataset>`), the quantization time
    (s), and, with a `diagnostics.layer_mse` frame, the mean rel_mse over linears and the worst
    (layer, module)."""
    import pandas as pd

    rows = {}
    for r in table.to_dict("records"):
        row = rows.setdefault(r["method"], {"label": r["method"]})
        ds = r["dataset"]
        row[f"ppl {ds}"] = r["ppl"]
        if r.get("verdict") != "(baseline)":
            row[f"delta % {ds}"] = r["delta_pct"]
            row[f"CI {ds}"] = f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
    datasets = list(dict.fromkeys(table["dataset"]))
    for label, row in rows.items():
        res = (quant_results or {}).get(label)
        row["quantize_s"] = res.timings.get("total_s") if res is not None else None
        if mse is not None:
            d = mse[mse["method"] == label]
            if not d.empty:
                w = d.loc[d["rel_mse"].idxmax()]
                row["mean rel_mse"] = float(d["rel_mse"].mean())
                row["worst layer/module"] = f"{int(w['layer'])} {w['module']} ({w['rel_mse']:.3g})"
    cols = ["label"] + [f"{k} {ds}" for ds in datasets for k in ("ppl", "delta %", "CI")]
    cols += ["quantize_s", "mean rel_mse", "worst layer/module"]
    df = pd.DataFrame(list(rows.values()))
    return df.reindex(columns=[c for c in cols if c in df.columns])


def best_per_dataset(table):
    """Per dataset of an `evaluate.comparison_table`: the quantized method with the lowest
    perplexity → rows (dataset, protocol, seqlen, best, ppl, delta_pct, ci_low, ci_high, verdict
    (against the table's baseline), runner_up, runner_up_ppl) (the baseline row is left out). A
    ranking of one result per method, not a verdict between best and runner-up: those need seeds
    (`comparison.Comparison.verdicts`)."""
    import pandas as pd

    rows = []
    q = table[table["verdict"] != BASELINE]
    for ds, d in q.groupby("dataset", sort=False):
        d = d.sort_values("ppl", kind="stable")
        best = d.iloc[0]
        second = d.iloc[1] if len(d) > 1 else None
        rows.append({"dataset": ds, "protocol": best["protocol"], "seqlen": best["seqlen"], "best": best["method"],
                     "ppl": best["ppl"], "delta_pct": best["delta_pct"], "ci_low": best["ci_low"],
                     "ci_high": best["ci_high"], "verdict": best["verdict"],
                     "runner_up": None if second is None else second["method"],
                     "runner_up_ppl": None if second is None else second["ppl"]})
    return pd.DataFrame(rows)


def seed_claims(results, quant_results: Mapping[str, Any] | None = None):
    """The seeds' claims checked on this run → one row per (claim, dataset or evidence):
    claim, a, b (labels compared), dataset, value (delta % of a against b, or the evidence's
    figure), ci_low, ci_high (95%), n_seeds, unit, seed_says, verdict.

    results: a `comparison.Comparison` (every calibration seed; quant_results then come from it), or
    label → dataset → PerplexityResult of one run with quant_results: label → QuantResult.

    Perplexity claims (delta % = exp(mean over seeds of mean NLL_a − mean NLL_b) − 1; negative: a
    is better; interval and verdict from `awqnb.analysis.stats.paired_interval`, the one rule):
      heuristic vs plain: awq_sh vs awq · L2 vs L1 salience: awq(l2) vs awq(l1) ·
      dynamic heuristic vs plain: awq_dh vs awq · praq vs awq · asymmetric vs symmetric: awq vs
      awq(symmetric). Verdict: 'held' (the rule says better), 'did not hold' (worse), 'within
      noise', 'cannot separate seeds' (fewer than 3 seeds: one run per method is one of these),
      'not run' (a side is missing: add it to the methods).
    Evidence claims: Kneedle outlier fraction of awq_dh (mean over seeds, layers and linears; the
      seed saw 0.65% on Llama-3-8B vs a fixed 5%) · ReFlip attention-score error of awq_gqa
      (1 − ΣJ_after/ΣJ_before per layer, over seeds; the seed: 14–86% better).
    """
    import numpy as np
    import pandas as pd

    if hasattr(results, "per_seed"):  # a comparison.Comparison
        comp = results
        configs = comp.configs()
        records: dict[str, list] = {}
        for (label, _s), qr in comp.quant_results.items():
            records.setdefault(label, []).append(qr)

        def per_seed(label, ds):
            return comp.per_seed(label, ds)

        datasets = comp.datasets
        ran = {lb for lb in comp.labels if lb not in comp.skipped}
    else:
        quant_results = dict(quant_results or {})
        configs = {k: r.config for k, r in quant_results.items()}
        records = {k: [r] for k, r in quant_results.items()}

        def per_seed(label, ds):
            r = results.get(label, {}).get(ds)
            return {0: r} if r is not None else {}

        datasets = list(dict.fromkeys(ds for per in results.values() for ds in per))
        ran = set(results)

    ref_label = _find_label(configs, "awq", None, salience="l2", symmetric=False) or _find_label(configs, "awq", None)
    like = _cfg_of(configs[ref_label]) if ref_label else None
    awq = ref_label
    pairs = [
        ("heuristic rounding beats plain AWQ", _find_label(configs, "awq_sh", like), awq,
         "awq_sh (heuristic-guided greedy rounding) lowers perplexity vs standard AWQ"),
        ("dynamic heuristic beats plain AWQ", _find_label(configs, "awq_dh", like), awq,
         "awq_dh: 0.6–11% better perplexity than standard AWQ (Mistral, Llama-3, Qwen2.5)"),
        ("L2 salience beats L1", _find_label(configs, "awq", like, salience="l2") if like else None,
         _find_label(configs, "awq", like, salience="l1") if like else None,
         "E[x²] (L2) salience is the seeds' default over E|x| (L1)"),
        ("praq beats AWQ", _find_label(configs, "praq", like), awq,
         "Full-PRAQ/GW-PRAQ ~2% lower perplexity than Full-AWQ/GW-AWQ"),
        ("asymmetric beats symmetric", awq,
         _find_label(configs, "awq", like, symmetric=True) if like else None,
         "the seeds quantize asymmetrically ([0, 15])"),
    ]
    rows = []
    for claim, a, b, says in pairs:
        if a is None or b is None or a == b or a not in ran or b not in ran:
            rows.append({"claim": claim, "a": a, "b": b, "dataset": None, "value": None, "ci_low": None,
                         "ci_high": None, "n_seeds": None, "unit": "delta %", "seed_says": says, "verdict": "not run"})
            continue
        for ds in datasets:
            ra, rb = per_seed(a, ds), per_seed(b, ds)
            if not ra or not rb:
                continue
            iv = stats.paired_interval(ra, rb)  # every claim pairs calibrated methods
            verdict = {stats.BETTER: "held", stats.WORSE: "did not hold"}.get(iv.verdict, iv.verdict)
            rows.append({"claim": claim, "a": a, "b": b, "dataset": ds, "value": iv.delta_pct, "ci_low": iv.ci_low,
                         "ci_high": iv.ci_high, "n_seeds": iv.n_seeds, "unit": "delta %", "seed_says": says,
                         "verdict": verdict})
    dh = _find_label(configs, "awq_dh", None)
    if dh is not None and dh in records:
        fr = [v for qr in records[dh] for r in qr.layers for v in (r.evidence.get("outlier_frac") or {}).values()]
        rows.append({"claim": "Kneedle outlier fraction", "a": dh, "b": None, "dataset": "(evidence)",
                     "value": 100 * float(np.mean(fr)) if fr else None,
                     "ci_low": 100 * float(np.min(fr)) if fr else None, "ci_high": 100 * float(np.max(fr)) if fr else None,
                     "n_seeds": len(records[dh]), "unit": "% of channels (mean; min, max over linears)",
                     "seed_says": "0.65% outliers on average on Llama-3-8B (vs a fixed 5%)",
                     "verdict": "measured" if fr else "no evidence"})
    else:
        rows.append({"claim": "Kneedle outlier fraction", "a": None, "b": None, "dataset": "(evidence)", "value": None,
                     "ci_low": None, "ci_high": None, "n_seeds": None, "unit": "%", "seed_says": "0.65% on Llama-3-8B",
                     "verdict": "not run"})
    gq = _find_label(configs, "awq_gqa", None)
    if gq is not None and gq in records:
        # the error of the scores the model computes (after RoPE) where the evidence has it
        imp = [r.evidence["gqa"].get("rope_rel_improvement", r.evidence["gqa"]["rel_improvement"])
               for qr in records[gq] for r in qr.layers if "gqa" in r.evidence]
        within = [14 <= 100 * v <= 86 for v in imp]
        rows.append({"claim": "ReFlip attention-score error", "a": gq, "b": None, "dataset": "(evidence)",
                     "value": 100 * float(np.median(imp)) if imp else None,
                     "ci_low": 100 * float(np.min(imp)) if imp else None,
                     "ci_high": 100 * float(np.max(imp)) if imp else None, "n_seeds": len(records[gq]),
                     "unit": "% better post-RoPE scores (median; min, max over layers)",
                     "seed_says": "14–86% better attention scores",
                     "verdict": ("no evidence" if not imp else
                                 "held" if all(within) else
                                 "partly" if any(v > 0 for v in imp) else "did not hold")})
    else:
        rows.append({"claim": "ReFlip attention-score error", "a": None, "b": None, "dataset": "(evidence)",
                     "value": None, "ci_low": None, "ci_high": None, "n_seeds": None, "unit": "%",
                     "seed_says": "14–86% better attention scores", "verdict": "not run"})
    return pd.DataFrame(rows)
