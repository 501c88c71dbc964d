"""Which layers hurt: end-to-end sensitivity, and how much of each method's gap
to FP keeping the most sensitive families at 8 bits closes — measured with real quantization runs.

For one model and group size, per method (rtn, awq):
  1. quantize (timed), perplexity on the full WikiText-2 test (GPTQ token protocol, `--eval-seqlen`);
  2. a full sensitivity pass (every layer × family × {only, except}) on the ranking slice
     (`--n-windows` windows of `--seqlen` from the start of `--rank-dataset`; auto: WikiText-2
     validation, disjoint from the test set), timed with torch.cuda.synchronize before and after
     (a small warm-up pass first), plus its fast `pareto` approximation scored on the first
     windows of WikiText-2 test (tokens the plans were not chosen on);
  3. real `pipeline.quantize` runs with plans keeping k ∈ `--ks` families at 8 bits, and the
     ≤ `--linear-frac` of linears budget, chosen by `--strategies`: sensitivity ('only' KL), recovery
     ('except' KL), density ('only' KL per parameter), MSE (relative output MSE of the family) and at
     random (`--random-seeds`): full WikiText-2 perplexity and the share
     of the method's gap to FP closed, (ppl_method − ppl_plan) / (ppl_method − ppl_FP);
  4. Spearman rank correlation between per-family MSE and 'only' KL (does MSE predict what hurts?).

Writes OUT/sensitivity.json (provenance, frames, pareto, every run) and OUT/summary.md (rewritten
after every run, so a cut-off run keeps what it measured). Needs torch, transformers, pandas, numpy,
safetensors (gguf for the alias models); without `datasets` the local parquet files are read with
pandas (pyarrow).

Note: the plans are chosen on WikiText-2 validation (by default), so the full WikiText-2 test
perplexity of a plan is measured on text it was not chosen on; the ranking slice may share tokens
with the calibration set (also drawn from WikiText-2 validation), not with the evaluation.

Example (H200):
  python bench/sensitivity.py --model smollm2-135m --group-size 64 --methods rtn,awq --device cuda \
      --dtype float32
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from awqnb.quant import pipeline
from awqnb.analysis import plans, sensitivity as S
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.analysis.evaluate import token_perplexity
from awqnb.quant.importance import spearman
from awqnb.model.devices import cast_parameters, resolve_device

from awqnb.model.loading import load_model
from awqnb.model.provenance import versions
log = logging.getLogger("bench.sensitivity")


def _sync(dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def md_table(rows: list[dict], cols: list[str], fmt: dict | None = None) -> str:
    """A markdown table (no tabulate needed)."""
    fmt = fmt or {}

    def cell(c, v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if c in fmt:
            return fmt[c].format(v)
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(cell(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


from _common import run_dir, write_run_info  # noqa: E402 — bench/ is on sys.path when run as a script


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory overriding the model's")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--methods", default="rtn,awq")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="compute dtype of the search and the sensitivity forwards")
    p.add_argument("--eval-dtype", default="float32", help="dtype of the full-perplexity evaluations")
    p.add_argument("--load-dtype", default="auto", help="storage dtype of the model (auto: the checkpoint's own)")
    p.add_argument("--out", default=None, help="default: bench/results/sensitivity/<date>_<device>_<model>/")
    p.add_argument("--n-windows", type=int, default=8, help="sensitivity slice: windows")
    p.add_argument("--seqlen", type=int, default=512, help="sensitivity slice: window length")
    p.add_argument("--rank-dataset", default="auto",
                   help="token set the sensitivity pass ranks on (auto: WikiText-2 validation, disjoint from the "
                        "WikiText-2 test tokens the plans are scored on; wikitext2 ranks on the test set itself)")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="full WikiText-2 perplexity window (GPTQ protocol)")
    p.add_argument("--max-windows", type=int, default=None, help="cap the full evaluation (smoke runs)")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-dataset", default="wikitext2")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--ks", default="1,2,4,8", help="families kept at --keep-bits in the real runs")
    p.add_argument("--linear-frac", type=float, default=0.10, help="also the <= this share of linears budget (0: off)")
    p.add_argument("--keep-bits", type=int, default=8)
    p.add_argument("--strategies", default="sensitivity,recovery,mse,random")
    p.add_argument("--random-seeds", default="0")
    p.add_argument("--no-real", action="store_true", help="skip the real pipeline runs (sensitivity + pareto only)")
    p.add_argument("--calib-batch-size", type=int, default=None, help="default 64 on GPU, 16 on CPU")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from awqnb.model.data import load_calibration, load_eval_tokens, ranking_tokens, slice_description

    dev = resolve_device(args.device)
    eval_dtype = getattr(torch, args.eval_dtype)
    out = write_run_info(args.out or run_dir("sensitivity", args.model, dev), dev)
    fp_model, tok = load_model(args.model, tokenizer=args.tokenizer, dtype=args.load_dtype)
    tokens = load_eval_tokens(tok, "wikitext2")
    rank_tokens, rank_slice = ranking_tokens(tok, "wikitext2", rank_dataset=args.rank_dataset,
                                             allow_eval=args.rank_dataset == "wikitext2", n_windows=args.n_windows,
                                             seqlen=args.seqlen, calib_dataset=args.calib_dataset)
    score_slice = slice_description("wikitext2", args.n_windows, args.seqlen)
    calib = load_calibration(tok, args.calib_dataset, n_calib=args.n_calib, seqlen=args.calib_seqlen, seed=args.seed)
    methods = [m for m in args.methods.split(",") if m]
    ks = [int(k) for k in args.ks.split(",") if k]
    strategies = [s for s in args.strategies.split(",") if s]
    rseeds = [int(s) for s in args.random_seeds.split(",") if s]
    cbs = args.calib_batch_size or (64 if dev.type == "cuda" else 16)
    n_layers = len(pipeline.blocks(fp_model, pipeline.resolve_spec(fp_model)))
    n_lin = n_layers * len(pipeline.resolve_spec(fp_model).linears)
    max_lin = int(math.floor(args.linear_frac * n_lin + 1e-9)) if args.linear_frac > 0 else None

    prov = {"argv": sys.argv, "model": args.model, "bits": args.bits, "group_size": args.group_size,
            "calibration": calib.to_dict(), "calib_seed": args.seed, "device": str(dev), "dtype": args.dtype,
            "eval_dtype": args.eval_dtype, "load_dtype": str(next(fp_model.parameters()).dtype),
            "full_eval": {"dataset": "wikitext2 test", "protocol": "gptq-token", "seqlen": args.eval_seqlen,
                          "max_windows": args.max_windows, "n_tokens": int(tokens.numel())},
            "slice": {"rank": rank_slice, "score": score_slice, "seqlen": args.seqlen, "n_windows": args.n_windows},
            "keep_bits": args.keep_bits, "linears": n_lin, "max_linears_budget": max_lin,
            "versions": versions()}
    state = {"provenance": prov, "fp": None, "methods": {}}

    def full_ppl(model, label):
        m = copy.deepcopy(model)
        cast_parameters(m.to(dev), eval_dtype)
        r = token_perplexity(m, tokens, seqlen=args.eval_seqlen, max_windows=args.max_windows, device=dev,
                             batch_size=8 if dev.type == "cuda" else 1, progress=False)
        del m
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        log.info("%s: ppl %.4f (%d windows)", label, r.ppl, r.n_units)
        return r.ppl

    def cfg_for(method, plan=None):
        return MethodConfig(method=method, quant=QuantConfig(args.bits, args.group_size), search=SearchConfig(),
                            seed=args.seed, dtype=args.dtype, calib_batch_size=cbs, plan=plan)

    def quantize(cfg):
        q = copy.deepcopy(fp_model)
        t = _sync(dev)
        res = pipeline.quantize(q, cfg, calib if pipeline.get_method(cfg.method).needs_calibration else None,
                                device=dev, model_name=args.model, progress=False)
        return q, res, _sync(dev) - t

    state["fp"] = {"ppl": full_ppl(fp_model, "fp")}
    write(out, state)
    for method in methods:
        cfg = cfg_for(method)
        qm, res, qs = quantize(cfg)
        mrec = {"config": cfg.to_dict(), "quantize_s": qs, "ppl": full_ppl(qm, method), "real": []}
        state["methods"][method] = mrec
        write(out, state)
        # warm-up (kernels, allocator), then the timed full pass on the given quantization
        S.sensitivity(fp_model, None, calib, rank_tokens, result=(qm, res), device=dev, seqlen=args.seqlen,
                      n_windows=args.n_windows, layers=[n_layers - 1], families=["down"], modes="only",
                      dtype=args.dtype, progress=False, cache=False)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = _sync(dev)
        frame = S.sensitivity(fp_model, None, calib, rank_tokens, result=(qm, res), device=dev, seqlen=args.seqlen,
                              n_windows=args.n_windows, dtype=args.dtype, cache=False, model_name=args.model,
                              slice_name=rank_slice)
        mrec["sensitivity_s"] = _sync(dev) - t
        if dev.type == "cuda":
            mrec["sensitivity_peak_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9  # GB = 1e9 bytes
        mrec["sensitivity_pass"] = f"{n_layers} layers x {frame.family.nunique()} families x 2 modes"
        mrec["frame"] = frame.to_dict(orient="records")
        mrec["attrs"] = {k: v for k, v in frame.attrs.items() if k != "provenance"}
        mrec["frame_provenance"] = frame.attrs["provenance"]
        only = frame[frame["mode"] == "only"].sort_values(["layer", "family"])
        exc = frame[frame["mode"] == "except"].sort_values(["layer", "family"])
        mrec["spearman"] = {
            "mse_vs_only_kl": spearman(only.mse.to_numpy(), only.kl.to_numpy()),
            "mse_vs_except_recovery": spearman(exc.mse.to_numpy(), (frame.attrs["quant_kl"] - exc.kl).to_numpy()),
            "only_kl_vs_except_recovery": spearman(only.kl.to_numpy(), (frame.attrs["quant_kl"] - exc.kl).to_numpy()),
        }
        mrec["most_sensitive_layer"] = S.most_sensitive_layer(frame)
        log.info("%s: sensitivity pass %.1f s; Spearman(MSE, only KL) %.3f", method, mrec["sensitivity_s"],
                 mrec["spearman"]["mse_vs_only_kl"])
        write(out, state)
        strat = [(s, sd) for s in strategies for sd in (rseeds if s == "random" else [0])]
        t = _sync(dev)
        par = plans.pareto(fp_model, None, calib, tokens, frame, ks=[0] + ks, keep_bits=args.keep_bits,
                       strategies=[s for s in strategies if s != "random"], result=(qm, res), device=dev,
                       dtype=args.dtype, max_linears=[max_lin] if max_lin else (), progress=False,
                       slice_name=score_slice)
        frames = [par]
        for sd in (rseeds if "random" in strategies else []):
            pr = plans.pareto(fp_model, None, calib, tokens, frame, ks=ks, keep_bits=args.keep_bits, strategies=["random"],
                          seed=sd, result=(qm, res), device=dev, dtype=args.dtype,
                          max_linears=[max_lin] if max_lin else (), progress=False, slice_name=score_slice)
            pr["seed"] = sd
            frames.append(pr)
        mrec["pareto_s"] = _sync(dev) - t
        mrec["pareto"] = [r for f in frames for r in f.to_dict(orient="records")]
        mrec["pareto_note"] = par.attrs["approximation"]
        del qm
        gc.collect()
        write(out, state)
        if args.no_real:
            continue
        done: dict = {}
        budgets = [("k", k) for k in ks] + ([("max_linears", max_lin)] if max_lin else [])
        for s, sd in strat:
            for kind, v in budgets:
                plan = plans.plan_from_sensitivity(frame, **{kind: v}, keep_bits=args.keep_bits, by=s, seed=sd,
                                               base_bits=args.bits)
                key = plan.entries
                if key in done:  # same plan as another strategy / budget: same run
                    row = dict(done[key])
                else:
                    pq, pres, pqs = quantize(cfg_for(method, plan))
                    ppl = full_ppl(pq, f"{method} {s} {kind}={v}")
                    del pq
                    row = {"ppl": ppl, "quantize_s": pqs}
                    done[key] = row
                gap = mrec["ppl"] - state["fp"]["ppl"]
                mrec["real"].append({
                    "strategy": s, "seed": sd if s == "random" else None, "budget": f"{kind}={v}", "k": len(plan),
                    "n_linears": plans.plan_linears(frame, plan), "avg_bits": plans.plan_avg_bits(frame, plan, args.bits),
                    "plan": plan.describe(), **row,
                    "gap_closed": (mrec["ppl"] - row["ppl"]) / gap if gap > 0 else float("nan")})
                write(out, state)
    md = write(out, state, final=True)
    sys.stdout.write(md)
    return 0


def write(out: Path, state: dict, final: bool = False) -> str:
    """(Re)write sensitivity.json and summary.md from everything measured so far."""
    import pandas as pd

    (out / "sensitivity.json").write_text(json.dumps({**state, "complete": final}, indent=1,
                                                     default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    pv = state["provenance"]
    head = (f"model {pv['model']}, W{pv['bits']} g{pv['group_size']}, calibration {pv['calibration']['dataset']} "
            f"{pv['calibration']['n_calib']}x{pv['calibration']['seqlen']} seed {pv['calib_seed']}; full perplexity: "
            f"WikiText-2 test, GPTQ token protocol, seqlen {pv['full_eval']['seqlen']}"
            + (f" (first {pv['full_eval']['max_windows']} windows)" if pv['full_eval']['max_windows'] else " (all windows)")
            + f", eval dtype {pv['eval_dtype']}; sensitivity ranked on {pv['slice'].get('rank')}; plans scored on "
              f"{pv['slice'].get('score')}; KL in nats/token; compute dtype {pv['dtype']} "
              f"(model stored {pv['load_dtype']}); device {pv['device']}; plans keep families at {pv['keep_bits']} bits; "
              f"{pv['linears']} linears, 10% budget = {pv['max_linears_budget']}"
            + ("" if final else "  (INCOMPLETE: run in progress or cut off)"))
    md = ["# Layer sensitivity and mixed-precision plans", "", head, ""]
    fp = (state.get("fp") or {}).get("ppl")
    rows = [{"method": "fp", "ppl": fp}] + [
        {"method": m, "ppl": r.get("ppl"), "quantize_s": r.get("quantize_s"), "sensitivity_s": r.get("sensitivity_s"),
         "sensitivity_peak_gb": r.get("sensitivity_peak_gb"), "pass": r.get("sensitivity_pass"),
         "slice_fp_ppl": (r.get("attrs") or {}).get("fp_ppl"), "slice_quant_ppl": (r.get("attrs") or {}).get("quant_ppl"),
         "slice_quant_kl": (r.get("attrs") or {}).get("quant_kl"), "most_sensitive_layer": r.get("most_sensitive_layer")}
        for m, r in state["methods"].items()]
    md += ["## Full perplexity and the sensitivity pass", "",
           md_table(rows, ["method", "ppl", "quantize_s", "sensitivity_s", "sensitivity_peak_gb", "pass", "slice_fp_ppl",
                           "slice_quant_ppl", "slice_quant_kl", "most_sensitive_layer"],
                    {"ppl": "{:.4f}", "quantize_s": "{:.1f}", "sensitivity_s": "{:.1f}", "sensitivity_peak_gb": "{:.2f}",
                     "slice_fp_ppl": "{:.4f}", "slice_quant_ppl": "{:.4f}", "slice_quant_kl": "{:.5f}"}), ""]
    for m, r in state["methods"].items():
        cfgd = r["config"]
        tag = f"{m} W{cfgd['quant']['bits']} g{cfgd['quant']['group_size']} (search dtype {cfgd['dtype']})"
        if "spearman" in r:
            md += [f"## {tag}: does MSE predict what hurts?", "",
                   md_table([{"pair": k, "spearman": v} for k, v in r["spearman"].items()], ["pair", "spearman"],
                            {"spearman": "{:.3f}"}), ""]
            fr = pd.DataFrame(r["frame"])
            top = fr[fr["mode"] == "only"].sort_values("kl", ascending=False).head(10)
            md += [f"Top 10 families by 'only' KL ({tag}; mse = relative output MSE on the slice):", "",
                   md_table(top.to_dict(orient="records"), ["layer", "family", "kl", "dppl", "mse", "n_params"],
                            {"kl": "{:.5f}", "dppl": "{:+.4f}", "mse": "{:.3g}"}), ""]
        if r.get("pareto"):
            md += [f"Slice-only Pareto approximation ({tag}; {r.get('pareto_note')}):", "",
                   md_table(r["pareto"], ["strategy", "seed", "budget", "k", "n_linears", "avg_bits", "ppl", "kl"],
                            {"avg_bits": "{:.3f}", "ppl": "{:.4f}", "kl": "{:.5f}"}), ""]
        if r.get("real"):
            md += [f"## {tag}: real runs with the plan, full WikiText-2 (FP {fp:.4f}, {m} {r['ppl']:.4f})", "",
                   "gap_closed = (ppl_method − ppl_plan) / (ppl_method − ppl_FP)", "",
                   md_table(r["real"], ["strategy", "seed", "budget", "k", "n_linears", "avg_bits", "ppl", "gap_closed",
                                        "plan"],
                            {"avg_bits": "{:.3f}", "ppl": "{:.4f}", "gap_closed": "{:.1%}"}), ""]
    text = "\n".join(md) + "\n"
    (out / "summary.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
