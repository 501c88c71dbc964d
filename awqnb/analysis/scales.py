"""What a QuantResult's scale search chose, and the quantized layer mapped back to the FP basis:

  layer_record       the LayerRecord of one block
  scale_maps         linear → the input-column / output-row scales folded into it
  effective_weights  W_eff = diag(s_row) · W_q · diag(s_col)^-1 per linear of one block
  scales_fingerprint a short hash of the method and folded scales (cache keys)
  scaling_table      per (layer, group): α*, loss gain, scale spread
  scale_values       per channel: the chosen s and the salience it came from
  alpha_curves       `QuantResult.curves()` with method, bits and group size
  curve_jaggedness   per (group, layer): how often an α → loss curve reverses direction
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from awqnb.core.errors import AwqnbError
from awqnb.model.arch import ArchSpec, attn_shape, blocks, get_module, resolve_spec


def layer_record(result, layer: int):
    """The LayerRecord of block `layer` in a QuantResult (None when absent or no result)."""
    if result is None:
        return None
    if layer < len(result.layers) and result.layers[layer].index == layer:
        return result.layers[layer]
    return next((r for r in result.layers if r.index == layer), None)


def scale_maps(result, layer: int, spec: ArchSpec, attn) -> tuple[dict, dict]:
    """For the folded scale groups of one layer of `result`: linear → input-column scale `[ci]`
    (its inputs were divided by it, its columns multiplied) and linear → output-row scale `[co]`
    (a 'linear' prev op: its rows were divided by it)."""
    cols, rows = {}, {}
    rec = layer_record(result, layer)
    if rec is None:
        return cols, rows
    for g in spec.groups:
        gs = rec.groups.get(g.name)
        if gs is None:
            continue
        s = gs.scales.float()
        s_full = s[attn.o_index(s.device)] if g.gqa_fold else s
        for name in g.layers:
            cols[name] = s_full
        if g.prev_kind == "linear":
            rows[g.prev_op] = s
    return cols, rows


@torch.no_grad()
def effective_weights(qmodel: nn.Module, result, layer: int, device=None) -> dict[str, torch.Tensor]:
    """The quantized linears of block `layer` mapped back to the FP model's space:
    `W_eff = diag(s_row) · W_q · diag(s_col)^-1` (`[co, ci]` float32), where s_col is the scale
    folded into the linear's input columns and s_row the scale its output rows were divided by
    (v_proj for the vo group, up_proj for down). Without scales (rtn, or result None) W_eff = W_q.
    `x · W_eff^T` is then what the quantized block computes for an FP input x."""
    spec = resolve_spec(qmodel)
    attn = attn_shape(qmodel.config)
    block = blocks(qmodel, spec)[layer]
    cols, rows = scale_maps(result, layer, spec, attn)
    out = {}
    for name in spec.linears:
        w = get_module(block, name).weight.data
        out[name] = effective_weight(w, cols.get(name), rows.get(name), device if device is not None else w.device)
    return out


def effective_weight(w: torch.Tensor, col: torch.Tensor | None, row: torch.Tensor | None, device) -> torch.Tensor:
    """One linear's W_eff = diag(row) · W_q · diag(col)^-1 (float32, on `device`); None: no scale there."""
    dev = torch.device(device)
    w = w.to(dev).float()
    if col is not None:
        w = w / col.to(dev)[None, :]
    if row is not None:
        w = w * row.to(dev)[:, None]
    return w


