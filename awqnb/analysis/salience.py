"""Per-channel importance of the inputs of every scale group, from one streaming pass over the
calibration set (`diagnostics.forward_pass`), cached (`statcache`):

  salience_table       per (layer, group, channel): l1 = E|x_j|, l2 = sqrt(E[x_j²]), ex2 = E[x_j²],
                       praq (and its parts for `down`) — the columns of `importance.COLUMNS`
  salience_summary     per (layer, group, metric): spread of the metric, top-k channels
  relative_salience    the metrics divided by their mean over the group's channels
  importance_agreement per (layer, group, pair of metrics): Spearman rank correlation
"""
from __future__ import annotations

from typing import Iterable, Mapping

from torch import nn

from awqnb.analysis.diagnostics import check_layers, forward_pass, limit_calibration
from awqnb.analysis.statcache import cached_or_compute, calibration_key, weights_fingerprint
from awqnb.core.errors import AwqnbError
from awqnb.engine.capture import ChannelStats
from awqnb.model.arch import blocks, get_module, resolve_spec
from awqnb.quant.importance import COLUMNS as SALIENCE_COLUMNS, group_frame, spearman
from awqnb.quant.methods.praq import PRAQ, PraqStats, block_activation

METRICS = ("l1", "l2", "praq")


def praq_params(params: Mapping | None) -> dict:
    """praq's parameters (`PRAQ.PARAMS`) updated with `params`, as floats; AwqnbError for an unknown one."""
    p = {**PRAQ.PARAMS, **(params or {})}
    unknown = set(p) - set(PRAQ.PARAMS)
    if unknown:
        raise AwqnbError(f"unknown praq parameter(s) {sorted(unknown)}; use {sorted(PRAQ.PARAMS)}.")
    return {k: float(v) for k, v in p.items()}


def _salience_compute(model, calibration, layers, params, device, batch_size):
    import pandas as pd

    spec = resolve_spec(model)
    bl = blocks(model, spec)
    keys = [g.layers[0] for g in spec.groups]
    stats = {(l, k): ChannelStats() for l in layers for k in keys}
    pst = {}
    beta, tau, nf = params["beta"], params["tau"], params["noise_factor"]
    frames = []

    def gate_up(l):  # block l is on the device while the walk is at it
        return get_module(bl[l], spec.mlp_gate).weight.data, get_module(bl[l], spec.mlp_up).weight.data

    def sink(layer, name, x, _y):
        stats[(layer, name)].update(x)
        if name == spec.mlp_gate:
            if layer not in pst:
                _, act, c = block_activation(bl[layer], spec)
                pst[layer] = PraqStats(*gate_up(layer), act, c)
            pst[layer].update(x)

    def done(l, _block):
        st_p = pst.pop(l)
        imp = st_p.importance(beta, tau, nf)
        frames.extend(group_frame(spec, g, l, stats.pop((l, g.layers[0])), st_p, imp, *gate_up(l), beta, tau, nf)
                      for g in spec.groups)

    forward_pass(model, calibration, layers, stats.keys(), sink, device, batch_size, on_block=done)
    return pd.concat(frames, ignore_index=True).reindex(columns=SALIENCE_COLUMNS)


def salience_table(model: nn.Module, calibration, layers=None, device=None, params: Mapping | None = None,
                   batch_size: int = 8, max_samples: int | None = None, cache=True, model_name: str | None = None):
    """Per-channel importance of the inputs of every scale group → one row per (layer, group,
    channel), columns `importance.COLUMNS`:

      l1_j = E_t|x_tj|,  l2_j = sqrt(E_t[x_tj²]),  ex2_j = E_t[x_tj²]
      praq_j: down → I_j = U_j + P_j·S_j (utility, spread, p_live, risk = P·S, z_std, z_max given
              too); gate_up → E|x_j|·r_j (back-projection); attention groups → l1_j
    (awqnb/quant/methods/praq.py has the formulas). One streaming pass over the calibration set for all
    requested layers (the forward stops after the last one). The vo group's channels are o_proj
    inputs `[n_heads·head_dim]`. Cached per (model, calibration, layers, params).
    """
    layers = check_layers(model, layers, model_name)
    p = praq_params(params)
    calib = limit_calibration(calibration, max_samples)
    parts = {"model": weights_fingerprint(model), "calibration": calibration_key(calib), "layers": layers,
             "params": p}
    return cached_or_compute(cache, "salience", parts,
                   lambda: _salience_compute(model, calib, layers, p, device, batch_size))


def salience_summary(channels, top_k: int = 8, metrics: Iterable[str] = METRICS):
    """Per (layer, group, metric) summary of a `salience_table` frame:

      mean, median, max, max_over_median = max / median (outlier strength),
      top_k_share = Σ top-k values / Σ values, cv = std / mean,
      top_channels / top_values: the k most salient channels, largest first.
    """
    import numpy as np
    import pandas as pd

    rows = []
    for (layer, group), d in channels.groupby(["layer", "group"], sort=False):
        for m in metrics:
            v = d[m].to_numpy(dtype=float)
            if not np.isfinite(v).any():
                continue
            order = np.argsort(-v, kind="stable")[:top_k]
            tot = float(np.nansum(v))
            med = float(np.nanmedian(v))
            rows.append({"layer": layer, "group": group, "metric": m, "n_channels": len(v),
                         "mean": float(np.nanmean(v)), "median": med, "max": float(np.nanmax(v)),
                         "max_over_median": float(np.nanmax(v)) / med if med > 0 else float("nan"),
                         "top_k_share": float(v[order].sum()) / tot if tot > 0 else float("nan"),
                         "cv": float(np.nanstd(v) / np.nanmean(v)) if np.nanmean(v) > 0 else float("nan"),
                         "top_channels": d["channel"].to_numpy()[order].tolist(),
                         "top_values": v[order].tolist()})
    return pd.DataFrame(rows)


def relative_salience(channels, metrics: Iterable[str] = METRICS):
    """A `salience_table` frame with `<metric>_rel` = metric / its mean over the channels of the
    same (layer, group): comparable across metrics and layers (1 = an average channel)."""
    out = channels.copy()
    for m in metrics:
        out[f"{m}_rel"] = out[m] / out.groupby(["layer", "group"])[m].transform("mean")
    return out


def importance_agreement(channels, pairs: Iterable[tuple[str, str]] = (("l1", "l2"), ("l1", "praq"), ("l2", "praq"))):
    """Spearman rank correlation between importance metrics, per (layer, group) of a
    `salience_table` frame → rows (layer, group, pair 'a~b', a, b, spearman). A pair whose
    columns are missing or all NaN in a group is skipped; for attention groups praq = l1."""
    import pandas as pd

    rows = []
    for (layer, group), d in channels.groupby(["layer", "group"], sort=False):
        for a, b in pairs:
            if a not in d.columns or b not in d.columns or d[a].isna().all() or d[b].isna().all():
                continue
            rows.append({"layer": layer, "group": group, "pair": f"{a}~{b}", "a": a, "b": b,
                         "spearman": spearman(d[a], d[b])})
    return pd.DataFrame(rows, columns=["layer", "group", "pair", "a", "b", "spearman"])
