"""Quality, wall time and peak memory of quantization methods on one model, over calibration seeds.

One call of `awqnb.compare.runner.run_comparison` per group size: for each calibration seed (`--seeds`,
default five: 42…46; `--seed` for one) and method, a fresh exact copy of the FP model (deep copy, buffers included)
is quantized (timed; peak GPU memory from torch.cuda.max_memory_allocated, reset per run) and
evaluated (cast to `--eval-dtype` on a GPU); methods that use no calibration (fp, rtn) run once.
Every method is compared with `--baseline` by `awqnb.analysis.stats` (the one verdict rule): delta % of the
mean over seeds of log(ppl / baseline ppl), a 95% interval combining a t interval over the seeds'
paired differences with the windows' shared sampling noise, and a verdict (better / worse / within
noise; 'cannot separate seeds' with fewer than 3 seeds). Five seeds by default: with three the
seed term's t quantile is 4.30 and only differences of about 3 seed sd are resolved. Writes `comparison_g<G>.json` (the tidy result with provenance and every
per-unit NLL), `results.json` (every evaluation, the format bench/seed_noise.py reads),
`metadata.json` (each awqnb quantization's α per layer, evidence, timings), `summary.csv` and
`summary.md` (mean ± sd over seeds per method and dataset, verdicts); rewritten after every run.

Method specs (`awqnb.compare.specs`, the one parser): a registered method name with its defaults and
the seeds' search (L2 salience, quantized propagation), `full_<method>`, `fp` (no quantization), `llmc_awq` / `llmc_gptq` (llm-compressor's AWQ and
GPTQ on the same calibration token ids: `pip install 'awqnb[reference]'`; absent or of another
version than 0.14.x they are skipped with the reason, the other methods still run), or a preset:
  awq_ref   awq as the reference tools run it: L1 salience, duo_scaling, clip, FP propagation.
A spec may carry overrides after '@': `robust_praq@n_calib=16`, `awq_sh@outlier_percent=1`,
`awq@salience=l1,n_grid=10` (calibration keys, SearchConfig and config fields, method parameters).

A run that does not fit one call can be split (by methods or by seeds, same other settings) and
the pieces merged: `--merge dirA,dirB --out dirAB [--baseline X]` reads their comparison JSON files
and writes the combined tables (verdicts then pair methods of different pieces).

Example (SmolLM2 g64, five calibration seeds (the default); see bench/README.md):
  python bench/quality.py --model smollm2-135m --group-sizes 64 --datasets wikitext2 \
      --methods fp,rtn,awq,awq_ref,awq_sh,awq_dh,awq_js,awq_gqa,praq,gptq,awq_gptq,llmc_awq,llmc_gptq \
      --baseline awq --device cuda:0
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.model.devices import resolve_device
from awqnb.model.loading import load_model
from awqnb.model.provenance import versions
from awqnb.compare import specs
from awqnb.compare.comparison import Comparison
from awqnb.compare.runner import CalibSpec, check_seeds, eval_sets, run_comparison
from awqnb.compare.specs import RUN_KEYS, MethodSpec  # noqa: F401 — RUN_KEYS: bench/determinism.py
from awqnb.analysis.stats import seeds_note

DEFAULT_SEEDS = "42,43,44,45,46"  # five: where the bench makes claims


def parse_spec(spec: str) -> tuple[str, str, dict, dict, dict]:
    """spec → (label, method, search overrides, method params, run overrides): the tuple
    bench/determinism.py reads, from the one parser `awqnb.compare.specs.parse_spec`."""
    p = specs.parse_spec(spec)
    return p.label, p.method, dict(p.search), dict(p.params), p.run


def build_specs(parsed, bits: int, g: int, args, dev) -> list[MethodSpec]:
    """ParsedSpecs → the runner's MethodSpecs at `bits`/`g`: the seeds' search (SearchConfig's
    defaults) and the spec's overrides; unknown parameters or bad values fail here."""
    return [p.build(QuantConfig(bits, g), SearchConfig(), None, args.seeds[0], dtype=args.dtype,
                    calib_batch_size=args.calib_batch_size or (64 if dev.type == "cuda" else 16)) for p in parsed]


