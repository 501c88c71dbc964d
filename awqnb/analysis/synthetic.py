"""Synthetic "loud silence" MLP (seed: awq_vs_fprpa): where mean |x| and praq disagree.

A SiLU MLP `down(act(gate(x)) · up(x))` whose `I` intermediate channels come in three groups, with
the pre-activation z = gate(x) and u = up(x) drawn per token t (x = [z-drivers | u-drivers], W_gate
and W_up select them, so z_ti and u_ti are exactly the drawn values):
  A  steady, moderate:  z ~ N(2, 0.5),   u ~ N(0, 1)           (always live)
  B  "loud silence":    z ~ N(−4.5, 0.4), u ~ N(0, 1) — dead, just below the knee threshold
                         τ = −3 — except on burst tokens (probability `p_burst`, shared by all B
                         channels) where z ~ N(4, 0.5), u ~ N(0, burst_up): rare, large outputs
  C  quiet, steady:     z ~ N(1.5, 0.3), u ~ N(0, 0.5)
Channel groups are interleaved by a random permutation so every quantization group mixes them.
The down_proj group (input = h = act(z)·u) is AWQ-searched with each salience (L1 `E|h|`, L2
`sqrt(E h²)`, praq) on a calibration set and judged on a held-out set: output MSE of down_proj
on all tokens, on burst tokens and on quiet tokens.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.primitives import fake_quant
from awqnb.model.arch import AttnShape, ScaleGroup
from awqnb.quant.methods.awq import InspectRunner, fold_scales, search_group
from awqnb.quant.methods.praq import PraqStats, activation_scale

GROUPS = ("A", "B", "C")
DOWN = ScaleGroup("down", "mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj", "linear")


class ToyMLP(nn.Module):
    """`[n, 2I] → [n, H]`: down_proj(silu(gate_proj(x)) · up_proj(x)), under `.mlp` so that the
    ScaleGroup paths match the decoder blocks' ('mlp.up_proj' → 'mlp.down_proj')."""

    def __init__(self, n_inter: int, hidden_out: int):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(2 * n_inter, n_inter, bias=False)
        self.mlp.up_proj = nn.Linear(2 * n_inter, n_inter, bias=False)
        self.mlp.down_proj = nn.Linear(n_inter, hidden_out, bias=False)
        self.mlp.act_fn = nn.SiLU()

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        return m.act_fn(m.gate_proj(x)) * m.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(self.hidden(x))


@dataclass
class LoudSilence:
    model: ToyMLP
    x_calib: torch.Tensor  # [n_calib, 2I]
    x_eval: torch.Tensor  # [n_eval, 2I]
    burst_calib: torch.Tensor  # [n_calib] bool
    burst_eval: torch.Tensor  # [n_eval] bool
    group: list[str]  # [I] 'A' | 'B' | 'C'


def make_loud_silence(n_a: int = 32, n_b: int = 16, n_c: int = 48, hidden_out: int = 64,
                      n_calib: int = 2048, n_eval: int = 4096, p_burst: float = 0.02,
                      burst_up: float = 4.0, seed: int = 0) -> LoudSilence:
    """Build the toy; deterministic for a given seed (own torch.Generator)."""
    g = torch.Generator().manual_seed(seed)
    n_i = n_a + n_b + n_c
    labels = ["A"] * n_a + ["B"] * n_b + ["C"] * n_c
    perm = torch.randperm(n_i, generator=g)
    group = [labels[int(k)] for k in perm]
    is_b = torch.tensor([x == "B" for x in group])
    is_a = torch.tensor([x == "A" for x in group])

    def draw(n):
        burst = torch.rand(n, generator=g) < p_burst  # [n]
        rn = lambda: torch.randn(n, n_i, generator=g)  # noqa: E731
        z = torch.where(is_a, 2.0 + 0.5 * rn(), 1.5 + 0.3 * rn())
        u = torch.where(is_a, rn(), 0.5 * rn())
        z_b = torch.where(burst[:, None], 4.0 + 0.5 * rn(), -4.5 + 0.4 * rn())
        u_b = torch.where(burst[:, None], burst_up * rn(), rn())
        z = torch.where(is_b, z_b, z)
        u = torch.where(is_b, u_b, u)
        return torch.cat([z, u], 1), burst

    model = ToyMLP(n_i, hidden_out)
    with torch.no_grad():
        eye = torch.eye(n_i)
        model.mlp.gate_proj.weight.copy_(torch.cat([eye, torch.zeros(n_i, n_i)], 1))
        model.mlp.up_proj.weight.copy_(torch.cat([torch.zeros(n_i, n_i), eye], 1))
        model.mlp.down_proj.weight.copy_(torch.randn(hidden_out, n_i, generator=g) / n_i**0.5)
    xc, bc = draw(n_calib)
    xe, be = draw(n_eval)
    return LoudSilence(model, xc, xe, bc, be, group)


