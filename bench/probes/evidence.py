"""Summarise the per-layer evidence that flip methods record (bench/quality.py's metadata.json).

    python bench/probes/evidence.py bench/results/quality/2026-11-23_h100_smollm2-135m_g64/metadata.json[.gz] [...]

Prints one row per (run, method): flips as a fraction of weights, row error |e| before/after
(mean over modules), Kneedle outlier fraction (awq_dh), James-Stein factor (awq_js, awq_gqa) and
the ReFlip attention-score error before/after (awq_gqa: per layer Σ_heads E[(q̂·k̂ − q·k)²] /
Σ_heads E[(q·k)²] on calibration token pairs, averaged over layers, and its change per layer).
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics as st
from pathlib import Path


def _load(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def summarise(run: dict) -> dict | None:
    flips, frac, eb, ea, outl, js, sb, sa = [], [], [], [], [], [], [], []
    for layer in run["layers"]:
        ev = layer.get("evidence") or {}
        for rec in (ev.get("flip") or {}).values():
            flips.append(rec["flips"])
            frac.append(rec["flip_frac"])
            eb.append(rec["e_before"]["mean"])
            ea.append(rec["e_after"]["mean"])
        outl += list((ev.get("outlier_frac") or {}).values())
        js += list((ev.get("js_factor") or {}).values())
        g = ev.get("gqa")
        if g:
            ref = sum(g["score_ref"]) or 1.0
            sb.append(sum(g["score_err_before"]) / ref)
            sa.append(sum(g["score_err_after"]) / ref)
    if not flips:
        return None
    row = {"method": run["label"], "group_size": run["group_size"], "flips": sum(flips),
           "flip_frac_mean": st.fmean(frac), "e_before_mean": st.fmean(eb), "e_after_mean": st.fmean(ea)}
    if outl:
        row |= {"outlier_frac_mean": st.fmean(outl), "outlier_frac_min": min(outl), "outlier_frac_max": max(outl)}
    if js:
        row |= {"js_factor_mean": st.fmean(js), "js_factor_min": min(js)}
    if sb:
        row |= {"rel_score_err_before": st.fmean(sb), "rel_score_err_after": st.fmean(sa),
                "score_err_change_pct_mean": 100.0 * st.fmean(a / b - 1.0 for a, b in zip(sa, sb) if b > 0),
                "score_err_change_pct_worst_layer": 100.0 * max(a / b - 1.0 for a, b in zip(sa, sb) if b > 0)}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metadata", nargs="+", type=Path)
    args = ap.parse_args(argv)
    for path in args.metadata:
        runs = _load(path)
        model = runs[0].get("model", "?") if runs else "?"
        print(f"## {path} ({model})")
        for run in runs:
            row = summarise(run)
            if row is None:
                continue
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
