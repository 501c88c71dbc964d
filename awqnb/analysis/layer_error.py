"""How far a quantized layer is from the FP one, per (layer, module[, method]):

  rounding_error  weight residuals r = W − Q(W) (round-to-nearest) and W − W_eff (a method's
                  quantized model): ‖r‖/‖W‖, |r| quantiles, grid step, flips; or per input channel
  channel_error   per input channel: its share of the output error (with a salience frame)
  layer_mse       per (method, layer, module): output MSE of the linear on FP calibration inputs
  relative_mse, worst_layers   reading a layer_mse frame

Notation as in `awqnb.analysis.diagnostics`.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from awqnb.analysis.diagnostics import check_layers, forward_pass, limit_calibration, model_device, model_label
from awqnb.analysis.scales import effective_weights, layer_record, scales_fingerprint
from awqnb.analysis.statcache import cached_or_compute, calibration_key, resolve_cache, weights_fingerprint
from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import compute_qparams, dequantize, expand_groups, quantize
from awqnb.model.arch import SPECS, blocks, get_module, resolve_spec
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.methods.rounding import even_positions
from awqnb.quant.pipeline import quantize as _quantize

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _quant(cfg) -> QuantConfig:
    if isinstance(cfg, MethodConfig):
        return cfg.quant
    if isinstance(cfg, QuantConfig):
        return cfg
    raise AwqnbError(f"expected a QuantConfig or MethodConfig, got {type(cfg).__name__}.")


def _residual_stats(w: torch.Tensor, r: torch.Tensor, step: torch.Tensor | None) -> dict:
    a = r.abs().reshape(-1).float()
    n = a.numel()
    k = min(n, 1 << 20)
    sample = a if n <= k else a[even_positions(n, k, a.device)]
    qs = torch.quantile(sample, torch.tensor(QUANTILES, device=a.device)).tolist()
    d = {"rel_err": float(r.double().norm() / w.double().norm().clamp(min=1e-30)),
         "mse": float(r.double().pow(2).mean()), "mean_abs": float(a.double().mean()), "max_abs": float(a.max())}
    d.update({f"abs_q{int(q * 100):02d}": v for q, v in zip(QUANTILES, qs)})
    if step is not None:
        d.update(step_mean=float(step.double().mean()), step_max=float(step.max()),
                 r_over_step_max=float((r.abs() / step.clamp(min=1e-30)).max()))
    return d


def _evidence_columns(evidence: dict, name: str) -> dict:
    out = {}
    fl = (evidence or {}).get("flip", {}).get(name)
    if fl:
        out.update(flips=fl.get("flips"), flip_frac=fl.get("flip_frac"), outlier_frac=fl.get("outlier_frac"),
                   e_before_mean=fl.get("e_before", {}).get("mean"), e_after_mean=fl.get("e_after", {}).get("mean"),
                   e_before_max=fl.get("e_before", {}).get("max"), e_after_max=fl.get("e_after", {}).get("max"))
    gq = (evidence or {}).get("gqa")
    if gq and name.endswith("q_proj"):
        out.update(score_err_before=float(sum(gq["score_err_before"])),
                   score_err_after=float(sum(gq["score_err_after"])),
                   score_rel_improvement=gq.get("rel_improvement"), gqa_flips=int(sum(gq.get("flips", []))))
    return out


@torch.no_grad()
def rounding_error(model: nn.Module, cfg, layers=None, result=None, quantized: nn.Module | None = None,
                   level: str = "module", model_name: str | None = None, device=None, label: str | None = None,
                   include_rtn: bool = True):
    """Weight residuals of round-to-nearest and, when given, of a method's quantized model.

    level 'module' → one row per (layer, module, method):
      method 'rtn': r = W − Q(W) on `cfg`'s grid; rel_err = ‖r‖_F / ‖W‖_F, mse = mean r²,
        mean_abs, max_abs, abs_q05 … abs_q95 (quantiles of |r|), step_mean / step_max (grid
        step Δ), r_over_step_max (≤ 0.5 for a min–max grid).
      method = result.method (needs `quantized` and `result`): r = W − W_eff with
        `effective_weights` (scaling, clipping, flips all included), same columns, plus the
        method's evidence from `result.layers[i].evidence`: flips, flip_frac, outlier_frac,
        e_before/after_mean/max (expected row error before/after the flips), and on q_proj the
        ReFlip attention-score error before/after (score_err_before/after, score_rel_improvement).
    level 'channel' → one row per (layer, module, method, input channel j): mean_abs_j =
      mean_i |r_ij|, sq_sum_j = Σ_i r_ij² (with E[x_j²] this is channel j's share of the output
      error, `diagnostics` docstring), w_absmax_j = max_i |W_ij|.
    Needs no calibration data. `cfg`: QuantConfig or MethodConfig. label: the method column of
    the quantized model's rows (default result.method); include_rtn=False leaves out the 'rtn' rows.
    """
    import pandas as pd

    if level not in ("module", "channel"):
        raise AwqnbError(f"level={level!r} is unknown; use 'module' or 'channel'.")
    q = _quant(cfg)
    layers = check_layers(model, layers, model_name)
    spec = resolve_spec(model)
    bl = blocks(model, spec)
    if (quantized is None) != (result is None):
        raise AwqnbError("pass both quantized= (the quantized model) and result= (its QuantResult), or neither.")
    rows = []
    for l in layers:
        # layers the result did not quantize (e.g. quantize_layer's other blocks) get no method rows
        eff = effective_weights(quantized, result, l, device) if layer_record(result, l) is not None else {}
        for name in spec.linears:
            w = get_module(bl[l], name).weight.data
            dev = torch.device(device) if device is not None else w.device
            w = w.to(dev).float()
            scale, zero = compute_qparams(w, q)
            w_hat = dequantize(quantize(w, scale, zero, q), scale, zero, q)
            step = expand_groups(scale, w.shape[1], q.group_size)
            variants = [("rtn", w - w_hat, step, {})] if include_rtn else []
            if name in eff:
                rec = layer_record(result, l)
                variants.append((label or result.method, w - eff[name].to(dev), None,
                                 _evidence_columns(rec.evidence if rec is not None else {}, name)))
            for method, r, st, ev in variants:
                base = {"layer": l, "module": name.rsplit(".", 1)[-1], "linear": name, "method": method}
                if level == "module":
                    rows.append({**base, "co": w.shape[0], "ci": w.shape[1], **_residual_stats(w, r, st), **ev})
                else:
                    rows.append(pd.DataFrame({**base, "channel": range(w.shape[1]),
                                              "mean_abs": r.abs().mean(0).cpu().numpy(),
                                              "sq_sum": r.double().pow(2).sum(0).cpu().numpy(),
                                              "w_absmax": w.abs().amax(0).cpu().numpy()}))
    if level == "module":
        return pd.DataFrame(rows)
    return pd.concat(rows, ignore_index=True)


def channel_error(channels, salience, spec_model: nn.Module):
    """Where the output error comes from, channel by channel: a `rounding_error(level='channel')`
    frame joined with a `salience_table` frame of the same layers, adding per (layer, module,
    method, input channel j)
      ex2_j       E_t[x_tj²] of the linear's FP input (its scale group's input point)
      out_err_j   = ex2_j · Σ_i r_ij²   channel j's contribution to Σ_t ‖r x_t‖² / n_tok (exact when
                  the input channels are uncorrelated; the cross terms are left out)
      err_share_j = out_err_j / Σ_j out_err_j within (layer, module, method)
      l2_rank_j   rank of channel j by l2 salience within the layer's group (0 = most salient)
    `spec_model`: the model (its ArchSpec maps each linear to its scale group)."""
    spec = resolve_spec(spec_model)
    group_of = {name: g.name for g in spec.groups for name in g.layers}
    sal = salience[["layer", "group", "channel", "ex2", "l2"]].copy()
    sal["l2_rank"] = sal.groupby(["layer", "group"])["l2"].rank(ascending=False, method="first").astype(int) - 1
    out = channels.assign(group=channels["linear"].map(group_of))
    out = out.merge(sal.drop(columns="l2"), on=["layer", "group", "channel"], how="left")
    out["out_err"] = out["ex2"] * out["sq_sum"]
    out["err_share"] = out["out_err"] / out.groupby(["layer", "module", "method"])["out_err"].transform("sum")
    return out


# --- layer output MSE -----------------------------------------------------------------------

def _prepare_quantized(model, spec_or_pair, device, label):
    """One entry of layer_mse's `quantized`: (qmodel, result) for a pair, (None, cfg) for a
    MethodConfig (quantized later, only on a cache miss)."""
    if isinstance(spec_or_pair, MethodConfig):
        return None, spec_or_pair
    if isinstance(spec_or_pair, (tuple, list)) and len(spec_or_pair) == 2:
        return spec_or_pair
    raise AwqnbError(f"layer_mse: {label!r} must map to a MethodConfig or a (quantized model, QuantResult) pair.")


def _mse_compute(model, calibration, layers, qmodels: dict, device, batch_size):
    import pandas as pd

    spec = resolve_spec(model)
    dev = model_device(model, device)
    acc = torch.float64 if dev.type != "mps" else torch.float32
    names = list(spec.linears)
    # per method, per layer: W_eff computed lazily once per (layer, linear), kept while the pass runs
    bl = blocks(model, spec)
    dws: dict = {}

    def dw(label, layer, name):
        key = (label, layer, name)
        if key not in dws:
            qm, res = qmodels[label]
            for n, w_eff in effective_weights(qm, res, layer, dev).items():
                dws[(label, layer, n)] = get_module(bl[layer], n).weight.data.to(dev).float() - w_eff
        return dws[key]

    err = {(m, l, n): torch.zeros((), dtype=acc, device=dev) for m in qmodels for l in layers for n in names}
    power = {(l, n): torch.zeros((), dtype=acc, device=dev) for l in layers for n in names}
    ntok = {(l, n): 0 for l in layers for n in names}

    done = {m: {r.index for r in res.layers} for m, (_, res) in qmodels.items()}  # layers each result quantized

    def sink(layer, name, x, y):
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        y2 = y.detach().reshape(-1, y.shape[-1])
        power[(layer, name)] += y2.to(acc).pow(2).sum()
        ntok[(layer, name)] += x2.shape[0]
        for m in qmodels:
            if layer in done[m]:
                err[(m, layer, name)] += (x2 @ dw(m, layer, name).T).to(acc).pow(2).sum()

    def block_done(l, _block):  # ΔW of a finished block is not needed again
        for key in [k for k in dws if k[1] == l]:
            del dws[key]

    forward_pass(model, calibration, layers, [(l, n) for l in layers for n in names], sink, dev, batch_size,
                 on_block=block_done)
    rows = []
    for m in qmodels:
        for l in layers:
            if l not in done[m]:
                continue
            for n in names:
                co = get_module(bl[l], n).out_features
                cnt = max(ntok[(l, n)] * co, 1)
                mse = float(err[(m, l, n)]) / cnt
                pw = float(power[(l, n)]) / cnt
                rows.append({"method": m, "layer": l, "module": n.rsplit(".", 1)[-1], "linear": n, "mse": mse,
                             "out_power": pw, "rel_mse": mse / pw if pw > 0 else float("nan"),
                             "n_tok": ntok[(l, n)]})
    return pd.DataFrame(rows)


def layer_mse(model: nn.Module, calibration, quantized: Mapping[str, Any], layers=None, device=None,
              batch_size: int = 8, max_samples: int | None = None, cache=True, model_name: str | None = None):
    """Output MSE of every linear layer on the FP model's calibration inputs, per method, side by
    side (the seed's check_mse_layer, for all layers at once) → rows (method, layer, module,
    linear, mse, out_power, rel_mse, n_tok):

      mse = Σ_t ‖(W − W_eff) x_t‖² / (n_tok · co),  out_power = Σ_t ‖W x_t‖² / (n_tok · co),
      rel_mse = mse / out_power

    with x_t the linear's input in the FP model and W_eff the method's weight in the FP space
    (`effective_weights`): each layer is judged on the same inputs, in isolation (errors of earlier
    layers are not propagated). quantized: label → (quantized model, QuantResult) or label →
    MethodConfig (then a deep copy of `model` is quantized here on the same calibration set).
    One streaming pass for all labels; each label is cached on its own, keyed by the FP model,
    the calibration, the layers and the quantized weights (or the MethodConfig).
    """
    import pandas as pd

    layers = check_layers(model, layers, model_name)
    full = limit_calibration(calibration, None)
    calib = limit_calibration(calibration, max_samples)
    base = {"model": weights_fingerprint(model), "calibration": calibration_key(calib), "layers": layers}
    frames = []
    c = resolve_cache(cache)
    todo, keys = {}, {}
    for label, entry in quantized.items():
        qm, res_or_cfg = _prepare_quantized(model, entry, device, label)
        if qm is None:  # a MethodConfig: quantized here on the whole calibration set
            cfg = res_or_cfg
            parts = {**base, "method": cfg.to_dict(), "quantized_on": calibration_key(full)}
        else:
            cfg = None
            parts = {**base, "quantized": weights_fingerprint(qm),
                     "scales": scales_fingerprint(res_or_cfg)}
        keys[label] = parts
        if c is not None and c.contains("layer_mse", parts):
            frames.append(c.get_or_compute("layer_mse", parts, lambda: None).assign(method=label))
            continue
        if qm is None:
            qm = copy.deepcopy(model)
            res = _quantize(qm, cfg, full, device=model_device(model, device), model_name=model_label(model, model_name),
                            progress=False)
            todo[label] = (qm, res)
        else:
            todo[label] = (qm, res_or_cfg)
    if todo:
        df = _mse_compute(model, calib, layers, todo, device, batch_size)
        for label in todo:
            sub = df[df["method"] == label].reset_index(drop=True)
            frames.append(cached_or_compute(c if c is not None else False, "layer_mse", keys[label], lambda sub=sub: sub))
    order = {m: i for i, m in enumerate(quantized)}
    out = pd.concat(frames, ignore_index=True)
    out = out.sort_values(["method", "layer"], key=lambda s: s.map(order) if s.name == "method" else s,
                          kind="stable").reset_index(drop=True)
    return out


def relative_mse(mse, baseline: str, value: str = "rel_mse"):
    """A `layer_mse` frame with a column `vs_<baseline>` = value / the baseline method's value on
    the same (layer, module) (< 1: lower output error than the baseline)."""
    if baseline not in set(mse["method"]):
        raise AwqnbError(f"baseline {baseline!r} is not among the methods {sorted(set(mse['method']))}.")
    ref = mse[mse["method"] == baseline].set_index(["layer", "module"])[value]
    out = mse.copy()
    out[f"vs_{baseline}"] = [v / ref.get((l, m), float("nan")) for l, m, v in
                             zip(out["layer"], out["module"], out[value])]
    return out


def worst_layers(mse, n: int = 10, value: str = "rel_mse", baseline: str | None = None, risk=None,
                 results: Mapping[str, Any] | None = None):
    """The `n` (layer, module) pairs with the largest `value` per method of a `layer_mse` frame,
    ranked within each method (column `rank`, 1 = worst); with `baseline` (e.g. 'rtn') also
    `vs_<baseline>` (`relative_mse`); with a `risk_summary` frame the layer's n_dead and
    n_critical MLP channels; with `results` (label → QuantResult) the α* that label chose for the
    module's scale group (`alpha`)."""
    df = relative_mse(mse, baseline, value) if baseline is not None else mse.copy()
    df["rank"] = df.groupby("method")[value].rank(ascending=False, method="first").astype(int)
    df = df[df["rank"] <= n].sort_values(["method", "rank"], kind="stable").reset_index(drop=True)
    if risk is not None:
        df = df.merge(risk[["layer", "n_dead", "n_critical"]], on="layer", how="left")
    if results:
        def alpha(label, layer, linear):
            res = results.get(label)
            spec = next((s for s in SPECS if res is not None and res.model_type in s.model_types), None)
            rec = layer_record(res, int(layer)) if spec is not None else None
            g = next((g.name for g in spec.groups if linear in g.layers), None) if spec is not None else None
            gs = rec.groups.get(g) if rec is not None and g is not None else None
            return gs.best_alpha if gs is not None else float("nan")

        df["alpha"] = [alpha(m, l, lin) for m, l, lin in zip(df["method"], df["layer"], df["linear"])]
    return df
