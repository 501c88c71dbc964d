"""Where and why quantization hurts: tidy DataFrames, one row per (layer, module) or per channel.

Every statistic is streamed over the calibration chunks through forward hooks on the
full-precision (FP) model (nothing but the current chunk's activations is held), and the
results are cached per (model, calibration, parameters) in memory and on disk
(`DiagnosticsCache`, under `awqnb.model.models.cache_dir()/diagnostics`).

Notation (one decoder block; tokens t of the calibration set, `n_tok` of them):
  x_t `[ci]`      the input of a linear `W: [co, ci]` (FP model, FP inputs), y_t = W x_t `[co]`
  Q(W)            round-to-nearest on the group grid (`awqnb.core.primitives`), r = W − Q(W) `[co, ci]`
  Δ[i, g]         the grid step (scale) of row i, group g; `Δ[i, j]` its per-column expansion
  z_ti, ẑ_ti      MLP pre-activation x_t·W_gate[i] and its knee-relative value z / c (praq's
                  units: τ and β mean the same for SiLU and gelu-tanh; awqnb/quant/methods/praq.py)

Frames:
  salience_table      per (layer, group, channel): l1 = E|x_j|, l2 = sqrt(E[x_j²]), ex2 = E[x_j²],
                      praq (and its parts for `down`) — the columns of `importance.COLUMNS`
  salience_summary    per (layer, group, metric): spread of the metric, top-k channels
  preactivation_risk  per (layer, MLP channel): dead / risky / high-weight / critical
  risk_summary        per layer: counts of the above
  rounding_error      per (layer, module[, method]): ‖r‖/‖W‖, |r| quantiles, grid step, flips
  layer_mse           per (method, layer, module): output MSE of the linear on FP calibration inputs
  scaling_table       per (layer, group): α*, loss gain, scale spread (from a QuantResult)
  importance_agreement per (layer, group, pair of metrics): Spearman rank correlation
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import operator
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from awqnb.analysis.statcache import (CACHE, DIAG_VERSION, DiagnosticsCache, cached_or_compute,
                                      calibration_key, model_fingerprint, resolve_cache)
from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import compute_qparams, dequantize, expand_groups, quantize
from awqnb.engine.capture import ChannelStats
from awqnb.engine.walk import BlockEngine, BlockStep
from awqnb.model.arch import ArchSpec, SPECS, attn_shape, blocks, get_module, resolve_spec
from awqnb.model.data import Calibration, calibration_samples
from awqnb.model.models import resolve_device, short_name, versions
from awqnb.quant import pipeline as P
from awqnb.quant.importance import COLUMNS as SALIENCE_COLUMNS, group_frame, spearman
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.methods import get_method
from awqnb.quant.methods.praq import PRAQ, PraqStats, block_activation, group_kind
from awqnb.quant.pipeline import quantize as _quantize

log = logging.getLogger(__name__)

METRICS = ("l1", "l2", "praq")
RISK_DEFAULTS = {"dead_frac": 0.05, "high_weight_quantile": 0.9, "hist_lim": 16.0, "hist_bins": 128}
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# --- layers ---------------------------------------------------------------------------------

def model_label(model: nn.Module, model_name: str | None = None) -> str:
    """A name for messages: `model_name`, else the model's path/name, else its model_type."""
    if model_name:
        return short_name(str(model_name))
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    return str(name) if name else str(getattr(model.config, "model_type", "the model"))


def n_layers(model: nn.Module) -> int:
    return len(blocks(model, resolve_spec(model)))


def check_layer(model: nn.Module, layer: int, model_name: str | None = None) -> int:
    """`layer` as an index into the decoder blocks (negative counts from the end), or AwqnbError
    naming the valid range: 'layer 28 is out of range: gemma3-270m has 18 decoder layers (0–17)'."""
    n = n_layers(model)
    try:
        if isinstance(layer, bool):
            raise TypeError
        layer = operator.index(layer)
    except TypeError:
        raise AwqnbError(f"layer {layer!r} is not an integer; give a decoder layer index 0–{n - 1}.") from None
    if not -n <= layer < n:
        raise AwqnbError(f"layer {layer} is out of range: {model_label(model, model_name)} has {n} decoder "
                         f"layers (0–{n - 1}).")
    return layer % n


