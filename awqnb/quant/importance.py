"""Per-channel importance vectors of one decoder block (awq L1, awq L2, praq) and rank correlation.

`importance_vectors(model, calibration, layer)` walks the full-precision model with the block
engine (`awqnb.engine.walk`) up to block `layer` and reduces the inputs of that block's scale groups
to streaming statistics. Per scale group and input
channel j of the group's first linear, with tokens t:
  l1_j   = E_t|x_tj|                   (reference AWQ salience)
  l2_j   = sqrt(E_t[x_tj²])            (the seeds' E[X²] metric, as RMS); ex2_j = E_t[x_tj²] raw
  praq_j = the salience praq hands to the α search (awqnb/quant/methods/praq.py):
           down: I_j = U_j + P_j·S_j; gate_up: E|x_j|·r_j (back-projection); attention: l1_j
For the `down` group the praq parts are given too: utility U, spread S, p_live P, risk = P·S,
z_std (σ of the pre-activation, SiLU units), z_max. Channels of the vo group are o_proj inputs
`[n_heads·head_dim]` (the search then averages over the query heads of each kv head).
"""
from __future__ import annotations

import logging
import torch
from torch import nn

from awqnb.core.errors import AwqnbError
from awqnb.engine.capture import ChannelStats
from awqnb.engine.walk import BlockEngine
from awqnb.model.arch import blocks, get_module, resolve_spec
from awqnb.quant.methods.praq import PRAQ, PraqStats, back_project, block_activation, group_kind

log = logging.getLogger(__name__)

COLUMNS = ["layer", "group", "channel", "l1", "l2", "ex2", "praq", "utility", "spread", "p_live", "risk",
           "z_std", "z_max"]


@torch.no_grad()
def importance_vectors(model: nn.Module, calibration, layer: int, device=None, params: dict | None = None,
                       batch_size: int = 8):
    """Importance of every input channel of every scale group of block `layer` → tidy DataFrame,
    one row per (group, channel), columns `COLUMNS` (praq parts NaN outside the `down` group).

    params: praq parameters (defaults `PRAQ.PARAMS`: beta 3.0, tau −3.0, noise_factor 0.2).
    device: where to compute (default: the model's device; the model is moved there).
    """
    import pandas as pd

    p = {**PRAQ.PARAMS, **(params or {})}
    unknown = set(p) - set(PRAQ.PARAMS)
    if unknown:
        raise AwqnbError(f"unknown praq parameter(s) {sorted(unknown)}; use {sorted(PRAQ.PARAMS)}.")
    spec = resolve_spec(model)
    bl = blocks(model, spec)
    if not -len(bl) <= layer < len(bl):
        raise AwqnbError(f"layer={layer} is out of range: the model has {len(bl)} decoder blocks (0…{len(bl) - 1}).")
    layer = layer % len(bl)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    keys = [g.layers[0] for g in spec.groups]
    stats = {k: ChannelStats() for k in keys}
    for step in BlockEngine(model, calibration, device, None, batch_size).walk([layer]):
        block = step.block  # on the device until the walk ends
        _, act, c = block_activation(block, spec)
        wg = get_module(block, spec.mlp_gate).weight.data
        wu = get_module(block, spec.mlp_up).weight.data
        pst = PraqStats(wg, wu, act, c)

        def sink(name, x):
            stats[name].update(x)
            if name == spec.mlp_gate:
                pst.update(x)

        step.forward(sink, keys, keep_outputs=False)
        beta, tau, nf = float(p["beta"]), float(p["tau"]), float(p["noise_factor"])
        imp = pst.importance(beta, tau, nf)
        frames = [group_frame(spec, g, layer, stats[g.layers[0]], pst, imp, wg, wu, beta, tau, nf)
                  for g in spec.groups]
    return pd.concat(frames, ignore_index=True).reindex(columns=COLUMNS)


def group_frame(spec, g, layer: int, st, pst, imp, wg, wu, beta, tau, nf):
    """One scale group's per-channel importance as a DataFrame with `COLUMNS`: l1/l2/ex2 from the
    group's input statistics `st` (ChannelStats), praq from the block's PraqStats `pst` and its
    importance `imp` (down: I itself with its parts; gate_up: back-projected; attention: l1)."""
    import pandas as pd

    l1, ex2 = st.mean_abs, st.mean_sq
    d = {"layer": layer, "group": g.name, "channel": range(l1.numel()), "l1": l1,
         "l2": ex2.clamp(min=0).sqrt(), "ex2": ex2}
    kind = group_kind(spec, g)
    if kind == "down":
        plive = pst.p_live(beta, tau, nf)
        d.update(praq=imp, utility=pst.utility, spread=pst.spread, p_live=plive,
                 risk=plive * pst.spread, z_std=pst.z_std, z_max=pst.z_max.float())
    elif kind == "gate_up":
        d["praq"] = back_project(imp, wg, wu, l1)
    else:
        d["praq"] = l1
    d = {k: (v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    return pd.DataFrame(d).reindex(columns=COLUMNS)


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length vectors (tensors, arrays or Series): the
    Pearson correlation of their ranks, ties given their average rank. NaN if either is constant."""
    import numpy as np
    import pandas as pd

    def series(v):
        if isinstance(v, torch.Tensor):
            v = v.detach().float().cpu().numpy()
        return pd.Series(np.asarray(v, dtype=float).reshape(-1))

    sa, sb = series(a), series(b)
    if len(sa) != len(sb):
        raise AwqnbError(f"spearman needs vectors of equal length, got {len(sa)} and {len(sb)}.")
    ra, rb = sa.rank(method="average"), sb.rank(method="average")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def correlations(df) -> "pd.DataFrame":
    """Spearman between the metrics of an `importance_vectors` frame, per (layer, group)."""
    import pandas as pd

    pairs = [("l1", "l2"), ("l1", "praq"), ("l2", "praq")]
    rows = []
    for (layer, group), d in df.groupby(["layer", "group"], sort=False):
        rows.append({"layer": layer, "group": group, **{f"{x}~{y}": spearman(d[x], d[y]) for x, y in pairs}})
    return pd.DataFrame(rows)
