"""Is quantization run-to-run deterministic, and does it amplify tiny numeric differences?

For each method spec in --methods (quality.py's syntax: a registered method, the `awq_ref` preset,
overrides after '@' such as `awq@alpha_select=smooth`), on one device:

  1. quantize two fresh deep copies of the FP model with the same calibration set and seed (runs A
     and B) and compare them: sha256 of all weights, per-block hashes (the first block that
     differs), the chosen α per (layer, scale group);
  2. for the scale-searching methods, the near-tie margins of run A's α search: per layer and
     group, on the curve α is chosen from (the losses for 'argmin', their 3-point moving average
     for 'smooth'; both are reported whatever the config chose), the relative gap
     (L2 − L1) / L1 between the chosen α and the runner-up at another α, and how far apart those α
     are; also the gap to the best α at least two grid steps away (a "far" tie: a last-bit change
     there moves α a long way). Groups with gap < 1e-3 and < 1e-2 are counted;
  3. with --perturb: a run P whose calibration hidden states at block 0 are multiplied elementwise
     by (1 + eps·N(0,1)) (eps 1e-6, in float32, noise from a CPU generator with --perturb-seed; a
     forward hook on the input embeddings, only while P is calibrated), then how many α choices
     change against A (and how many of those were near ties in A), and the WikiText-2 perplexity
     of A and P (GPTQ token protocol, --seqlen 2048, --max-windows) with a paired bootstrap 95% CI.
     A 1e-6 relative change is below bfloat16's resolution: the report says what fraction of the
     embedding outputs the perturbation actually changed; use --load-dtype float32 --dtype float32.

Writes `determinism.json` (provenance, per-run hashes and timings, per-group margins, α changes,
perplexities) and `determinism.md` to --out. Imports only torch, transformers, pandas, numpy and awqnb.

GPU (the issue-15 settings; the bf16 run is what bench/quality.py does by default):
  python bench/determinism.py --model smollm2-135m --device cuda
  python bench/determinism.py --model smollm2-135m --device cuda --load-dtype float32 --dtype float32 \\
      --methods awq,awq@alpha_select=smooth,awq_ref,awq_dh --perturb
CPU smoke run:
  python bench/determinism.py --model tiny-random-llama --device cpu --n-calib 4 --calib-seqlen 64 \\
      --methods awq,gptq --perturb --seqlen 128 --max-windows 4 --out /tmp/det
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py's method specs

TIE_THRESHOLDS = (1e-3, 1e-2)


# --- hashes -----------------------------------------------------------------------------------

def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return bytes(t.reshape(-1).view(torch.uint8).numpy())


def _sha(items) -> str:
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_raw(t))
    return h.hexdigest()


def weights_sha256(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, raw bytes), in name order."""
    return _sha(sorted(model.state_dict().items()))


def block_hashes(model) -> list[str]:
    """sha256 of each decoder block's state (parameters and buffers), in block order."""
    from awqnb.model.arch import blocks, resolve_spec

    return [_sha(sorted(b.state_dict().items())) for b in blocks(model, resolve_spec(model))]


def differing_tensors(m1, m2, limit: int = 8) -> list[dict]:
    """The first `limit` tensors (state-dict order) that are not bit-identical, with max |Δ|."""
    s1, s2 = m1.state_dict(), m2.state_dict()
    out = []
    for k in s1:
        a, b = s1[k], s2[k]
        if a.dtype != b.dtype or a.shape != b.shape or _raw(a) != _raw(b):
            d = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else float("nan")
            out.append({"tensor": k, "max_abs_diff": d})
            if len(out) >= limit:
                break
    return out


# --- α choices and near ties --------------------------------------------------------------------

def alpha_choices(res) -> dict[str, float]:
    """'layer.group' → chosen α."""
    return {f"{li}.{g}": a for li, gr in res.alphas().items() for g, a in gr.items()}