def check_layers(model: nn.Module, layers=None, model_name: str | None = None) -> list[int]:
    """None → every layer; an int or an iterable of ints → sorted unique checked indices."""
    if layers is None:
        return list(range(n_layers(model)))
    if not isinstance(layers, (list, tuple, range, set)) and not hasattr(layers, "tolist"):
        layers = [layers]
    elif hasattr(layers, "tolist"):
        layers = layers.tolist()
        layers = layers if isinstance(layers, list) else [layers]
    out = sorted({check_layer(model, l, model_name) for l in layers})
    if not out:
        raise AwqnbError("no layers given; pass layers=None for every layer or a list of indices.")
    return out


def model_device(model: nn.Module, device) -> torch.device:
    """The device to compute on: `device` resolved, or where the model's first parameter lives when None."""
    if device is None:
        return next(model.parameters()).device
    return resolve_device(device)


def limit_calibration(calibration, max_samples: int | None):
    """A `Calibration` holding the first `max_samples` calibration samples (all when None).
    Accepts a Calibration, a list of 1-D token-id tensors or a `[n, T]` tensor."""
    samples = calibration_samples(calibration, "diagnostics")
    if max_samples is not None:
        if max_samples < 1:
            raise AwqnbError(f"max_samples={max_samples} must be at least 1 (or None for all).")
        samples = samples[:max_samples]
    if isinstance(calibration, Calibration):
        if len(samples) == len(calibration.samples):
            return calibration
        return dataclasses.replace(calibration, samples=samples, n_calib=len(samples))
    return Calibration("custom", len(samples), int(samples[0].numel()), 0, "tensors", samples)


# --- the streaming pass ---------------------------------------------------------------------

@torch.no_grad()
def forward_pass(model: nn.Module, calibration, layers: list[int], points: Iterable[tuple[int, str]],
                 sink: Callable[[int, str, torch.Tensor, torch.Tensor], None], device=None,
                 batch_size: int = 8, on_block: Callable[[int, nn.Module], None] | None = None) -> int:
    """Walk the FP model over the calibration chunks with the block engine (`awqnb.engine.walk`),
    calling `sink(layer, linear, x, y)` with each requested linear's input `x: [b, T, ci]` and
    output `y: [b, T, co]`, and `on_block(layer, block)` once a requested block is done (still on
    the device); the walk stops after block `max(layers)`. Returns the chunk count."""
    engine = BlockEngine(model, calibration, model_device(model, device), None, batch_size)
    model.eval()
    by_layer: dict[int, list[str]] = {}
    for l, n in points:
        by_layer.setdefault(l, []).append(n)
    for step in engine.walk(layers):
        l = step.index
        step.next_hidden = step.forward(lambda name, x, y: sink(l, name, x, y), by_layer.get(l, []),
                                        with_output=True)
        if on_block is not None:
            on_block(l, step.block)
    return len(engine.chunks)


# --- salience -------------------------------------------------------------------------------

