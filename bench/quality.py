"""Quality, wall time and peak memory of quantization methods on one model, in one run.

For each group size and method: load the FP model fresh, quantize (timed; peak GPU memory
from torch.cuda.max_memory_allocated, reset per run), evaluate, and compare every method against
a baseline method with a paired bootstrap 95% interval. Writes `results.json` (provenance and
every evaluation with its per-unit NLL), `metadata.json` (each quantization's metadata: α per
layer, evidence, timings), `summary.csv` and `summary.md`.

Method specs: a registered method name with its defaults and the seeds' search (L2 salience,
quantized propagation), `fp` (no quantization), or a preset:
  awq_ref   awq as the reference tools run it: L1 salience, duo_scaling, clip, FP propagation.
A spec may carry overrides after '@': `robust_praq@n_calib=16`, `awq_sh@outlier_percent=1`.

Example (the issue-2 measurement; see bench/README.md for the figures):
  python bench/quality.py --model smollm2-135m --methods fp,rtn,awq,awq_ref --group-sizes 64,128 \
      --datasets wikitext2 --out bench/results/issue2
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import sys
import time
from pathlib import Path

import torch

from awqnb import pipeline
from awqnb.config import MethodConfig, QuantConfig, SearchConfig
from awqnb.data import load_calibration, load_eval_texts, load_eval_tokens
from awqnb.evaluate import PerplexityResult, comparison_table, sample_perplexity, token_perplexity
from awqnb.models import cast_parameters, load_model, resolve_device, versions

PRESETS = {
    "awq": ("awq", dict(salience="l2", propagate="quantized")),
    "awq_ref": ("awq", dict(salience="l1", duo_scaling=True, clip=True, propagate="fp")),
}
RUN_KEYS = ("n_calib", "calib_seqlen", "calib_dataset")


def parse_spec(spec: str) -> tuple[str, str, dict, dict, dict]:
    """spec → (label, method, search overrides, method params, run overrides)."""
    name, _, over = spec.partition("@")
    method, search = PRESETS.get(name, (name, {}))
    search = dict(search)
    params, run = {}, {}
    for kv in filter(None, over.split(",")):
        k, v = kv.split("=")
        v = int(v) if v.lstrip("-").isdigit() else (float(v) if v.replace(".", "", 1).lstrip("-").isdigit() else
                                                     {"true": True, "false": False}.get(v.lower(), v))
        if k in RUN_KEYS:
            run[k] = v
        elif k in SearchConfig.__dataclass_fields__:
            search[k] = v
        else:
            params[k] = v
    return spec, method, search, params, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory overriding the model's")
    p.add_argument("--methods", default="fp,rtn,awq,awq_ref")
    p.add_argument("--baseline", default=None, help="method spec the others are compared with (default: rtn if run)")
    p.add_argument("--group-sizes", default="64,128")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--datasets", default="wikitext2", help="wikitext2, c4 (token ppl), ag_news (sample ppl)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-dataset", default="wikitext2")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-dtype", default="bfloat16", help="dtype the quantized model is evaluated in on GPU")
    p.add_argument("--load-dtype", default="auto", help="storage dtype of the model (auto: the checkpoint's own)")
    p.add_argument("--dtype", default="auto", help="awqnb compute dtype of the search (auto: the model's own)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--calib-batch-size", type=int, default=None,
                   help="calibration samples per forward (default 64 on GPU, 16 on CPU)")
    p.add_argument("--out", default="bench/results/quality")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    dev = resolve_device(args.device)
    eval_dtype = getattr(torch, args.eval_dtype) if dev.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp_model, tok = load_model(args.model, tokenizer=args.tokenizer, dtype=args.load_dtype)
    datasets = [d for d in args.datasets.split(",") if d]
    eval_data = {}
    for ds in datasets:
        if ds in ("wikitext2", "c4"):
            eval_data[ds] = load_eval_tokens(tok, ds)
            logging.info("%s: %d tokens", ds, eval_data[ds].numel())
        else:
            eval_data[ds] = load_eval_texts(ds, args.n_samples, seed=args.seed)
    calibs: dict = {}
    specs = [parse_spec(s) for s in args.methods.split(",") if s]
    rows, results = [], {}
    all_evals, all_meta = [], []  # few files: the device returns at most 8

    def evaluate(model, label, g):
        cast_parameters(model.to(dev), eval_dtype)
        res = {}
        for ds in datasets:
            if ds in ("wikitext2", "c4"):
                mw = args.max_windows if ds == "wikitext2" else (args.max_windows or 256)
                r = token_perplexity(model, eval_data[ds], seqlen=args.seqlen, max_windows=mw, device=dev,
                                     dataset=ds, batch_size=8 if dev.type == "cuda" else 1, progress=False)
            else:
                r = sample_perplexity(model, tok, eval_data[ds], max_length=args.seqlen, device=dev, dataset=ds,
                                      batch_size=32 if dev.type == "cuda" else 8, progress=False)
            r.meta.update(model=args.model, method=label, bits=args.bits, group_size=g, eval_dtype=str(eval_dtype))
            all_evals.append(r.to_dict())
            res[ds] = r
            logging.info("%s g%s %s: ppl %.4f", label, g, ds, r.ppl)
        return res

    for g in [int(x) for x in args.group_sizes.split(",")]:
        results[g] = {}
        for label, method, search, params, run in specs:
            # a fresh exact copy (buffers included) on the CPU: no method sees another's evaluation
            model = copy.deepcopy(fp_model)
            row = {"model": args.model, "method": label, "bits": args.bits, "group_size": g}
            if method == "fp":
                row.update(quant_s=0.0, peak_mem_gb=None)
            else:
                cfg = MethodConfig(method=method, quant=QuantConfig(args.bits, g),
                                   search=SearchConfig(**search), params=params, seed=args.seed, dtype=args.dtype,
                                   calib_batch_size=args.calib_batch_size or (64 if dev.type == "cuda" else 16))
                ck = tuple(run.get(k, getattr(args, k)) for k in RUN_KEYS)
                if ck not in calibs:
                    calibs[ck] = load_calibration(tok, ck[2], n_calib=ck[0], seqlen=ck[1], seed=args.seed)
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.perf_counter()
                qr = pipeline.quantize(model, cfg, calibs[ck], device=dev, model_name=args.model, progress=False)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                row["quant_s"] = round(time.perf_counter() - t0, 2)
                row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None
                row["calibration"] = f"{ck[2]} {ck[0]}x{ck[1]}"
                row["config"] = cfg.to_dict()
                all_meta.append({"label": label, "group_size": g, **qr.metadata()})
                logging.info("%s g%s quantized in %.1f s", label, g, row["quant_s"])
            results[g][label] = evaluate(model, label, g)
            for ds, r in results[g][label].items():
                rows.append({**row, "dataset": ds, "protocol": r.protocol, "seqlen": r.seqlen, "ppl": r.ppl})
            del model
            write_outputs(out, args, dev, eval_dtype, specs, rows, results, all_evals, all_meta, final=False)

    md = write_outputs(out, args, dev, eval_dtype, specs, rows, results, all_evals, all_meta, final=True)
    sys.stdout.write(md)
    return 0


def write_outputs(out: Path, args, dev, eval_dtype, specs, rows, results, all_evals, all_meta, final: bool) -> str:
    """(Re)write the summary and results files; called after every run so a cut-off run keeps
    what it measured."""
    import pandas as pd

    labels = [s[0] for s in specs]
    baseline = args.baseline or ("rtn" if "rtn" in labels else labels[0])
    tables = []
    for g, res in results.items():
        if baseline in res:
            t = comparison_table(res, baseline=baseline)
            t["group_size"] = g
            tables.append(t)
    summary = pd.DataFrame(rows).drop(columns=["config"], errors="ignore")
    if tables:
        cmp = pd.concat(tables)
        summary = summary.merge(cmp[["group_size", "method", "dataset", "delta_pct", "ci_low", "ci_high", "winner"]],
                                on=["group_size", "method", "dataset"], how="left")
        base_t = summary[summary.method == baseline].groupby("group_size").quant_s.first()
        summary["time_vs_base"] = [q / base_t.get(g, float("nan")) if base_t.get(g) else float("nan")
                                   for q, g in zip(summary.quant_s, summary.group_size)]
    summary.to_csv(out / "summary.csv", index=False)
    prov = {"argv": sys.argv, "versions": versions(), "device": str(dev), "eval_dtype": str(eval_dtype),
            "baseline": baseline, "complete": final}
    (out / "results.json").write_text(json.dumps({"provenance": prov, "evals": all_evals}, indent=1))
    (out / "metadata.json").write_text(
        json.dumps(all_meta, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    md = [f"model {args.model}, W{args.bits}, calibration {args.calib_dataset} {args.n_calib}x{args.calib_seqlen} "
          f"(seed {args.seed}) unless the method says otherwise, eval seqlen {args.seqlen} (token ppl) / max length "
          f"{args.seqlen} (sample ppl, {args.n_samples} texts), device {dev}, eval dtype {eval_dtype}; "
          f"delta % vs {baseline} with paired bootstrap 95% CI; time_vs_base = quantization wall time / {baseline}'s"
          + ("" if final else " (INCOMPLETE: run cut off)"), "",
          summary.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else summary.to_string(index=False)]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return "\n".join(md) + "\n"


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