def margin_row(alphas: list[float], losses: list[float], how: str) -> dict:
    """Near-tie margin of one group's α choice on the curve `how` selects from."""
    from awqnb.quant.methods.awq import select_alpha, selection_curve

    curve = selection_curve(losses, how)
    i = select_alpha(losses, how)
    row = {"chosen_alpha": None, "second_alpha": None, "gap_rel": math.nan, "d_alpha": math.nan,
           "far_alpha": None, "far_gap_rel": math.nan, "far_d_alpha": math.nan}
    if i is None:
        return row
    best = curve[i]
    row["chosen_alpha"] = alphas[i]

    def runner_up(ok):
        js = [j for j in range(len(curve)) if ok(j) and math.isfinite(curve[j])]
        if not js:
            return None, math.nan
        j = min(js, key=lambda j: (curve[j], j))
        return j, (curve[j] - best) / best if best > 0 else (0.0 if curve[j] == best else math.inf)

    j, gap = runner_up(lambda j: j != i)
    if j is not None:
        row.update(second_alpha=alphas[j], gap_rel=gap, d_alpha=abs(alphas[j] - alphas[i]))
    j, gap = runner_up(lambda j: abs(j - i) >= 2)
    if j is not None:
        row.update(far_alpha=alphas[j], far_gap_rel=gap, far_d_alpha=abs(alphas[j] - alphas[i]))
    return row


def margins(res) -> list[dict]:
    """One row per (layer, group, selection rule): the margins of `margin_row`, and loss/RTN."""
    from awqnb.core.config import ALPHA_SELECT

    rows = []
    for r in res.layers:
        for g, gs in r.groups.items():
            rtn = gs.losses[0]
            for how in ALPHA_SELECT:
                rows.append({"layer": r.index, "group": g, "select": how,
                             "used": how == res.config.search.alpha_select,
                             "chosen_loss_rel_rtn": gs.best_loss / rtn if rtn > 0 else math.nan,
                             **margin_row(gs.alphas, gs.losses, how)})
    return rows


def margin_summary(rows: list[dict]) -> dict:
    """Per selection rule: groups, and how many have gap (next / far) below each threshold."""
    out = {}
    for how in sorted({r["select"] for r in rows}):
        sub = [r for r in rows if r["select"] == how]
        d = {"groups": len(sub)}
        for t in TIE_THRESHOLDS:
            d[f"gap_lt_{t:g}"] = sum(1 for r in sub if r["gap_rel"] < t)
            d[f"far_gap_lt_{t:g}"] = sum(1 for r in sub if r["far_gap_rel"] < t)
        gaps = sorted(r["far_gap_rel"] for r in sub if math.isfinite(r["far_gap_rel"]))
        d["far_gap_min"] = gaps[0] if gaps else math.nan
        d["far_gap_median"] = gaps[len(gaps) // 2] if gaps else math.nan
        out[how] = d
    return out


# --- the perturbation ---------------------------------------------------------------------------

@contextlib.contextmanager
def perturbed_embeddings(model, eps: float, seed: int):
    """While inside: the input embeddings' output x becomes x·(1 + eps·n), n ~ N(0,1) elementwise
    (float32 product, cast back to x's dtype; n from a CPU generator, so the same on every device).
    Yields a dict counting the elements seen and those the perturbation actually changed."""
    gen = torch.Generator().manual_seed(seed)
    stats = {"elements": 0, "changed": 0, "calls": 0}

    def hook(_mod, _inp, out):
        n = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device)
        new = (out.float() * (1 + eps * n)).to(out.dtype)
        stats["elements"] += out.numel()
        stats["changed"] += int((new != out).sum())
        stats["calls"] += 1
        return new

    h = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield stats
    finally:
        h.remove()


# --- one run --------------------------------------------------------------------------------------