def scales_fingerprint(result) -> str:
    """A short hash of a QuantResult's method and folded scales ('none' for no result), for cache keys."""
    if result is None:
        return "none"
    h = hashlib.sha1(result.method.encode())
    for r in result.layers:
        for g, s in sorted(r.groups.items()):
            h.update(f"{r.index}:{g}:{float(s.scales.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


# --- scaling --------------------------------------------------------------------------------

def scaling_table(result):
    """α* and the chosen scales per (layer, group) of a QuantResult → rows (method, layer, group,
    best_alpha, best_loss, rtn_loss, loss_gain = 1 − best_loss / rtn_loss, n_scales, s_min,
    s_median, s_max, s_ratio = s_max / s_min, log2s_std = std(log2 s), salience_max_over_median).
    Empty (with these columns) for a method without a scale search."""
    import pandas as pd

    cols = ["method", "layer", "group", "best_alpha", "best_loss", "rtn_loss", "loss_gain", "n_scales", "s_min",
            "s_median", "s_max", "s_ratio", "log2s_std", "salience_max_over_median"]
    rows = []
    for r in result.layers:
        for g, gs in r.groups.items():
            s = gs.scales.double()
            a = gs.salience.double()
            med = float(a.median())
            rows.append({"method": result.method, "layer": r.index, "group": g, "best_alpha": gs.best_alpha,
                         "best_loss": gs.best_loss, "rtn_loss": gs.rtn_loss,
                         "loss_gain": 1 - gs.best_loss / gs.rtn_loss if gs.rtn_loss > 0 else float("nan"),
                         "n_scales": s.numel(), "s_min": float(s.min()), "s_median": float(s.median()),
                         "s_max": float(s.max()), "s_ratio": float(s.max() / s.min().clamp(min=1e-30)),
                         "log2s_std": float(s.clamp(min=1e-30).log2().std()) if s.numel() > 1 else 0.0,
                         "salience_max_over_median": float(a.max()) / med if med > 0 else float("nan")})
    return pd.DataFrame(rows, columns=cols)


def scale_values(result, layers=None):
    """Per channel of every scale group: rows (method, layer, group, channel, scale, log2_scale,
    salience) — the chosen s (in the previous op's output space) and the salience it came from."""
    import pandas as pd

    want = None if layers is None else ({layers} if isinstance(layers, int) else set(layers))
    frames = []
    for r in result.layers:
        if want is not None and r.index not in want:
            continue
        for g, gs in r.groups.items():
            s = gs.scales.float().cpu()
            frames.append(pd.DataFrame({"method": result.method, "layer": r.index, "group": g,
                                        "channel": range(s.numel()), "scale": s.numpy(),
                                        "log2_scale": s.clamp(min=1e-30).log2().numpy(),
                                        "salience": gs.salience.float().cpu().numpy()}))
    if not frames:
        return pd.DataFrame(columns=["method", "layer", "group", "channel", "scale", "log2_scale", "salience"])
    return pd.concat(frames, ignore_index=True)


def alpha_curves(result):
    """`QuantResult.curves()` with method, bits and group_size columns (what plots.alpha_curves
    puts in its title)."""
    df = result.curves()
    return df.assign(method=result.method, bits=result.config.quant.bits, group_size=result.config.quant.group_size)


def curve_jaggedness(curves, tol: float = 0.05, min_reversals: int = 2):
    """How jagged each α → loss curve of `QuantResult.curves()` is → rows (group, layer, n_alpha,
    n_reversals, max_step, jagged), groups in the frame's order, layers ascending.

    Along α (ascending) the steps of log(loss / RTN loss) between neighbouring α that change the
    loss by more than `tol` (relative) are kept; n_reversals counts the sign changes between
    consecutive kept steps (a smooth U-shaped curve has at most 1). max_step is the largest
    factor between neighbouring α (≥ 1). jagged = n_reversals ≥ `min_reversals`."""
    import pandas as pd

    cols = ["group", "layer", "n_alpha", "n_reversals", "max_step", "jagged"]
    missing = [c for c in ("group", "layer", "alpha", "loss_rel_rtn") if c not in curves.columns]
    if missing:
        raise AwqnbError(f"curve_jaggedness needs group, layer, alpha, loss_rel_rtn; the frame lacks {missing}.")
    thr = math.log1p(tol)
    rows = []
    for g in dict.fromkeys(curves["group"]):
        sub = curves[curves["group"] == g]
        for layer, c in sub.groupby("layer", sort=True):
            y = [float(v) for v in c.sort_values("alpha", kind="stable")["loss_rel_rtn"]]
            logs = [math.log(v) for v in y if math.isfinite(v) and v > 0]
            steps = [b - a for a, b in zip(logs, logs[1:])]
            signs = [1 if s > 0 else -1 for s in steps if abs(s) > thr]
            rev = sum(a != b for a, b in zip(signs, signs[1:]))
            rows.append({"group": g, "layer": layer, "n_alpha": len(logs), "n_reversals": rev,
                         "max_step": math.exp(max(abs(s) for s in steps)) if steps else 1.0,
                         "jagged": rev >= min_reversals})
    return pd.DataFrame(rows, columns=cols)
