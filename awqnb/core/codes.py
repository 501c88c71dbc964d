"""Codes from a fake-quantized weight: (q, scale, zero) recovered from Ŵ alone on awqnb's grid
(`awqnb.core.primitives`), for the packed export and for the pipeline's on-grid check of every linear."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import dequantize, expand_groups, group_view, grouped_qparams, qrange, quantize


@dataclass
class Codes:
    """One linear on awqnb's grid: q `[co, ci]` (int16, awqnb's range), scale `[co, n_group]`
    (float32), zero `[co, n_group]` (float32 holding integers; 0 when symmetric), and how many
    groups needed the lattice search because compute_qparams(Ŵ) was not their grid."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    lattice_groups: int
    max_abs_err: float


OFF_GRID_HINT = ("pack a model quantized by awqnb with the same bits/group size/symmetry, "
                 "or save it with --format fake.")


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def _misses(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig, eps: float) -> torch.Tensor:
    """`[..., n]` bool over groups `wg: [..., n, g]` (float32): requantizing with (scale, zero)
    misses some Ŵ by more than float32 noise of the scale (1e-4 of a step) plus the rounding of Ŵ
    to its own dtype (`eps` relative: Ŵ's half ulp, with a factor 2 to spare). On the group view,
    with in-place arithmetic on one temporary: the pipeline runs it on every linear."""
    lo, hi = qrange(cfg)
    s, z = scale[..., None], zero[..., None]
    d = torch.div(wg, s).round_().add_(z).clamp_(lo, hi).sub_(z).mul_(s).sub_(wg).abs_()
    return (d > wg.abs().mul_(eps).add_(1e-4 * s)).any(-1)