def quantize_once(fp_model, cfg, calib, dev, model_name: str, perturb: tuple[float, int] | None = None):
    """(quantized copy, QuantResult, seconds, deterministic-mode warnings, perturbation stats)."""
    from awqnb.quant import pipeline

    model = copy.deepcopy(fp_model)  # a fresh exact copy, buffers included
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(dev)
    stats = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        with (perturbed_embeddings(model, *perturb) if perturb else contextlib.nullcontext()) as stats:
            res = pipeline.quantize(model, cfg, calib, device=dev, model_name=model_name, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        secs = time.perf_counter() - t0
    det = sorted({str(w.message)[:300] for w in caught if "deterministic" in str(w.message)})
    return model, res, secs, det, stats


def evaluate(model, tokens, args, dev, eval_dtype):
    from awqnb.analysis.evaluate import token_perplexity
    from awqnb.model.devices import cast_parameters

    m = copy.deepcopy(model)
    cast_parameters(m.to(dev), eval_dtype)
    r = token_perplexity(m, tokens, seqlen=args.seqlen, max_windows=args.max_windows, device=dev,
                         dataset="wikitext2", batch_size=8 if dev.type == "cuda" else 1, progress=False)
    del m
    return r


# --- main ---------------------------------------------------------------------------------------

from _common import run_dir, write_run_info  # noqa: E402 — bench/ is on sys.path when run as a script


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="all",
                   help="comma-separated quality.py method specs; 'all' = every registered method and awq_ref")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-dataset", default="wikitext2")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto")
    p.add_argument("--load-dtype", default="auto", help="storage dtype of the model (auto: the checkpoint's own)")
    p.add_argument("--dtype", default="auto", help="awqnb compute dtype of the search (auto: the model's own)")
    p.add_argument("--eval-dtype", default="bfloat16", help="dtype the quantized model is evaluated in on GPU")
    p.add_argument("--calib-batch-size", type=int, default=None, help="default 64 on GPU, 16 on CPU (as quality.py)")
    p.add_argument("--runs", type=int, default=2, help="same-seed runs per method (>= 2)")
    p.add_argument("--perturb", action="store_true", help="also run P (perturbed calibration) and evaluate A and P")
    p.add_argument("--perturb-eps", type=float, default=1e-6)
    p.add_argument("--perturb-seed", type=int, default=0)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True, warn_only=True) and CUBLAS_WORKSPACE_CONFIG=:4096:8; "
                        "the warnings name the ops without a deterministic kernel")
    p.add_argument("--out", default=None, help="default: bench/results/determinism/<date>_<device>_<model>/")
    args = p.parse_args(argv)
    if args.runs < 2:
        p.error("--runs must be at least 2 (a run is compared with the first)")
    if args.perturb_eps <= 0:
        p.error("--perturb-eps must be positive")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from awqnb.quant.method_config import MethodConfig
    from awqnb.core.config import QuantConfig, SearchConfig
    from awqnb.model.data import load_calibration, load_eval_tokens
    from awqnb.core.errors import AwqnbError
    from awqnb.analysis.evaluate import bootstrap_delta
    from awqnb.quant.methods import REGISTRY, get_method
    from awqnb.model.devices import resolve_device
    from awqnb.model.loading import load_model
    from awqnb.model.provenance import versions
    from quality import RUN_KEYS, parse_spec

    dev = resolve_device(args.device)
    eval_dtype = getattr(torch, args.eval_dtype) if dev.type == "cuda" else torch.float32
    out = write_run_info(args.out or run_dir("determinism", args.model, dev), dev)
    names = [n for s in args.methods.split(",") if s
             for n in ((["awq_ref"] + sorted(REGISTRY)) if s == "all" else [s])]
    specs = [parse_spec(s) for s in names]
    for s in specs:
        if s[1] == "fp":
            p.error("'fp' is not a quantization method; leave it out of --methods")
        try:
            get_method(s[1])  # an unknown name fails here, before the model loads
            SearchConfig(**s[2])
        except AwqnbError as e:
            p.error(f"{s[0]}: {e}")
    fp_model, tok = load_model(args.model, dtype=args.load_dtype)
    fp_sha = weights_sha256(fp_model)
    tokens = load_eval_tokens(tok, "wikitext2") if args.perturb else None
    calibs: dict = {}
    prov = {"argv": sys.argv, "versions": versions(), "device": str(dev), "model": args.model,
            "bits": args.bits, "group_size": args.group_size, "seed": args.seed,
            "load_dtype": args.load_dtype, "dtype": args.dtype, "eval_dtype": str(eval_dtype),
            "model_param_dtype": str(next(fp_model.parameters()).dtype),
            "perturb": {"eps": args.perturb_eps, "seed": args.perturb_seed, "where": "input embeddings' output, "
                        "x * (1 + eps * N(0,1)) in float32, cast back"} if args.perturb else None,
            "torch_flags": {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                            "matmul_bf16_reduced_precision_reduction":
                                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
                            "float32_matmul_precision": torch.get_float32_matmul_precision(),
                            "num_threads": torch.get_num_threads()}}
    results = []
    for label, method, search, params, run in specs:
        cfg = MethodConfig(method=method, quant=QuantConfig(args.bits, args.group_size), search=SearchConfig(**search),
                           params=params, seed=args.seed, dtype=args.dtype,
                           calib_batch_size=args.calib_batch_size or (64 if dev.type == "cuda" else 16))
        ck = tuple(run.get(k, getattr(args, k)) for k in RUN_KEYS)
        if ck not in calibs:
            calibs[ck] = load_calibration(tok, ck[2], n_calib=ck[0], seqlen=ck[1], seed=args.seed)
        calib = calibs[ck]
        entry = {"label": label, "config": cfg.to_dict(), "calibration": f"{ck[2]} {ck[0]}x{ck[1]}", "runs": []}
        first = first_res = None
        for k in range(args.runs):
            model, res, secs, det, _ = quantize_once(fp_model, cfg, calib, dev, args.model)
            rec = {"run": chr(ord("A") + k), "sha256": weights_sha256(model), "quant_s": round(secs, 3),
                   "alpha": alpha_choices(res), "deterministic_warnings": det}
            if k == 0:
                first, first_res = model, res
                rec["block_sha256"] = block_hashes(model)
                rec["quantized_differs_from_fp"] = rec["sha256"] != fp_sha
            else:
                bh = block_hashes(model)
                same = rec["sha256"] == entry["runs"][0]["sha256"]
                rec["identical_to_A"] = same
                if not same:
                    a0 = entry["runs"][0]
                    rec["first_block_differing"] = next((i for i, (x, y) in enumerate(zip(a0["block_sha256"], bh))
                                                         if x != y), None)
                    rec["differing_tensors"] = differing_tensors(first, model)
                    rec["alpha_changes"] = {g: [a0["alpha"][g], a] for g, a in rec["alpha"].items()
                                            if a0["alpha"].get(g) != a}
                    rec["model"] = model  # evaluated below with --perturb, then dropped
                else:
                    del model
            entry["runs"].append(rec)
            logging.info("%s run %s: %.1f s, sha256 %s%s", label, rec["run"], secs, rec["sha256"][:16],
                         "" if k == 0 else (" identical to A" if rec["identical_to_A"] else " DIFFERS from A"))
        entry["identical"] = all(r.get("identical_to_A", True) for r in entry["runs"])
        if first_res.layers and first_res.layers[0].groups:
            entry["margins"] = margins(first_res)
            entry["margin_summary"] = margin_summary(entry["margins"])
        if args.perturb:
            pm, pres, secs, det, stats = quantize_once(fp_model, cfg, calib, dev, args.model,
                                                       perturb=(args.perturb_eps, args.perturb_seed))
            a_alpha = entry["runs"][0]["alpha"]
            p_alpha = alpha_choices(pres)
            changed = {g: [a_alpha[g], a] for g, a in p_alpha.items() if a_alpha.get(g) != a}
            used = {f"{m['layer']}.{m['group']}": m for m in entry.get("margins", []) if m["used"]}
            pert = {"sha256": weights_sha256(pm), "quant_s": round(secs, 3), "embedding_stats": stats,
                    "changed_frac": stats["changed"] / max(stats["elements"], 1),
                    "alpha_changes": changed, "n_alpha_changes": len(changed), "n_groups": len(p_alpha),
                    "first_changed_layer": min((int(g.split(".")[0]) for g in changed), default=None)}
            pert["identical_to_A"] = pert["sha256"] == entry["runs"][0]["sha256"]
            for t in TIE_THRESHOLDS:  # were the groups that moved near ties in A?
                pert[f"changes_with_A_gap_lt_{t:g}"] = sum(1 for g in changed if used.get(g, {}).get("gap_rel", 1) < t)
                pert[f"changes_with_A_far_gap_lt_{t:g}"] = sum(1 for g in changed
                                                              if used.get(g, {}).get("far_gap_rel", 1) < t)
            ev = {"A": evaluate(first, tokens, args, dev, eval_dtype), "P": evaluate(pm, tokens, args, dev, eval_dtype)}
            for r in entry["runs"][1:]:
                if "model" in r:
                    ev[r["run"]] = evaluate(r["model"], tokens, args, dev, eval_dtype)
            pert["ppl"] = {k: v.ppl for k, v in ev.items()}
            d, lo, hi = bootstrap_delta(ev["P"], ev["A"])
            pert["P_vs_A_delta_pct"], pert["P_vs_A_ci"] = d, [lo, hi]
            pert["eval"] = {"dataset": "wikitext2", "protocol": ev["A"].protocol, "seqlen": args.seqlen,
                            "windows": ev["A"].n_units}
            entry["perturb"] = pert
            logging.info("%s perturbed: %d of %d α changed, ppl A %.4f P %.4f (%+.3f%%)", label, len(changed),
                         len(p_alpha), ev["A"].ppl, ev["P"].ppl, d)
            del pm, pres, ev
        for r in entry["runs"]:
            r.pop("model", None)
        del first, first_res
        results.append(entry)
        write_outputs(out, prov, results, final=False)
    md = write_outputs(out, prov, results, final=True)
    sys.stdout.write(md)
    return 0