def saliences(toy: LoudSilence, beta: float = 3.0, tau: float = -3.0, noise_factor: float = 0.2) -> dict:
    """Per-channel salience `[I]` of the down_proj input under each metric, plus praq's parts."""
    m = toy.model.mlp
    with torch.no_grad():
        h = toy.model.hidden(toy.x_calib)  # [n, I]
    st = PraqStats(m.gate_proj.weight, m.up_proj.weight, m.act_fn, activation_scale("silu"))
    st.update(toy.x_calib)
    return {
        "l1": h.abs().mean(0),
        "l2": h.pow(2).mean(0).sqrt(),
        "praq": st.importance(beta, tau, noise_factor),
        "utility": st.utility,
        "spread": st.spread,
        "p_live": st.p_live(beta, tau, noise_factor),
    }


def quantized_copy(toy: LoudSilence, a: torch.Tensor, qcfg: QuantConfig, scfg: SearchConfig):
    """AWQ-search the down group with salience `a`, fold, round down_proj. Returns (model, search)."""
    model = copy.deepcopy(toy.model)
    with torch.no_grad():
        h = model.hidden(toy.x_calib)
    runner = InspectRunner(model, DOWN, [h[None]], [{}])
    attn = AttnShape(1, 1, 1)
    gs = search_group(model, DOWN, a, runner, qcfg, scfg, attn)
    fold_scales(model, DOWN, gs.scales, None, attn)
    with torch.no_grad():
        w = model.mlp.down_proj.weight
        w.copy_(fake_quant(w.data, qcfg))
    return model, gs


def output_errors(toy: LoudSilence, model: nn.Module) -> dict:
    """Mean squared error of the layer output on the held-out set: all / burst / quiet tokens."""
    with torch.no_grad():
        err = (model(toy.x_eval) - toy.model(toy.x_eval)).pow(2).mean(1)  # [n_eval]
    b = toy.burst_eval
    return {"mse_all": err.mean().item(), "mse_burst": err[b].mean().item(), "mse_quiet": err[~b].mean().item()}


def rank_table(toy: LoudSilence, sal: dict) -> "pd.DataFrame":
    """Per channel group: mean rank under each metric (1 = most important) and mean value."""
    import pandas as pd

    df = pd.DataFrame({k: v.numpy() for k, v in sal.items()})
    df["group"] = toy.group
    rows = []
    for k in ("l1", "l2", "praq"):
        df[f"rank_{k}"] = df[k].rank(ascending=False)
    for grp, d in df.groupby("group"):
        rows.append({"group": grp, "n": len(d), "E|h| (l1)": d["l1"].mean(), "l2": d["l2"].mean(),
                     "praq": d["praq"].mean(), "utility": d["utility"].mean(), "risk P·S": (d["p_live"] * d["spread"]).mean(),
                     "P_live": d["p_live"].mean(), "rank l1": d["rank_l1"].mean(), "rank l2": d["rank_l2"].mean(),
                     "rank praq": d["rank_praq"].mean()})
    return pd.DataFrame(rows)


def error_table(toy: LoudSilence, sal: dict, group_sizes=(32, -1), bits: int = 4, n_grid: int = 20) -> "pd.DataFrame":
    """Output error after 4-bit AWQ of down_proj, α searched with each salience (and RTN)."""
    import pandas as pd

    rows = []
    for gsz in group_sizes:
        qcfg, scfg = QuantConfig(bits, gsz), SearchConfig(n_grid=n_grid)
        for name in ("rtn", "l1", "l2", "praq"):
            if name == "rtn":
                model = copy.deepcopy(toy.model)
                with torch.no_grad():
                    model.mlp.down_proj.weight.copy_(fake_quant(model.mlp.down_proj.weight.data, qcfg))
                alpha = float("nan")
            else:
                model, gs = quantized_copy(toy, sal[name], qcfg, scfg)
                alpha = gs.best_alpha
            rows.append({"group_size": gsz, "salience": name, "alpha": alpha, **output_errors(toy, model)})
    return pd.DataFrame(rows)


__all__ = ["GROUPS", "LoudSilence", "ToyMLP", "make_loud_silence", "saliences", "quantized_copy",
           "output_errors", "rank_table", "error_table"]
