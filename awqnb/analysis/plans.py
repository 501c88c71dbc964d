"""Mixed-precision plans chosen from a sensitivity frame (`awqnb.analysis.sensitivity`), and their
cost–quality front:

  plan_from_sensitivity  a `Plan` keeping the most deserving (layer, family) pairs at more bits,
                         by a strategy (`STRATEGIES`) under a budget (k, avg_bits or max_linears)
  plan_avg_bits, plan_linears   what a plan costs
  pareto                 perplexity and KL on an evaluation slice against average bits, for plans
                         of several sizes by each strategy (one quantization, planned families
                         swapped in); the slice should be disjoint from the one the frame was ranked on
  sensitivity_record     what a report records of the frame and the front (both slices named)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch
from torch import nn

from awqnb.analysis.diagnostics import model_device
from awqnb.analysis.scales import scale_maps
from awqnb.analysis.sensitivity import (EvalSlice, check_frame, eval_windows, most_sensitive_layer, named_slice,
                                        provenance, rank, reference)
from awqnb.core.dtypes import parse_dtype
from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import fake_quant
from awqnb.core.progress import tqdm
from awqnb.model.arch import attn_shape, blocks, get_module, resolve_spec
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.plan import FP_BITS, Plan, plan_bits

PARETO_COLUMNS = ["strategy", "k", "avg_bits", "ppl", "kl", "n_linears", "plan"]
# strategy name → the order `_order` builds: 'only' KL; the 'except' rows' recovery; 'only' KL per
# parameter (the cost of a family in bits); relative output MSE; a seeded permutation
STRATEGIES = {"sensitivity": "kl", "kl": "kl", "recovery": "recovery", "density": "density", "mse": "mse",
              "random": "random"}


# --- the kept weights ----------------------------------------------------------------------

@torch.no_grad()
def keep_weight(model: nn.Module, result, bits: int, layer: int, name: str, dtype=torch.float32,
                device=None) -> torch.Tensor:
    """W_eff `[co, ci]` of one block linear kept at `bits` by a plan in the run `result`: the run's
    scales stay folded, the scaled weight is rounded to nearest at `bits` on the run's grid (what
    `pipeline.quantize` does to a planned family), mapped back to the FP basis:
    `diag(s_row) · Q_bits(diag(s_row)^-1 · W · diag(s_col)) · diag(s_col)^-1`; bits 16 → W itself.
    Computed in float32 on `device` (default the CPU), returned on the CPU in `dtype`."""
    spec = resolve_spec(model)
    cols, rows = scale_maps(result, layer, spec, attn_shape(model.config))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    w = get_module(blocks(model, spec)[layer], name).weight.data.detach().to(dev, torch.float32)
    if bits != FP_BITS:
        q = dataclasses.replace(result.config.quant, bits=bits)
        c = cols.get(name)
        r = rows.get(name)
        c = c.to(dev)[None, :] if c is not None else 1.0
        r = r.to(dev)[:, None] if r is not None else 1.0
        w = fake_quant(w * c / r, q) * r / c
    return w.to("cpu", dtype)


def keep_weights(model: nn.Module, result, bits: int, layers: Iterable[int] | None = None,
                 dtype=torch.float32, device=None) -> dict[int, dict[str, torch.Tensor]]:
    """`keep_weight` of every block linear of `layers` (default all): layer → linear → W_eff."""
    spec = resolve_spec(model)
    n = len(blocks(model, spec))
    return {j: {name: keep_weight(model, result, bits, j, name, dtype, device) for name in spec.linears}
            for j in (range(n) if layers is None else layers)}


# --- choosing a plan -----------------------------------------------------------------------

def _order(frame, by: str, seed: int) -> list[tuple[int, str]]:
    """Candidate (layer, family) pairs, most deserving of more bits first."""
    import numpy as np

    pairs = frame[["layer", "family"]].drop_duplicates()
    keys = [(int(l), str(f)) for l, f in zip(pairs["layer"], pairs["family"])]
    if by == "random":
        perm = np.random.default_rng(seed).permutation(len(keys))
        return [keys[i] for i in perm]
    if by == "mse":
        m = frame.drop_duplicates(["layer", "family"]).set_index(["layer", "family"])["mse"]
        if m.isna().any():
            raise AwqnbError("the frame has no MSE for some families; choose by='kl' or 'random'.")
        return [k for k, _ in sorted(((k, float(m[k])) for k in keys), key=lambda t: (-t[1], t[0]))]
    if by in ("kl", "recovery", "density"):
        # rank() says which mode a frame lacks; 'kl' falls back to the 'except' rows
        mode = "except" if by == "recovery" or (by == "kl" and not (frame["mode"] == "only").any()) else "only"
        r = rank(frame, "kl", mode)
        if by == "density":  # KL per parameter kept: the greedy order for a bits budget (stable: KL breaks ties)
            r = r.assign(d=r["kl"] / r["n_params"].clip(lower=1)).sort_values("d", ascending=False, kind="stable")
        return [(int(l), str(f)) for l, f in zip(r["layer"], r["family"])]
    raise AwqnbError(f"by={by!r} is unknown; use 'kl', 'recovery', 'density', 'mse' or 'random'.")


def plan_from_sensitivity(frame, *, k: int | None = None, avg_bits: float | None = None,
                          max_linears: int | None = None, keep_bits: int = 8, by: str = "kl", seed: int = 0,
                          base_bits: int = 4) -> Plan:
    """A mixed-precision plan keeping the most deserving families at `keep_bits` (8, or 16 = FP).

    by: 'kl' (end-to-end sensitivity: 'only' KL, or the 'except' rows' recovery when the frame has
    no 'only' rows), 'recovery' (the 'except' rows: how much keeping the family FP recovers in the
    quantized model), 'density' ('only' KL per parameter: the most KL for the bits spent), 'mse' (the
    family's relative output MSE) or 'random' (a permutation drawn with `seed`). The strategy names
    of `STRATEGIES` are accepted too. Budget, exactly one of:
      k            the top k (layer, family) pairs;
      avg_bits     the longest prefix of the order whose average bits stay ≤ avg_bits, where average
                   bits = Σ n_params · bits / Σ n_params over every (layer, family) of the frame (the
                   quantization candidates; lm_head and embeddings not counted), families outside
                   the plan at `base_bits`;
      max_linears  families taken in order, skipping one that would take the number of kept
                   linears above max_linears (a family has 1–3 linears: frame.attrs['family_linears']).
    """
    check_frame(frame)
    if sum(x is not None for x in (k, avg_bits, max_linears)) != 1:
        raise AwqnbError("give exactly one budget: k, avg_bits or max_linears.")
    if keep_bits not in plan_bits():
        raise AwqnbError(f"keep_bits={keep_bits} cannot be done by the quantizer; use one of {plan_bits()}.")
    by = STRATEGIES.get(by, by)
    order = _order(frame, by, seed)
    chosen: list[tuple[int, str]] = []
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise AwqnbError(f"k={k!r} must be a whole number ≥ 0.")
        if k > len(order):
            raise AwqnbError(f"k={k} is more than the frame's {len(order)} (layer, family) pairs.")
        chosen = order[:k]
    elif avg_bits is not None:
        n = frame.drop_duplicates(["layer", "family"]).set_index(["layer", "family"])["n_params"]
        tot = float(n.sum())
        if not avg_bits >= base_bits:
            raise AwqnbError(f"avg_bits={avg_bits} is below base_bits={base_bits}.")
        cur = base_bits * tot
        for key in order:
            nxt = cur + (keep_bits - base_bits) * float(n[key])
            if nxt / tot > avg_bits + 1e-12:
                break
            chosen.append(key)
            cur = nxt
    else:
        per = frame.attrs.get("family_linears") or {}
        if isinstance(max_linears, bool) or not isinstance(max_linears, int) or max_linears < 0:
            raise AwqnbError(f"max_linears={max_linears!r} must be a whole number ≥ 0.")
        used = 0
        for key in order:
            c = int(per.get(key[1], 1))
            if used + c <= max_linears:
                chosen.append(key)
                used += c
    note = f"top {len(chosen)} by {by}" + (f" (seed {seed})" if by == "random" else "") + f", kept at {keep_bits} bits"
    return Plan(tuple((l, f, keep_bits) for l, f in chosen), note)


def plan_avg_bits(frame, plan: Plan, base_bits: int = 4) -> float:
    """Average bits of `plan` over the frame's (layer, family) candidates, weighted by n_params."""
    n = frame.drop_duplicates(["layer", "family"])
    return plan.avg_bits({(int(l), str(f)): int(c) for l, f, c in zip(n["layer"], n["family"], n["n_params"])},
                         base_bits)


def plan_linears(frame, plan: Plan) -> int:
    """How many linears `plan` keeps (frame.attrs['family_linears'] per family; 1 when unknown)."""
    per = frame.attrs.get("family_linears") or {}
    return sum(int(per.get(f, 1)) for _, f, _ in plan.entries)


# --- Pareto ---------------------------------------------------------------------------------

def pareto(model: nn.Module, cfg: MethodConfig | None, calibration, eval_tokens: torch.Tensor, frame, *,
           ks=(0, 1, 2, 4, 8), keep_bits: int = 8, strategies=("sensitivity", "recovery", "mse", "random"),
           seed: int = 0,
           device=None, seqlen: int | None = None, n_windows: int | None = None, result=None, dtype="float32",
           batch_size: int = 8, max_linears: Iterable[int] = (), progress: bool = True, model_name: str | None = None,
           logit_rows: int = 2048, offload_activations: bool = False, slice_name: str | None = None):
    """Perplexity and KL on the slice against average bits, for plans of k families (and, with
    `max_linears`, of at most that many linears) chosen by each strategy from `frame` → DataFrame
    with columns strategy, k, avg_bits, ppl, kl, n_linears, plan (k = families kept; avg_bits as in
    `plan_from_sensitivity`; k = 0 is the quantized run itself).

    Fast approximation (attrs['approximation']): one quantization of the model with `cfg` (or
    `result`); a planned family gets `keep_weights` — the run's folded scales, rounded at
    `keep_bits` — swapped into the fully quantized model and only layers from the first planned
    one on are recomputed. A real `pipeline.quantize` with the plan differs in that later blocks
    are calibrated on the planned model's outputs (propagate='quantized'), so their AWQ scales may
    differ; bench/sensitivity.py measures real runs.

    The frame may have been ranked on other tokens than `eval_tokens` (it should: a slice disjoint
    from the one scored here, `awqnb.model.data.ranking_tokens`): attrs['rank_slice'] is the frame's
    provenance['eval'], attrs['score_slice'] this slice's (slice_name: it in words), and
    attrs['same_slice'] whether their token ids agree.
    """
    import pandas as pd

    check_frame(frame)
    prov = frame.attrs.get("provenance", {}).get("eval", {})
    seqlen = seqlen or prov.get("seqlen") or 512
    n_windows = n_windows or prov.get("n_windows") or 8
    windows = eval_windows(eval_tokens, seqlen, n_windows)
    if keep_bits not in plan_bits():
        raise AwqnbError(f"keep_bits={keep_bits} cannot be done by the quantizer; use one of {plan_bits()}.")
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise AwqnbError(f"strategies {bad} unknown; use {', '.join(STRATEGIES)}.")
    cdtype = parse_dtype(dtype) or torch.float32
    dev = model_device(model, device)
    ref = reference(model, cfg, calibration, device=dev, result=result, dtype=cdtype, model_name=model_name)
    base_bits = ref.result.config.quant.bits
    sl = EvalSlice(model, windows, ref, dev, cdtype, batch_size, offload_activations, logit_rows, progress)
    sl.prefixes(())
    sl.fp_distribution()
    kw: dict[tuple[int, str], torch.Tensor] = {}  # only the linears some plan keeps, formed on the device
    budgets = [("k", int(k)) for k in ks] + [("max_linears", int(m)) for m in max_linears]
    jobs = [(s, b) for s in strategies for b in budgets]
    rows = []
    for s, (kind, v) in tqdm(jobs, desc="pareto", disable=not progress):
        if kind == "k" and v > frame[["layer", "family"]].drop_duplicates().shape[0]:
            continue
        plan = plan_from_sensitivity(frame, **{kind: v}, keep_bits=keep_bits, by=s, seed=seed, base_bits=base_bits)
        w: dict[int, dict[str, torch.Tensor]] = {}
        for l, f, _ in plan.entries:
            for n in sl.fams[f]:
                if (l, n) not in kw:
                    kw[(l, n)] = keep_weight(model, ref.result, keep_bits, l, n, cdtype, dev)
                w.setdefault(l, {})[n] = kw[(l, n)]
        kl, ppl = sl.run_hybrid(w)
        rows.append({"strategy": s, "k": len(plan), "avg_bits": plan_avg_bits(frame, plan, base_bits), "ppl": ppl,
                     "kl": kl, "n_linears": plan_linears(frame, plan), "plan": plan.describe(),
                     "budget": f"{kind}={v}"})
    df = pd.DataFrame(rows, columns=PARETO_COLUMNS + ["budget"])
    prov = provenance(model, cfg, calibration, windows, dev, cdtype, model_name, ref.result)
    if slice_name is not None:
        prov = named_slice(prov, slice_name)
    ranked = dict(frame.attrs.get("provenance", {}).get("eval", {}))
    df.attrs.update({"rank_slice": ranked, "score_slice": prov["eval"],
                     "same_slice": ranked.get("tokens_sha1") == prov["eval"]["tokens_sha1"]})
    df.attrs.update({"fp_ppl": math.exp(sl.fp_nll), "keep_bits": keep_bits, "base_bits": base_bits, "seed": seed,
                     "approximation": "planned families swapped into one quantization (its scales, rounded at "
                                      "keep_bits); later blocks not re-calibrated",
                     "provenance": prov})
    return df


def sensitivity_record(frame, front, **extra) -> dict:
    """What a report records of a sensitivity frame and its Pareto front (metrics.json
    'sensitivity'): rank_slice (the slice the frame was ranked on, in words), score_slice (the one
    the plans were scored on), same_slice; fp_ppl / quant_ppl / quant_kl on the ranking slice (the
    frame's), score_fp_ppl / score_quant_ppl on the scoring slice (the front's FP and k = 0 rows);
    provenance of both, timings, and both frames as records; `extra` (method, config, windows,
    seqlen, seconds, ...) added as given."""
    def words(ev):
        return (ev or {}).get("slice")

    out = {**extra,
           "rank_slice": words(frame.attrs.get("provenance", {}).get("eval")),
           "score_slice": None if front is None else words(front.attrs.get("score_slice")),
           "same_slice": None if front is None else bool(front.attrs.get("same_slice")),
           "fp_ppl": frame.attrs.get("fp_ppl"), "quant_ppl": frame.attrs.get("quant_ppl"),
           "quant_kl": frame.attrs.get("quant_kl"), "most_sensitive_layer": most_sensitive_layer(frame),
           "provenance": frame.attrs.get("provenance"), "timings": frame.attrs.get("timings"),
           "frame": frame.to_dict("records")}
    if front is not None:
        k0 = front[front["k"] == 0]
        out.update(score_fp_ppl=front.attrs.get("fp_ppl"),
                   score_quant_ppl=float(k0["ppl"].iloc[0]) if len(k0) else None,
                   score_provenance=front.attrs.get("provenance"),
                   pareto_approximation=front.attrs.get("approximation"), pareto=front.to_dict("records"))
    return out