def _fmt(x, spec=".3g"):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_outputs(out: Path, prov: dict, results: list[dict], final: bool) -> str:
    """(Re)write determinism.json and determinism.md; called after every method so a cut-off run keeps
    what it measured."""
    (out / "determinism.json").write_text(json.dumps({"provenance": {**prov, "complete": final}, "methods": results},
                                                     indent=1, default=str))
    p = prov
    md = [f"# Determinism: {p['model']}, W{p['bits']} g{p['group_size']}, seed {p['seed']}, device {p['device']}"
          + ("" if final else " (INCOMPLETE: run cut off)"), "",
          f"model parameters {p['model_param_dtype']}, compute dtype {p['dtype']}, eval dtype {p['eval_dtype']}; "
          f"torch {p['versions'].get('torch')}, {p['versions'].get('gpu') or 'no GPU'}; "
          f"deterministic algorithms {p['torch_flags']['deterministic_algorithms']}.", "",
          "## Same seed, same device", "",
          "| method | runs | bit-identical | sha256 (A) | first differing block | α changed vs A | quant s (A) |",
          "|---|---|---|---|---|---|---|"]
    for e in results:
        other = e["runs"][1:]
        first_block = ", ".join(str(r.get("first_block_differing")) for r in other if not r["identical_to_A"])
        n_alpha = ", ".join(str(len(r.get("alpha_changes", {}))) for r in other if not r["identical_to_A"])
        md.append(f"| {e['label']} | {len(e['runs'])} | {'yes' if e['identical'] else '**no**'} | "
                  f"{e['runs'][0]['sha256'][:16]} | {first_block} | {n_alpha} | {e['runs'][0]['quant_s']} |")
    warned = sorted({w for e in results for r in e["runs"] for w in r["deterministic_warnings"]})
    if warned:
        md += ["", "Ops without a deterministic implementation (torch warnings):", ""] + [f"- {w}" for w in warned]
    with_m = [e for e in results if "margin_summary" in e]
    if with_m:
        t1, t2 = (f"{t:g}" for t in TIE_THRESHOLDS)
        md += ["", "## Near ties in the α search (run A)", "",
               "gap = (L₂ − L₁)/L₁ between the chosen α and the runner-up on the curve the rule selects from; "
               "far = the best α at least two grid steps away. ('used' marks the rule the config chose.)", "",
               f"| method | rule | groups | gap < {t1} | gap < {t2} | far gap < {t1} | far gap < {t2} | "
               "min far gap | median far gap |", "|---|---|---|---|---|---|---|---|---|"]
        for e in with_m:
            used = e["config"]["search"].get("alpha_select", "argmin")
            for how, s in e["margin_summary"].items():
                md.append(f"| {e['label']} | {how}{' (used)' if how == used else ''} | {s['groups']} | "
                          f"{s[f'gap_lt_{t1}']} | {s[f'gap_lt_{t2}']} | {s[f'far_gap_lt_{t1}']} | "
                          f"{s[f'far_gap_lt_{t2}']} | {_fmt(s['far_gap_min'])} | {_fmt(s['far_gap_median'])} |")
        md += ["", "Tightest far ties (used rule):", "", "| method | layer | group | α | far α | far gap | loss/RTN |",
               "|---|---|---|---|---|---|---|"]
        for e in with_m:
            rows = sorted((m for m in e["margins"] if m["used"] and math.isfinite(m["far_gap_rel"])),
                          key=lambda m: m["far_gap_rel"])[:3]
            for m in rows:
                md.append(f"| {e['label']} | {m['layer']} | {m['group']} | {m['chosen_alpha']:g} | {m['far_alpha']:g} | "
                          f"{_fmt(m['far_gap_rel'])} | {_fmt(m['chosen_loss_rel_rtn'])} |")
    with_p = [e for e in results if "perturb" in e]
    if with_p:
        pe = prov["perturb"]
        t1, t2 = (f"{t:g}" for t in TIE_THRESHOLDS)
        md += ["", f"## Perturbed calibration (×(1 + {pe['eps']:g}·N(0,1)) at the embedding output, seed {pe['seed']})", "",
               "| method | elements changed | α changed | of them A gap < " + t2 + " | A far gap < " + t2
               + " | first changed layer | ppl A | ppl P | P vs A % [95% CI] | windows |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for e in with_p:
            q = e["perturb"]
            # methods without calibration never call the hook
            frac = f"{q['changed_frac']:.3f}" if q["embedding_stats"]["elements"] else "no calibration"
            md.append(f"| {e['label']} | {frac} | {q['n_alpha_changes']} / {q['n_groups']} | "
                      f"{q[f'changes_with_A_gap_lt_{t2}']} | {q[f'changes_with_A_far_gap_lt_{t2}']} | "
                      f"{_fmt(q['first_changed_layer'], 'd')} | {q['ppl']['A']:.4f} | {q['ppl']['P']:.4f} | "
                      f"{q['P_vs_A_delta_pct']:+.3f} [{q['P_vs_A_ci'][0]:+.3f}, {q['P_vs_A_ci'][1]:+.3f}] | "
                      f"{q['eval']['windows']} |")
        if any(e["perturb"]["embedding_stats"]["elements"] and e["perturb"]["changed_frac"] < 0.5 for e in with_p):
            md += ["", f"The perturbation changed under half of the embedding outputs: {pe['eps']:g} is below the "
                   f"resolution of {prov['model_param_dtype']}; use --load-dtype float32 --dtype float32."]
    text = "\n".join(md) + "\n"
    (out / "determinism.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