def _praq_params(params: Mapping | None) -> dict:
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
    p = _praq_params(params)
    calib = limit_calibration(calibration, max_samples)
    parts = {"model": model_fingerprint(model), "calibration": calibration_key(calib), "layers": layers,
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


# --- pre-activation risk --------------------------------------------------------------------

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
    p = _praq_params(params)
    calib = limit_calibration(calibration, max_samples)
    parts = {"model": model_fingerprint(model), "calibration": calibration_key(calib), "layers": layers,
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


# --- effective weights of a quantized model -------------------------------------------------

def _record(result, layer: int):
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
    rec = _record(result, layer)
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
        dev = torch.device(device) if device is not None else w.device
        w = w.to(dev).float()
        if name in cols:
            w = w / cols[name].to(dev)[None, :]
        if name in rows:
            w = w * rows[name].to(dev)[:, None]
        out[name] = w
    return out


# --- one layer, quantized on its own ------------------------------------------------------

@torch.no_grad()
def capture_layer_inputs(model: nn.Module, calibration, layer: int, device=None, batch_size: int = 16,
                         model_name: str | None = None, dtype=None) -> tuple[list[torch.Tensor], list[dict]]:
    """The FP hidden states entering block `layer` and the keyword arguments it receives, per
    calibration chunk of at most `batch_size` samples: (hidden `[b, T, H]` list, kwargs list),
    from the block engine's walk, which stops when block `layer` is reached."""
    layer = check_layer(model, layer, model_name)
    model.eval()
    engine = BlockEngine(model, limit_calibration(calibration, None), model_device(model, device), dtype, batch_size)
    for step in engine.walk([layer]):
        return step.hidden, step.kwargs
    raise AwqnbError(f"layer {layer} was not reached")  # unreachable: walk yields the layer


@torch.no_grad()
def quantize_layer(model: nn.Module, calibration, cfg: MethodConfig, layer: int, device=None, inputs=None,
                   model_name: str | None = None):
    """Quantize block `layer` alone, on the FP model's inputs to it (the layer-local protocol of a
    deep dive: no earlier block is quantized), with exactly the pipeline's per-block steps
    (capture, scale search and fold, clip, rounding, method refinement).

    Returns (qmodel, result): a deep copy of `model` whose block `layer` is quantized (the others
    FP) and a QuantResult holding that one LayerRecord (`result.layers[0].index == layer`).
    inputs: `capture_layer_inputs(...)` output, to share one capture between methods.
    """
    import time

    layer = check_layer(model, layer, model_name)
    spec = resolve_spec(model)
    method = get_method(cfg.method)(cfg)
    P.validate(model, cfg, spec)
    calib = limit_calibration(calibration, None)
    dev = model_device(model, device)
    if inputs is None:
        inputs = capture_layer_inputs(model, calib, layer, dev, cfg.calib_batch_size, model_name, cfg.dtype)
    hidden, kw = inputs
    qmodel = copy.deepcopy(model)
    if method.searches_scales:
        P.keep_offset_norms_fp32(qmodel, spec)
    engine = BlockEngine(qmodel, calib, dev, cfg.dtype, cfg.calib_batch_size)
    block = blocks(qmodel, spec)[layer]
    attn = attn_shape(qmodel.config)
    keys = P.input_keys(spec)
    t0 = time.perf_counter()
    with engine.onload(block):
        step = BlockStep(engine, layer, block, hidden, kw)
        ins, stats, _outs = P.capture_block(step, keys)
        ctx = P.BlockContext(layer, block, spec, attn, ins, stats, kw, keys)
        rec = P.LayerRecord(layer)
        P.quantize_block(method, ctx, rec)
    rec.seconds = time.perf_counter() - t0
    res = P.QuantResult(cfg, model_label(model, model_name), qmodel.config.model_type, calib.to_dict(), [rec],
                        {"total_s": rec.seconds, "protocol": f"layer {layer} alone, FP inputs"}, versions())
    return qmodel, res


# --- rounding error -------------------------------------------------------------------------

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
    sample = a if n <= k else a[torch.linspace(0, n - 1, k, device=a.device).long()]
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
        eff = effective_weights(quantized, result, l, device) if _record(result, l) is not None else {}
        for name in spec.linears:
            w = get_module(bl[l], name).weight.data
            dev = torch.device(device) if device is not None else w.device
            w = w.to(dev).float()
            scale, zero = compute_qparams(w, q)
            w_hat = dequantize(quantize(w, scale, zero, q), scale, zero, q)
            step = expand_groups(scale, w.shape[1], q.group_size)
            variants = [("rtn", w - w_hat, step, {})] if include_rtn else []
            if name in eff:
                rec = _record(result, l)
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
    base = {"model": model_fingerprint(model), "calibration": calibration_key(calib), "layers": layers}
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
            parts = {**base, "quantized": model_fingerprint(qm),
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


def scales_fingerprint(result) -> str:
    """A short hash of a QuantResult's method and folded scales ('none' for no result), for cache keys."""
    if result is None:
        return "none"
    h = hashlib.sha1(result.method.encode())
    for r in result.layers:
        for g, s in sorted(r.groups.items()):
            h.update(f"{r.index}:{g}:{float(s.scales.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


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
            rec = _record(res, int(layer)) if spec is not None else None
            g = next((g.name for g in spec.groups if linear in g.layers), None) if spec is not None else None
            gs = rec.groups.get(g) if rec is not None and g is not None else None
            return gs.best_alpha if gs is not None else float("nan")

        df["alpha"] = [alpha(m, l, lin) for m, l, lin in zip(df["method"], df["layer"], df["linear"])]
    return df


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