from _common import run_dir, write_run_info  # noqa: E402 — bench/ is on sys.path when run as a script


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
    p.add_argument("--max-windows", type=int, default=None, help="token-ppl windows at most (c4: 256 unless given)")
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-dataset", default="wikitext2")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-dtype", default="bfloat16", help="dtype the quantized model is evaluated in on GPU")
    p.add_argument("--load-dtype", default="auto", help="storage dtype of the model (auto: the checkpoint's own)")
    p.add_argument("--dtype", default="auto", help="awqnb compute dtype of the search (auto: the model's own)")
    p.add_argument("--seeds", default=None,
                   help=f"calibration seeds, comma-separated (default {DEFAULT_SEEDS}; overrides --seed)")
    p.add_argument("--seed", type=int, default=None, help="one calibration seed instead of --seeds' default five")
    p.add_argument("--calib-batch-size", type=int, default=None,
                   help="calibration samples per forward (default 64 on GPU, 16 on CPU)")
    p.add_argument("--out", default=None, help="default: bench/results/quality/<date>_<device>_<model>/")
    p.add_argument("--also-vs", default="",
                   help="more baselines, comma-separated: verdicts.md has every method against each of them")
    p.add_argument("--merge", default=None,
                   help="comma-separated output directories of earlier runs (methods or seeds split over calls): "
                        "merge their comparison_g*.json and write the tables to --out; nothing is run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return _run(args)
    except AwqnbError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2


def _merge(args) -> int:
    by_g: dict = {}
    for d in [x for x in args.merge.split(",") if x]:
        files = sorted(Path(d).glob("comparison_g*.json"))
        if not files:
            raise AwqnbError(f"{d} holds no comparison_g*.json; pass output directories of bench/quality.py.")
        for f in files:
            c = Comparison.read(f)
            by_g.setdefault(c.provenance["group_size"], []).append(c)
    done = {g: Comparison.merge(*cs) for g, cs in by_g.items()}
    first = next(iter(done.values()))
    labels = list(dict.fromkeys(lb for c in done.values() for lb in c.labels))
    baseline = args.baseline or ("rtn" if "rtn" in labels else labels[0])
    if baseline not in labels:
        raise AwqnbError(f"--baseline {baseline!r} is not among the merged labels ({', '.join(labels)}).")
    prov = first.provenance
    cal = prov.get("calibration", {})
    args.model, args.bits = prov["model"], prov["bits"]
    args.calib_dataset, args.n_calib, args.calib_seqlen = cal.get("dataset"), cal.get("n_calib"), cal.get("seqlen")
    args.seeds = sorted({s for c in done.values() for s in c.seeds})
    ds = prov.get("datasets", [])
    args.seqlen = ds[0]["seqlen"] if ds else args.seqlen
    args.n_samples = next((d.get("n_texts") for d in ds if d["protocol"] == "sample"), args.n_samples)
    out = write_run_info(args.out or run_dir("quality", args.model, prov.get("device"), "merged"))
    md = write_outputs(out, args, prov.get("device"), prov.get("eval_dtype"), labels, baseline, done,
                       final=all(c.provenance.get("complete") for c in done.values()))
    sys.stdout.write(md)
    return 0


def _run(args) -> int:
    if args.merge:
        return _merge(args)
    if args.seeds is not None:
        try:
            args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError as e:
            raise AwqnbError(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 42,43,44.") from e
    else:
        args.seeds = [args.seed] if args.seed is not None else [int(x) for x in DEFAULT_SEEDS.split(",")]
    args.seeds = list(check_seeds(args.seeds))
    dev = resolve_device(args.device)
    eval_dtype = getattr(torch, args.eval_dtype) if dev.type == "cuda" else None
    out = write_run_info(args.out or run_dir("quality", args.model, dev), dev)
    parsed = specs.parse_specs(args.methods)
    labels = [p.label for p in parsed]
    baseline = args.baseline or ("rtn" if "rtn" in labels else labels[0])
    if baseline not in labels:
        raise AwqnbError(f"--baseline {baseline!r} is not among --methods ({', '.join(labels)}).")
    groups = [int(x) for x in args.group_sizes.split(",")]
    for g in groups:
        build_specs(parsed, args.bits, g, args, dev)  # unknown methods / parameters fail before loading anything
    fp_model, tok = load_model(args.model, tokenizer=args.tokenizer, dtype=args.load_dtype)
    datasets = [d for d in args.datasets.split(",") if d]
    token = [d for d in datasets if d in ("wikitext2", "c4")]
    sample = [d for d in datasets if d not in token]
    sets = eval_sets(tok, token, sample, seqlen=args.seqlen,
                     max_windows={"wikitext2": args.max_windows, "c4": args.max_windows or 256},
                     n_samples=args.n_samples, sample_max_length=args.seqlen, seed=args.seeds[0])
    for es in sets:
        logging.info("%s: %s", es.name, es.describe())
    done: dict = {}

    def save(comp, rec=None, final=False):
        done[comp.provenance["group_size"]] = comp
        write_outputs(out, args, dev, eval_dtype, labels, baseline, done, final=final)

    for g in groups:
        comp = run_comparison(fp_model, build_specs(parsed, args.bits, g, args, dev), tokenizer=tok, seeds=args.seeds,
                              calibration=CalibSpec(args.calib_dataset, args.n_calib, args.calib_seqlen),
                              datasets=sets, quant=QuantConfig(args.bits, g), device=dev, dtype=args.dtype,
                              eval_dtype=eval_dtype, model_name=args.model, progress=False, on_run=save)
        comp.provenance["argv"] = sys.argv
        done[g] = comp
    md = write_outputs(out, args, dev, eval_dtype, labels, baseline, done, final=True)
    sys.stdout.write(md)
    return 0


def _fmt(x, spec=".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_outputs(out: Path, args, dev, eval_dtype, labels, baseline, done: dict, final: bool) -> str:
    """(Re)write every output file from the comparisons so far; called after every run so a cut-off
    run keeps what it measured. Few files: the device returns at most 8."""
    import pandas as pd

    summaries, verdicts, evals, meta = [], [], [], []
    for g, comp in done.items():
        comp.to_json(out / f"comparison_g{g}.json")
        s = comp.summary()
        if not s.empty:
            s.insert(0, "group_size", g)
            summaries.append(s)
        ok = {r.label for r in comp.runs if r.status == "ok"}
        if baseline in ok and len(ok) > 1:
            v = comp.verdicts(baseline)
            v.insert(0, "group_size", g)
            verdicts.append(v)
        for r in comp.runs:
            for res in r.results.values():
                e = res.to_dict()
                e["meta"] = {**e["meta"], "method": r.label, "seed": r.seed, "shared_across_seeds": r.shared,
                             "group_size": g, "quant_s": r.quantize_s, "peak_mem_gb": r.peak_mem_gb}
                evals.append(e)
        for (label, seed), qr in comp.quant_results.items():
            meta.append({"label": label, "seed": seed, "group_size": g, **qr.metadata()})
    summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    verd = pd.concat(verdicts, ignore_index=True) if verdicts else pd.DataFrame()
    if not summary.empty and not verd.empty:
        summary = summary.merge(verd[["group_size", "label", "dataset", "delta_pct", "ci_low", "ci_high", "verdict"]],
                                on=["group_size", "label", "dataset"], how="left")
    summary.to_csv(out / "summary.csv", index=False)
    prov = {"argv": sys.argv, "versions": versions(), "device": str(dev), "eval_dtype": str(eval_dtype),
            "baseline": baseline, "seeds": args.seeds, "complete": final}
    (out / "results.json").write_text(json.dumps({"provenance": prov, "evals": evals}, indent=1))
    (out / "metadata.json").write_text(
        json.dumps(meta, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    ran = seeds_ran(args, done)
    n = len(ran)
    seeds_txt = ", ".join(map(str, ran)) + ("" if set(ran) == set(args.seeds) else
                                            f"; requested {', '.join(map(str, args.seeds))}")
    md = [f"model {args.model}, W{args.bits}, calibration {args.calib_dataset} {args.n_calib}x{args.calib_seqlen} "
          f"(seeds {seeds_txt}) unless the method says otherwise, eval seqlen {args.seqlen} "
          f"(token ppl) / max length {args.seqlen} (sample ppl, {args.n_samples} texts), device {dev}, eval dtype "
          f"{eval_dtype or 'the model’s'}. ppl: mean ± sd over {n} calibration seed{'s' if n > 1 else ''} "
          "(fp and rtn use no calibration: one run); delta % vs "
          f"{baseline}: 100 (exp(mean over seeds of log ppl ratio) − 1), 95% CI and verdict by awqnb.analysis.stats. "
          + seeds_note(n) + ("" if final else " (INCOMPLETE: run cut off)"), ""]
    md += ["| group | method | dataset | ppl mean ± sd | per seed | quantize s | peak GB | "
           f"delta % vs {baseline} [95% CI] | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary.to_dict("records"):
        ci = ("" if r.get("delta_pct") is None or (isinstance(r.get("delta_pct"), float) and math.isnan(r["delta_pct"]))
              else f"{r['delta_pct']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]")
        verdict = r.get("verdict") if isinstance(r.get("verdict"), str) else ("(baseline)" if r["label"] == baseline else "")
        md.append(f"| {r['group_size']} | {r['label']} | {r['dataset']} | {_fmt(r['ppl_mean'])} ± {_fmt(r['ppl_sd'])} | "
                  f"{r['per_seed']} | {_fmt(r['quantize_s'], '.1f')} | {_fmt(r['peak_mem_gb'], '.2f')} | {ci} | {verdict} |")
    skipped = {(g, k): v for g, c in done.items() for k, v in c.skipped.items()}
    if skipped:
        md += ["", "Skipped:"] + [f"- g{g} {k}: skipped — {v}" for (g, k), v in skipped.items()]
    text = "\n".join(md) + "\n"
    (out / "summary.md").write_text(text)
    if getattr(args, "also_vs", ""):
        (out / "verdicts.md").write_text(verdicts_md(args, baseline, done))
    return text


def seeds_ran(args, done: dict) -> list[int]:
    """The seeds that produced a calibrated run (a cut-off run may not reach every requested seed)."""
    return sorted({r.seed for c in done.values() for r in c.runs if not r.shared and r.status == "ok"}) or args.seeds


def verdicts_md(args, baseline, done: dict) -> str:
    """Every method against `baseline` and each --also-vs baseline that ran (`awqnb.analysis.stats`)."""
    bases = list(dict.fromkeys([baseline] + [b for b in args.also_vs.split(",") if b]))
    ran = seeds_ran(args, done)
    n = len(ran)
    md = [f"# {args.model} W{args.bits}, seeds {'/'.join(map(str, ran))}: every method against each baseline",
          "delta % = 100 (exp(mean over seeds of log(ppl / baseline ppl)) − 1); 95% CI and verdict by awqnb.analysis.stats "
          "(t interval over the seeds' paired differences combined with the windows' shared sampling noise). "
          + seeds_note(n)]
    for g, comp in done.items():
        ok = {r.label for r in comp.runs if r.status == "ok"}
        for b in bases:
            if b not in ok:
                md += ["", f"## g{g} vs {b}: did not run"]
                continue
            v = comp.verdicts(b)
            md += ["", f"## g{g} vs {b}", "", "| method | dataset | delta % | 95% CI | seeds | verdict |",
                   "|---|---|---|---|---|---|"]
            md += [f"| {r['label']} | {r['dataset']} | {r['delta_pct']:+.2f} | [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | "
                   f"{r['n_seeds']} | {r['verdict']} |" for r in v.to_dict("records")]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
