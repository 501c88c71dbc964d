"""MLP intermediate channels at risk: where the pre-activation sits against the activation's knee
(praq's units), from one streaming pass over the calibration set, cached (`statcache`):

  preactivation_risk  per (layer, MLP channel): dead / risky / high-weight / critical
  preactivation_hist  the histogram of ẑ for one layer (all channels or some)
  risk_summary        per layer: counts of the above
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Iterable, Mapping

import torch
from torch import nn

from awqnb.analysis.diagnostics import check_layer, check_layers, forward_pass, limit_calibration
from awqnb.analysis.salience import praq_params
from awqnb.analysis.statcache import cached_or_compute, calibration_key, weights_fingerprint
from awqnb.core.errors import AwqnbError
from awqnb.model.arch import blocks, get_module, resolve_spec
from awqnb.quant.methods.praq import PraqStats, block_activation, group_kind

RISK_DEFAULTS = {"dead_frac": 0.05, "high_weight_quantile": 0.9, "hist_lim": 16.0, "hist_bins": 128}


class RiskStats(PraqStats):
    """PraqStats plus, per intermediate channel i: the count of tokens with ẑ_ti > τ (live side
    of the knee) and a histogram of ẑ_ti on fixed edges (`edges: [n_bins + 1]`, with under- and
    overflow bins: counts `[I, n_bins + 2]`)."""

    def __init__(self, w_gate, w_up, act, act_scale, tau: float, edges: torch.Tensor):
        super().__init__(w_gate, w_up, act, act_scale)
        self.tau = tau
        self.edges = edges.to(self.w_gate.device).double()
        i = self.w_gate.shape[0]
        self.live = torch.zeros(i, dtype=torch.float64, device=self.w_gate.device)
        self.hist = torch.zeros(i, edges.numel() + 1, dtype=torch.float64, device=self.w_gate.device)
        self._row_offset = torch.arange(i, device=self.w_gate.device) * self.hist.shape[1]

    def _extra(self, zh: torch.Tensor) -> None:
        self.live += (zh > self.tau).double().sum(0)
        # bin 0: < edges[0]; nb-1: ≥ edges[-1]; row i's bins start at i·nb
        idx = torch.bucketize(zh, self.edges) + self._row_offset[None, :]
        self.hist += torch.bincount(idx.reshape(-1), minlength=self.hist.numel()).view_as(self.hist).double()


def _band_fraction(hist, edges, lo, hi):
    """Fraction of each row's histogram mass inside [lo_i, hi_i] (`[I]` each), spreading each
    bin's count uniformly over its width (under/overflow bins count when the band is unbounded
    on their side: never here)."""
    import numpy as np

    left, right = edges[:-1][None, :], edges[1:][None, :]
    inner = hist[:, 1:-1]
    overlap = (np.minimum(right, hi[:, None]) - np.maximum(left, lo[:, None])).clip(min=0) / (right - left)
    tot = hist.sum(1)
    return np.where(tot > 0, (inner * overlap).sum(1) / np.maximum(tot, 1), np.nan)


def _risk_compute(model, calibration, layers, params, rp, device, batch_size):
    import numpy as np
    import pandas as pd

    spec = resolve_spec(model)
    bl = blocks(model, spec)
    edges = torch.linspace(-rp["hist_lim"], rp["hist_lim"], int(rp["hist_bins"]) + 1, dtype=torch.float64)
    down_name = next(g.layers[0] for g in spec.groups if group_kind(spec, g) == "down")  # fed by act(z)·u
    st, acts, wdown = {}, {}, {}

    def sink(layer, _name, x, _y):  # block `layer` is on the device while the walk is at it
        if layer not in st:
            name, act, c = block_activation(bl[layer], spec)
            wg = get_module(bl[layer], spec.mlp_gate).weight.data
            wu = get_module(bl[layer], spec.mlp_up).weight.data
            down = get_module(bl[layer], down_name).weight.data
            st[layer] = RiskStats(wg, wu, act, c, params["tau"], edges)
            acts[layer] = (name, c)
            wdown[layer] = down.float().norm(dim=0).cpu().numpy()  # ‖W_down[:, i]‖₂ `[I]`
        st[layer].update(x)

    def done(l, _block):  # keep the statistics, drop the fp32 weight copies
        s = st[l]
        st[l] = {k: getattr(s, k) for k in ("hist", "z_std", "live", "n", "z_sum", "z_max", "utility", "spread")}
        st[l]["p_live"] = s.p_live(params["beta"], params["tau"], params["noise_factor"])

    forward_pass(model, calibration, layers, [(l, spec.mlp_gate) for l in layers], sink, device, batch_size,
                 on_block=done)
    beta, tau, nf = params["beta"], params["tau"], params["noise_factor"]
    e = edges.numpy()
    frames, hists = [], {}
    for l in layers:
        s = SimpleNamespace(**st[l])
        hist = s.hist.cpu().numpy()
        z_std = s.z_std.cpu().numpy().astype(float)
        delta = nf * z_std
        plive = s.p_live.cpu().numpy()
        active = (s.live / s.n).cpu().numpy()
        wn = wdown[l]
        thr = float(np.quantile(wn, rp["high_weight_quantile"]))
        d = pd.DataFrame({
            "layer": l, "channel": np.arange(len(wn)), "activation": acts[l][0], "act_scale": acts[l][1],
            "active_frac": active,
            "positive_frac": _band_fraction(hist, e, np.zeros_like(wn), np.full_like(wn, np.inf))
            + hist[:, -1] / np.maximum(hist.sum(1), 1),
            "near_knee_frac": _band_fraction(hist, e, tau - delta, tau + delta),
            "z_mean": (s.z_sum / s.n).cpu().numpy(), "z_std": z_std, "z_max": s.z_max.cpu().numpy(),
            "p_live": plive, "utility": s.utility.cpu().numpy(), "spread": s.spread.cpu().numpy(),
            "w_down_norm": wn,
        })
        d["dead"] = d["active_frac"] <= rp["dead_frac"]
        d["risky"] = d["p_live"] >= 0.5
        d["high_weight"] = d["w_down_norm"] >= thr
        d["critical"] = d["dead"] & d["risky"] & d["high_weight"]
        frames.append(d)
        hists[l] = hist.astype("float32")
    return {"channels": pd.concat(frames, ignore_index=True), "hist": hists, "edges": e}


def _risk(model, calibration, layers, device, params, batch_size, max_samples, cache, model_name, **risk):
    unknown = set(risk) - set(RISK_DEFAULTS)
    if unknown:
        raise AwqnbError(f"unknown risk parameter(s) {sorted(unknown)}; use {sorted(RISK_DEFAULTS)}.")
    rp = {**RISK_DEFAULTS, **risk}
    if not 0.0 <= rp["high_weight_quantile"] <= 1.0 or not 0.0 <= rp["dead_frac"] <= 1.0:
        raise AwqnbError("dead_frac and high_weight_quantile must lie in [0, 1].")
    layers = check_layers(model, layers, model_name)
    p = praq_params(params)
    calib = limit_calibration(calibration, max_samples)
    parts = {"model": weights_fingerprint(model), "calibration": calibration_key(calib), "layers": layers,
             "params": p, "risk": rp}
    return cached_or_compute(cache, "risk", parts, lambda: _risk_compute(model, calib, layers, p, rp, device, batch_size))


def preactivation_risk(model: nn.Module, calibration, layers=None, device=None, params: Mapping | None = None,
                       batch_size: int = 8, max_samples: int | None = None, cache=True,
                       model_name: str | None = None, **risk):
    """MLP intermediate channels at risk → one row per (layer, channel).

    In praq's knee-relative units (ẑ = z / c, τ = params['tau'] = −3 by default; praq.py):
      active_frac_i   = P_t(ẑ_ti > τ)                fraction of tokens on the live side of the knee
      positive_frac_i = P_t(ẑ_ti > 0)                (from the histogram)
      near_knee_frac_i = P_t(|ẑ_ti − τ| ≤ δ_i), δ_i = noise_factor·σ_i   (histogram, bins of
                        2·hist_lim/hist_bins units, mass spread uniformly inside a bin)
      p_live_i        = sigmoid(β(max_t ẑ_ti + δ_i − τ))   praq's risk indicator
      w_down_norm_i   = ‖W_down[:, i]‖₂               how loudly channel i writes to the output
    Flags: dead = active_frac ≤ dead_frac (0.05: live on at most 5% of tokens);
    risky = p_live ≥ 0.5 (with the noise band the pre-activation reaches τ on some token);
    high_weight = w_down_norm ≥ its `high_weight_quantile` (0.9) within the layer;
    critical = dead & risky & high_weight (the seed's "critical channels": mostly silent, able to
    wake up, and loud when they do). Also z_mean, z_std, z_max (ẑ units), utility, spread.
    Keyword `risk` parameters: dead_frac, high_weight_quantile, hist_lim (16), hist_bins (128).
    Cached per (model, calibration, layers, params).
    """
    return _risk(model, calibration, layers, device, params, batch_size, max_samples, cache, model_name,
                 **risk)["channels"]


def preactivation_hist(model: nn.Module, calibration, layer: int, channels: Iterable[int] | None = None,
                       device=None, params: Mapping | None = None, batch_size: int = 8,
                       max_samples: int | None = None, cache=True, model_name: str | None = None, **risk):
    """Histogram of ẑ for one layer → rows (layer, channel, bin_lo, bin_hi, count, frac); channels
    None sums over all channels (channel = -1). The under/overflow bins have bin_lo = -inf /
    bin_hi = +inf. Shares `preactivation_risk`'s pass and cache entry when called with the same
    layers; here layers = [layer]."""
    import numpy as np
    import pandas as pd

    layer = check_layer(model, layer, model_name)
    res = _risk(model, calibration, [layer], device, params, batch_size, max_samples, cache, model_name, **risk)
    hist, e = res["hist"][layer], res["edges"]
    lo = np.concatenate([[-np.inf], e])
    hi = np.concatenate([e, [np.inf]])
    if channels is None:
        sel = {-1: hist.sum(0)}
    else:
        sel = {int(c): hist[int(c)] for c in channels}
    rows = []
    for c, h in sel.items():
        tot = max(float(h.sum()), 1.0)
        rows.append(pd.DataFrame({"layer": layer, "channel": c, "bin_lo": lo, "bin_hi": hi, "count": h,
                                  "frac": h / tot}))
    return pd.concat(rows, ignore_index=True)


def risk_summary(channels, top: int = 5):
    """Per-layer counts of a `preactivation_risk` frame: n_channels, n_dead, n_risky,
    n_high_weight, n_dead_risky, n_critical, frac_critical, and the `top` critical channels by
    w_down_norm."""
    import pandas as pd

    rows = []
    for layer, d in channels.groupby("layer", sort=True):
        crit = d[d["critical"]].sort_values("w_down_norm", ascending=False)
        rows.append({"layer": layer, "activation": d["activation"].iloc[0], "n_channels": len(d),
                     "n_dead": int(d["dead"].sum()), "n_risky": int(d["risky"].sum()),
                     "n_high_weight": int(d["high_weight"].sum()),
                     "n_dead_risky": int((d["dead"] & d["risky"]).sum()),
                     "n_critical": int(d["critical"].sum()), "frac_critical": float(d["critical"].mean()),
                     "critical_channels": crit["channel"].head(top).tolist()})
    return pd.DataFrame(rows)
