"""Pure tensor math for group-wise uniform quantization: the ONE place the grid convention lives.

Convention (METHODS.md), per output row and per group of `g` input channels of `W: [co, ci]`:
  asymmetric: scale = (max - min).clamp(min=1e-5) / (2**b - 1)
              zero  = clamp(round(-min / scale), 0, 2**b - 1)
              q     = clamp(round(W / scale) + zero, 0, 2**b - 1)
  symmetric:  scale = absmax.clamp(min=1e-5) / (2**(b-1) - 1),  zero = 0
              q     = clamp(round(W / scale), -(2**(b-1) - 1), 2**(b-1) - 1)
  dequant:    W_hat = (q - zero) * scale
`g = -1` is one group per row. When `ci % g != 0` the last group of each row is shorter
(`ci - (n_group - 1) * g` channels); its statistics use only its own channels.
"""
from __future__ import annotations

import math

import torch

from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError

SCALE_EPS = 1e-5


def effective_group_size(ci: int, group_size: int) -> int:
    """Group size actually used for a layer with `ci` input channels (-1 → ci)."""
    if group_size == -1:
        return ci
    if group_size > ci:
        raise AwqnbError(
            f"group_size={group_size} is larger than a layer's {ci} input channels; "
            f"use a group size <= {ci} (e.g. 64 or 128) or -1 for per-channel."
        )
    return group_size


def n_groups(ci: int, group_size: int) -> int:
    """Number of groups per row (the last one may be partial)."""
    return math.ceil(ci / effective_group_size(ci, group_size))


def qrange(cfg: QuantConfig) -> tuple[int, int]:
    """(q_min, q_max) of the integer grid."""
    if cfg.symmetric:
        m = 2 ** (cfg.bits - 1) - 1
        return -m, m
    return 0, 2**cfg.bits - 1


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[co, ci]` → `[co, n_group, g]`, padding a partial last group by repeating its last column.

    Repeating a column of the same group leaves that group's min, max and absmax unchanged, so
    statistics taken over the padded view are those of the real (shorter) group.
    """
    co, ci = w.shape
    g = effective_group_size(ci, group_size)
    pad = (-ci) % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(co, pad)], dim=1)
    return w.reshape(co, -1, g)


def expand_groups(p: torch.Tensor, ci: int, group_size: int) -> torch.Tensor:
    """Per-group parameters `[co, n_group]` → per-column `[co, ci]`."""
    g = effective_group_size(ci, group_size)
    co, n_g = p.shape
    return p[:, :, None].expand(co, n_g, g).reshape(co, n_g * g)[:, :ci]


def compute_qparams(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per (row, group): both `[co, n_group]` (zero is 0 when symmetric).

    Computed in float32 whatever the weight dtype, so bf16 models get the same grid.
    """
    return grouped_qparams(group_view(w.float(), cfg.group_size), cfg)


def grouped_qparams(wg: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """compute_qparams on a group view `[co, n_group, g]` (float32)."""
    if cfg.symmetric:
        qmax = 2 ** (cfg.bits - 1) - 1
        scale = wg.abs().amax(dim=-1).clamp(min=SCALE_EPS) / qmax
        zero = torch.zeros_like(scale)
    else:
        qmax = 2**cfg.bits - 1
        wmin = wg.amin(dim=-1)
        wmax = wg.amax(dim=-1)
        scale = (wmax - wmin).clamp(min=SCALE_EPS) / qmax
        zero = torch.clamp(torch.round(-wmin / scale), 0, qmax)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Integer codes `[co, ci]` (float tensor holding integers) for given qparams `[co, n_group]`."""
    ci = w.shape[1]
    s = expand_groups(scale, ci, cfg.group_size)
    z = expand_groups(zero, ci, cfg.group_size)
    lo, hi = qrange(cfg)
    return torch.clamp(torch.round(w.float() / s) + z, lo, hi)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """`(q - zero) * scale`, float32 `[co, ci]`."""
    ci = q.shape[1]
    return (q - expand_groups(zero, ci, cfg.group_size)) * expand_groups(scale, ci, cfg.group_size)


def fake_quant(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Round-to-nearest `Q(W)`, returned in `w`'s dtype.

    The same arithmetic as dequantize(quantize(...)), done on the group view `[co, n_group, g]`
    so that the per-group parameters broadcast instead of being expanded to `[co, ci]`."""
    co, ci = w.shape
    wg = group_view(w.float(), cfg.group_size)
    scale, zero = grouped_qparams(wg, cfg)
    scale, zero = scale[..., None], zero[..., None]
    lo, hi = qrange(cfg)
    out = (torch.clamp(torch.round(wg / scale) + zero, lo, hi) - zero) * scale
    return out.reshape(co, -1)[:, :ci].contiguous().to(w.dtype)


def check_weight(name: str, w: torch.Tensor) -> None:
    """Refuse NaN/Inf weights with a message naming the tensor."""
    # one fp32 sum is finite iff every element is (NaN and Inf propagate); only an overflowing
    # sum falls through to the exact elementwise check. 20x faster than isfinite(w).all() on CPU.
    if w.is_floating_point() and torch.isfinite(w.sum(dtype=torch.float32)):
        return
    if not torch.isfinite(w).all():
        raise AwqnbError(
            f"weight {name} contains NaN or Inf values; the checkpoint is damaged or was saved in a "
            "dtype that overflowed — re-export it in float32/bfloat16 before quantizing."
        )