def _lattice(wg: torch.Tensor, zero0: torch.Tensor, cfg: QuantConfig, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero `[n]` of groups `wg: [n, g]` (float32 values of Ŵ; `eps` of Ŵ's dtype).

    Ŵ takes values k·s with k = q − zero an integer, |k| ≤ K (2^b − 1; symmetric 2^(b−1) − 1), so
    a group's largest |Ŵ| is m·s for some m in 1..K. Each m is tried, smallest first: k =
    round(Ŵ / (max|Ŵ| / m)), s refined by least squares over k (twice, re-rounding k), accepted
    when every k·s is within `_misses`' tolerance of Ŵ and the k fit the code range.
    Not the smallest gap between distinct values (the old estimate): in bf16 each value carries up
    to half an ulp of rounding, so a gap between two large values can be an ulp short of s, and
    at |k| ≈ 10 that moved k by ½ (SmolLM2 gptq, issue 21). The ratio to the largest value is off
    by at most a relative half ulp (2^-9), so at 4 bits k is off by ≤ 15·2^-9 ≪ ½: exact.
    zero: the integer in range keeping every code on the grid, nearest `zero0`. Groups no m fits
    keep s = max|Ŵ| / K (the caller then finds them off the grid).
    """
    lo, hi = qrange(cfg)
    kmax = hi if cfg.symmetric else hi - lo
    amax = wg.abs().amax(1)
    scale = torch.where(amax > 0, amax / kmax, torch.ones_like(amax))  # all zeros: any scale, k = 0
    k_lo = torch.zeros_like(amax)
    k_hi = torch.zeros_like(amax)
    todo = torch.nonzero(amax > 0).squeeze(1)
    for m in range(1, kmax + 1):
        if not todo.numel():
            break
        v = wg[todo]
        k = torch.round(v / (amax[todo] / m)[:, None])  # the largest |Ŵ| gets |k| = m
        for _ in range(2):  # check the k the caller's quantize() will get from the returned s
            s = (v.double() * k.double()).sum(1).div((k.double() ** 2).sum(1).clamp(min=1)).float()
            k = torch.round(v / s[:, None])
        fit = ((k * s[:, None] - v).abs() <= 1e-4 * s[:, None] + eps * v.abs()).all(1)
        kl, kh = k.amin(1), k.amax(1)
        if cfg.symmetric:
            fit &= (kh <= hi) & (kl >= lo)
        else:  # some zero in [lo, hi] puts every k + zero in [lo, hi]
            fit &= torch.clamp(lo - kl, min=lo) <= torch.clamp(hi - kh, max=hi)
        done, todo = todo[fit], todo[~fit]
        scale[done], k_lo[done], k_hi[done] = s[fit], kl[fit], kh[fit]
    if cfg.symmetric:
        return scale, torch.zeros_like(scale)
    z_lo = torch.clamp(lo - k_lo, min=lo)
    z_hi = torch.clamp(hi - k_hi, max=hi)
    return scale, torch.minimum(torch.maximum(zero0, z_lo), z_hi)


@torch.no_grad()
def grid_of(w: torch.Tensor, cfg: QuantConfig, name: str = "weight",
            hint: str = OFF_GRID_HINT) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(scale, zero, lattice groups) of a fake-quantized `w: [co, ci]`: float32 `[co, n_group]`
    with `quantize(w, scale, zero)` reproducing Ŵ. The codes part of `recover_codes` without
    the exact-scale refinement; cheap enough for the pipeline to check every linear it rounds.
    Raises AwqnbError naming `name` (then `hint`) when `w` is not on a `cfg` grid.

    Fast path: compute_qparams(Ŵ) is the grid whenever a group's codes still reach both ends of
    the range (or, symmetric, ±q_max). Flips can move an end code inwards, GPTQ's codes need not
    reach them, a group of one sign has zero clamped, and in bf16 the rounded ends can move the
    scale; those groups get the lattice search (`_lattice`)."""
    eps = _eps(w.dtype)
    wg = group_view(w.float(), cfg.group_size)
    scale, zero = grouped_qparams(wg, cfg)
    bad = _misses(wg, scale, zero, cfg, eps)
    n_bad = int(bad.sum())
    if n_bad:
        sub = wg[bad]
        s2, z2 = _lattice(sub, zero[bad], cfg, eps)
        scale[bad], zero[bad] = s2, z2
        still = torch.zeros_like(bad)
        still[bad] = _misses(sub, s2, z2, cfg, eps)
        if bool(still.any()):
            r, gi = (int(t) for t in torch.nonzero(still)[0])
            raise AwqnbError(
                f"{name} is not on a {cfg.bits}-bit grid with group size {cfg.group_size} "
                f"({int(still.sum())} groups off it, e.g. row {r} group {gi}): {hint}"
            )
    return scale, zero, n_bad


@torch.no_grad()
def recover_codes(w: torch.Tensor, cfg: QuantConfig, name: str = "weight") -> Codes:
    """(q, scale, zero) with `dequantize(q, scale, zero) == Ŵ` for a fake-quantized `w: [co, ci]`
    (grid from `grid_of`, scale refined by `_exact_scale`). Raises AwqnbError if `w` is not on a
    `cfg` grid (a model that was not quantized with `cfg`)."""
    wf = w.float()
    scale, zero, n_bad = grid_of(w, cfg, name)
    q = quantize(wf, scale, zero, cfg)
    scale = _exact_scale(wf, q, scale, zero, cfg, w.dtype)
    # in w's own dtype: what a load in that dtype gets (bf16 Ŵ is round_bf16(k · s))
    err = float((dequantize(q, scale, zero, cfg).to(w.dtype).float() - wf).abs().max()) if w.numel() else 0.0
    return Codes(q.to(torch.int16), scale, zero, n_bad, err)


def _exact_scale(wf: torch.Tensor, q, scale, zero, cfg: QuantConfig, dtype: torch.dtype) -> torch.Tensor:
    """Per group, the scale that reproduces Ŵ best, `[co, n_group]`.

    float32 Ŵ: the recovered scale, or Ŵ_j / k_j at the group's largest |k| (± an ulp), usually
    the quantizer's scale bit for bit since Ŵ_j = k_j · s was rounded once. A lower-precision Ŵ
    (bf16, fp16: Ŵ = round_dtype(k · s)) also gets the middle of the interval of scales that
    round every k · s of the group back to its Ŵ (it holds the quantizer's s, so it is not
    empty); candidates are ranked by weights that differ after rounding to `dtype`, then by error."""
    ci = wf.shape[1]
    k = q - expand_groups(zero, ci, cfg.group_size)
    kg, wg = group_view(k, cfg.group_size), group_view(wf, cfg.group_size)
    j = kg.abs().argmax(-1, keepdim=True)
    kj = kg.gather(-1, j).squeeze(-1)
    wj = wg.gather(-1, j).squeeze(-1)
    cand = torch.where(kj != 0, wj / torch.where(kj != 0, kj, torch.ones_like(kj)), scale)
    inf = torch.full_like(cand, float("inf"))
    cands = [cand, torch.nextafter(cand, inf), torch.nextafter(cand, -inf)]
    low = dtype in (torch.bfloat16, torch.float16)
    if low:
        wd = wg.to(dtype)
        big = torch.full_like(wd, float("inf"))
        up = (wg.double() + torch.nextafter(wd, big).double()) / 2  # rounding interval of each Ŵ
        dn = (wg.double() + torch.nextafter(wd, -big).double()) / 2
        kd = kg.double()
        nz = kd != 0
        a, b = dn / torch.where(nz, kd, torch.ones_like(kd)), up / torch.where(nz, kd, torch.ones_like(kd))
        lo = torch.where(nz, torch.minimum(a, b), torch.full_like(a, -float("inf"))).amax(-1)
        hi = torch.where(nz, torch.maximum(a, b), torch.full_like(a, float("inf"))).amin(-1)
        ok = torch.isfinite(lo) & torch.isfinite(hi) & (lo <= hi)
        cands.append(torch.where(ok, ((lo + hi) / 2).float(), scale))

    def rank(s):
        err = (kg * s[..., None] - wg).abs().amax(-1)
        if not low:
            return err
        miss = ((kg * s[..., None]).to(dtype) != wd).sum(-1).float()
        return miss * 1e30 + err  # fewer rounded mismatches first

    best, best_r = scale, rank(scale)
    for c in cands:
        r = rank(c)
        best, best_r = torch.where(r < best_r, c, best), torch.minimum(r, best_r)
    return best
