"""Heuristic-guided rounding on top of AWQ scaling: the rounders `HeuristicFlip` (awq_sh), `DynamicFlip`
(awq_dh) and `JamesSteinFlip` (awq_js, awq_gqa) (METHODS.md).

All three search and fold AWQ scales exactly like `awq`, then replace round-to-nearest of each
block linear by a greedy flip of rounding decisions that drives each output row's *expected*
error towards zero. Notation for one linear, in the current (scaled) space after folding:

    W_s: [co, ci]   the weight (W · diag(s), clipped if clipping is on)
    x/s: [n_tok, ci] its calibration inputs, μ_j = E[x_j / s_j]: [ci]
    scale, zero: [co, n_group]   the grid of Q(W_s) (primitives.compute_qparams)
    t = W_s / scale + zero       continuous codes [co, ci];  q0 = clamp(round(t), q_min, q_max)
    r = W_s − Ŵ_s,  Ŵ_s = (q − zero) · scale
    e_i = Σ_j μ_j r_ij           row i's expected output error E[(x/s) · r_i]   [co]

A flip moves `q[i,j]` one step to the other side of `t[i,j]`: `d_ij = sign(t_ij − q0_ij)`
(+1 where round went down, −1 where it went up, 0 for an exact code: never flipped) and
`q_ij = q0_ij + d_ij`; it changes `e_i` by `−δ_ij`, `δ_ij = d_ij · μ_j · scale[i, g(j)]`.
Candidates: `d ≠ 0`, `q0 + d ∈ [q_min, q_max]`, channel j not in the layer's outlier set, not
flipped yet. The greedy runs in passes, vectorised over all rows (no loop over rows or weights):

    C_i = {candidates j with 0 < δ_ij · sign(e_i) < 2|e_i|}      (each flip alone lowers |e_i|)
    flip_order 'gain' (default, METHODS.md): the sequential greedy — repeatedly apply, in every
        row, the single flip that lowers |e_i| most, j* = argmin_{j ∈ C_i} | |e_i| − |δ_ij| |,
        e_i ← e_i − δ_ij*. Computed exactly in few passes: while the largest remaining |δ| of the
        right sign is ≤ |e_i| it is the greedy's choice and e_i keeps its sign, so the first steps
        are the longest prefix of those |δ| sorted descending with sum ≤ |e_i| (one top-k: the
        "bulk" pass); then one-flip-per-row passes.
    flip_order 'boundary' (the seeds' order): sort C_i by |t_ij − q0_ij| descending (closest to
        the rounding boundary = cheapest in weight error first), prefix sums S_ik of |δ| in that
        order, k_i* = argmin_{0 ≤ k ≤ min(|C_i|, cap_i − used_i)} | |e_i| − S_ik | (ties → fewest
        flips); apply the first k_i* flips.
    Repeat until no row has a candidate (no single remaining flip lowers any |e_i|), or 32 passes.

Every pass can only lower each |e_i| (each 'gain' flip does alone; a 'boundary' prefix may be
empty), so |e_i| never rises; flips stay in range; outlier channels are never touched; no weight
flips twice. `cap_i` (flips per row) is unlimited for awq_sh/awq_js and
`max(1, floor(max_flip_percent / 100 · ci))` for awq_dh.

Estimating μ: by default from the block's streaming channel statistics over every calibration
token (exact, no extra memory): `μ = E[x] / s`, `Var(x/s) = Var(x) / s²`. With
`max_tokens_per_sample = N > 0`, μ and the variance come instead from at most N evenly spaced
tokens of each calibration sample (the seeds' memory-saving subsample; it adds estimation noise,
which is what awq_js's shrinkage is for).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.kneedle import knee_outliers
from awqnb.core.primitives import compute_qparams, dequantize, expand_groups, qrange
from awqnb.quant.methods.base import BlockContext, Nearest, apply_code_delta, channel_salience, code_delta

__all__ = ["HeuristicFlip", "DynamicFlip", "JamesSteinFlip", "greedy_flip", "code_delta", "apply_code_delta",
           "james_stein", "input_moments", "top_percent", "row_error", "FlipResult"]

log = logging.getLogger(__name__)

MAX_PASSES = 32
BULK_TOPK = 32  # the bulk pass looks at the 32 largest right-signed |δ| per row (full sort if not enough)
FLIP_ORDERS = ("gain", "boundary")


def acc_dtype(device: torch.device) -> torch.dtype:
    """float64 for error sums where the device has it (MPS does not)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@dataclass
class FlipResult:
    """Outcome of `greedy_flip` on one weight `[co, ci]`.

    q0, q: integer codes before/after flipping (float tensors holding integers) `[co, ci]`;
    scale, zero: `[co, n_group]`; e_before, e_after: per-row expected error `[co]`
    (recomputed from the codes); n_flips: flips per row `[co]`; passes: greedy passes run.
    """

    q0: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    e_before: torch.Tensor
    e_after: torch.Tensor
    n_flips: torch.Tensor
    passes: int


def row_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, mu: torch.Tensor,
              cfg: QuantConfig) -> torch.Tensor:
    """`e_i = Σ_j μ_j (W[i,j] − Ŵ[i,j])`, `[co]`, accumulated in float64 (where available)."""
    acc = acc_dtype(w.device)
    r = w.to(acc) - dequantize(q, scale, zero, cfg).to(acc)
    return r @ mu.to(device=w.device, dtype=acc)


def _gain_passes(e, used, g_abs, dsign, d, s_full, mu_acc, max_flips, max_passes, keep, exact_e) -> int:
    """flip_order 'gain': the sequential greedy "take the flip leaving the smallest |e_i|, repeat",
    for all rows at once. Updates e `[co]`, used `[co]`, g_abs `[co, ci]` (−1 marks a flip) in
    place; returns the passes run. `exact_e()` recomputes e from the codes.

    Bulk pass: while the largest remaining right-signed |δ| is ≤ |e_i|, it is the greedy choice
    and e_i keeps its sign, so the greedy's first steps are the longest prefix of the right-signed
    |δ| sorted descending with prefix sum ≤ |e_i| (capped) — one sort. Then single-flip passes
    (one flip per row each: argmin ||e_i| − |δ_ij||) over the rows that still flip.
    """
    co, ci = g_abs.shape
    dev = g_abs.device
    inf = float("inf")
    ar = torch.arange(ci, device=dev)
    # bulk pass
    right = (dsign == torch.sign(e).to(dsign.dtype)[:, None]) & (g_abs > 0)
    cand = torch.where(right, g_abs, torch.zeros_like(g_abs))
    del right

    def prefix(c, ea):
        kk = min(c.shape[1], BULK_TOPK, max_flips if max_flips is not None else c.shape[1])
        vals, idx = torch.topk(c, kk, dim=1)  # descending
        k = ((torch.cumsum(vals.to(e.dtype), 1) <= ea.abs()[:, None] * keep) & (vals > 0)).sum(1)
        if max_flips is not None:
            k = torch.clamp(k, max=max_flips)
        return k, idx, kk

    k, idx, kk = prefix(cand, e)
    full = (k == kk) & (kk < min(ci, max_flips if max_flips is not None else ci))  # prefix may go on
    passes = 0
    sel = torch.zeros_like(cand, dtype=torch.bool).scatter_(1, idx, torch.arange(kk, device=dev)[None, :] < k[:, None])
    if bool(full.any()):  # rare: redo those rows with a full sort
        r = torch.nonzero(full).flatten()
        vals, perm = torch.sort(cand[r], dim=1, descending=True)
        kr = ((torch.cumsum(vals.to(e.dtype), 1) <= e[r].abs()[:, None] * keep) & (vals > 0)).sum(1)
        if max_flips is not None:
            kr = torch.clamp(kr, max=max_flips)
        sel[r] = torch.zeros_like(vals, dtype=torch.bool).scatter_(1, perm, ar[None, :] < kr[:, None])
        k[r] = kr
    del cand
    if bool((k > 0).any()):
        passes = 1
        g_abs.masked_fill_(sel, -1.0)
        used += k
        e.copy_(exact_e())
    del sel
    rows = torch.arange(co, device=dev)
    while passes < max_passes and rows.numel():
        ga = g_abs[rows]
        ea = e[rows]
        ok = (dsign[rows] == torch.sign(ea).to(dsign.dtype)[:, None]) & (ga > 0)
        if max_flips is not None:
            ok &= (used[rows] < max_flips)[:, None]
        score = torch.where(ok, (ea.abs().to(ga.dtype)[:, None] - ga).abs(), torch.full_like(ga, inf))
        best, j = score.min(1)
        step = d[rows, j].to(e.dtype) * s_full[rows, j].to(e.dtype) * mu_acc[j]
        go = torch.isfinite(best) & ((ea - step).abs() < ea.abs() * keep)
        if not bool(go.any()):
            break
        passes += 1
        rows, j = rows[go], j[go]  # a row that did not flip has no helpful flip left
        e[rows] = ea[go] - step[go]
        g_abs[rows, j] = -1.0
        used[rows] += 1
    return passes


@torch.no_grad()
def greedy_flip(w: torch.Tensor, mu: torch.Tensor, cfg: QuantConfig, frozen: torch.Tensor | None = None,
                max_flips: int | None = None, order: str = "gain", max_passes: int = MAX_PASSES) -> FlipResult:
    """Heuristic-guided global greedy rounding of `w: [co, ci]` (module docstring).

    mu: `[ci]` mean input in w's space. frozen: `[ci]` bool, channels never flipped (outliers).
    max_flips: at most this many flips per row (None: unlimited). order: 'gain' or 'boundary'.
    Selection works on float32 |δ| with a relative margin of 1e-6 (a flip is taken only if it
    lowers |e_i| by more than float32 noise); e_i is tracked in float64 with the exact δ.
    """
    if order not in FLIP_ORDERS:
        raise AwqnbError(f"flip_order={order!r} is unknown; use one of {FLIP_ORDERS}.")
    co, ci = w.shape
    dev = w.device
    acc = acc_dtype(dev)
    wf = w.float()
    scale, zero = compute_qparams(wf, cfg)
    s_full = expand_groups(scale, ci, cfg.group_size)
    z_full = expand_groups(zero, ci, cfg.group_size)
    lo, hi = qrange(cfg)
    ws = wf / s_full
    q0 = torch.clamp(torch.round(ws) + z_full, lo, hi)  # = primitives.quantize(w, scale, zero, cfg)
    rc = ws.add_(z_full).sub_(q0)  # t − q0: the rounding residual in code units
    d = torch.sign(rc)
    ok = (d != 0) & (q0 + d >= lo) & (q0 + d <= hi)
    if frozen is not None:
        ok &= ~frozen.to(dev)[None, :]
    mu32 = mu.to(device=dev, dtype=torch.float32)
    mu_acc = mu.to(device=dev, dtype=acc)
    delta = d * s_full * mu32[None, :]  # a flip changes e_i by −δ_ij (float32, for selection)
    g_abs = torch.where(ok, delta.abs(), torch.zeros_like(delta))  # 0: not a candidate, −1: flipped
    dsign = torch.sign(delta)
    key = rc.abs() if order == "boundary" else None
    del ws, delta
    e0 = row_error(wf, q0, scale, zero, mu_acc, cfg)
    e = e0.clone()
    used = torch.zeros(co, dtype=torch.long, device=dev)
    ar = torch.arange(ci, device=dev)
    act = torch.arange(co, device=dev)  # rows that may still flip: a row without candidates never gets any
    inf = float("inf")
    keep = 1.0 - 1e-6
    passes = 0
    if order == "gain":
        def exact_e():
            return row_error(wf, q0 + torch.where(g_abs < 0, d, torch.zeros_like(d)), scale, zero, mu_acc, cfg)

        passes = _gain_passes(e, used, g_abs, dsign, d, s_full, mu_acc, max_flips, max_passes, keep, exact_e)
    while order == "boundary" and act.numel() and passes < max_passes:
        ea = e[act]
        ga = g_abs[act]
        right = dsign[act] == torch.sign(ea).to(dsign.dtype)[:, None]
        if max_flips is not None:
            right &= (used[act] < max_flips)[:, None]
        cand = right & (ga > 0) & (ga.to(acc) < 2 * keep * ea.abs()[:, None])
        limit = cand.sum(1)
        if max_flips is not None:
            limit = torch.minimum(limit, max_flips - used[act])
        if not bool((limit > 0).any()):
            break
        passes += 1
        perm = torch.argsort(torch.where(cand, key[act], torch.full_like(ga, -1.0)), dim=1, descending=True,
                             stable=True)
        exact = (d[act] * s_full[act]).to(acc) * mu_acc[None, :] * torch.sign(ea)[:, None]  # exact gains
        g_sorted = torch.gather(torch.where(cand, exact, torch.zeros_like(exact)), 1, perm)
        resid = (ea.abs()[:, None] - torch.cumsum(g_sorted, 1)).abs()  # |e_i| after the first k+1 flips
        resid = torch.where(ar[None, :] < limit[:, None], resid, torch.full_like(resid, inf))
        best = torch.argmin(torch.cat([ea.abs()[:, None], resid], 1), 1)  # first minimum: fewest flips
        sel = torch.zeros_like(cand).scatter_(1, perm, ar[None, :] < best[:, None])
        e[act] = ea - torch.where(sel, exact, torch.zeros_like(exact)).sum(1) * torch.sign(ea)
        g_abs[act] = torch.where(sel, torch.full_like(ga, -1.0), ga)
        used[act] += best
        act = act[best > 0]  # a row whose best prefix is empty has no helpful flip in this order
    flipped = g_abs < 0
    q = q0 + torch.where(flipped, d, torch.zeros_like(d))
    e_after = row_error(wf, q, scale, zero, mu_acc, cfg)
    return FlipResult(q0, q, scale, zero, e0, e_after, used, max(passes, 0))


def james_stein(mu: torch.Tensor, var: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """James-Stein shrinkage of channel means towards their grand mean.

    mu: `[p]` sample means, var: `[p]` per-channel variances of single tokens, n: tokens.
        μ̄ = mean_j μ_j,   σ² = mean_j var_j (pooled),
        c = (1 − (p − 2) σ² / (n ‖μ − μ̄‖²))₊,   μ_JS = μ̄ + c (μ − μ̄)
    Returns (μ_JS `[p]`, c). p ≤ 2 leaves μ unchanged (c = 1); ‖μ − μ̄‖ = 0 gives c = 0
    (μ_JS = μ̄ = μ), or 1 when σ² = 0 too.
    """
    p = mu.numel()
    mu64 = mu.double()
    if p <= 2:
        return mu.clone(), 1.0
    mbar = mu64.mean()
    dev = mu64 - mbar
    ss = float((dev * dev).sum())
    s2 = float(var.double().mean())
    if ss <= 0.0:
        c = 1.0 if s2 <= 0.0 else 0.0
    else:
        c = max(0.0, 1.0 - (p - 2) * s2 / (max(n, 1) * ss))
    return (mbar + c * dev).to(mu.dtype), c


def even_positions(T: int, n: int, device) -> torch.Tensor:
    """At most `n` evenly spread positions in `range(T)` (all of them when n ≥ T). Clamped: above
    2**24 float32 rounds T − 1 up to T, one past the end (an 8B MLP linear's weights)."""
    if n >= T:
        return torch.arange(T, device=device)
    return torch.linspace(0, T - 1, n, device=device).round().long().clamp_(max=T - 1).unique()


def input_moments(ctx: BlockContext, key: str, max_tokens_per_sample: int = 0):
    """Mean `[c]`, per-channel variance `[c]` (float64) and token count of the inputs at `key`, in
    the current (scaled) space: from the streaming stats (all tokens) or, with
    `max_tokens_per_sample > 0`, from at most that many evenly spaced tokens per sample."""
    s = ctx.scale_of.get(key)
    if max_tokens_per_sample <= 0:
        st = ctx.stats[key]
        n = st.n
        m = st.sum / n
        var = (st.sq_sum / n - m * m).clamp(min=0)
        if s is not None:
            s64 = s.to(device=m.device, dtype=m.dtype)
            m, var = m / s64, var / (s64 * s64)
        return m, var, n
    tot = sq = None
    n = 0
    # inputs may be offloaded to the CPU: compute where the block is
    dev = next(ctx.block.parameters()).device if ctx.block is not None else ctx.inputs[key][0].device
    for x in ctx.inputs[key]:
        x = x.to(dev)
        x = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
        pos = even_positions(x.shape[1], max_tokens_per_sample, x.device)
        xs = x[:, pos, :].reshape(-1, x.shape[-1]).double()
        if tot is None:
            tot = torch.zeros(xs.shape[1], dtype=torch.float64, device=xs.device)
            sq = torch.zeros_like(tot)
        tot += xs.sum(0)
        sq += xs.pow(2).sum(0)
        n += xs.shape[0]
    m = tot / n
    return m, (sq / n - m * m).clamp(min=0), n


def top_percent(salience: torch.Tensor, percent: float) -> torch.Tensor:
    """Mask `[c]` of the `floor(c · percent / 100)` channels of largest salience."""
    c = salience.numel()
    k = int(c * percent / 100.0)
    mask = torch.zeros(c, dtype=torch.bool, device=salience.device)
    if k > 0:
        mask[torch.topk(salience.float(), k).indices] = True
    return mask


def _summary(v: torch.Tensor) -> dict:
    a = v.abs().double()
    return {"mean": float(a.mean()), "max": float(a.max())} if a.numel() else {"mean": 0.0, "max": 0.0}


class HeuristicFlip(Nearest):
    """The rounder of awq_sh: heuristic-guided global greedy rounding (module docstring).

    μ_j = E[x_j / s_j]; outliers: the top `outlier_percent` % of input channels by salience
    (`SearchConfig.salience`, raw inputs before scaling), never flipped; no cap on flips per row.
    Params: use_heuristic (False: plain awq rounding), outlier_percent (5.0, in %),
    max_tokens_per_sample (0 = every calibration token via streaming stats; N > 0: μ from at most
    N evenly spaced tokens per sample), flip_order ('gain' per METHODS.md, or the seeds'
    'boundary').
    Evidence (ctx.evidence['flip'][linear]): flips, flip_frac, passes, |e| before/after per row
    (mean, max), outlier_frac.
    """

    PARAMS = {"use_heuristic": True, "outlier_percent": 5.0, "max_tokens_per_sample": 0, "flip_order": "gain"}
    needs_calibration = True

    def setup(self):
        p = self.params
        if "outlier_percent" in p and not 0.0 <= float(p["outlier_percent"]) < 100.0:
            raise AwqnbError(f"outlier_percent={p['outlier_percent']} must lie in [0, 100) (it is in %: 5 = 5%).")
        if int(p.get("max_tokens_per_sample", 0)) < 0:
            raise AwqnbError("max_tokens_per_sample must be >= 0 (0 = use every calibration token).")
        if p.get("flip_order", "gain") not in FLIP_ORDERS:
            raise AwqnbError(f"flip_order={p['flip_order']!r} is unknown; use one of {FLIP_ORDERS}.")
        self._cache: dict = {}  # (block index, input key) → (μ, outlier mask, info) for this block

    # -- hooks for the variants ------------------------------------------------------------
    def mean_input(self, ctx: BlockContext, key: str) -> tuple[torch.Tensor, dict]:
        """μ `[ci]` at an input point (current space) and evidence about it."""
        m, _var, _n = input_moments(ctx, key, int(self.params["max_tokens_per_sample"]))
        return m, {}

    def outliers(self, ctx: BlockContext, key: str) -> torch.Tensor:
        """`[ci]` bool mask of channels never flipped."""
        sal = channel_salience(ctx.stats[key], self.cfg.search.salience)
        return top_percent(sal, float(self.params["outlier_percent"]))

    def max_flips(self, ci: int) -> int | None:
        """Cap on flips per output row (None: unlimited)."""
        return None

    # -- the method interface ----------------------------------------------------------------
    def _key_state(self, ctx: BlockContext, key: str):
        ck = (ctx.index, key)
        if ck not in self._cache:
            mu, info = self.mean_input(ctx, key)
            mask = self.outliers(ctx, key)
            self._cache[ck] = (mu, mask, info)
        return self._cache[ck]

    def _round(self, ctx: BlockContext, name: str, lin: nn.Linear) -> FlipResult:
        key = ctx.input_key[name]
        mu, mask, info = self._key_state(ctx, key)
        res = greedy_flip(lin.weight.data, mu, self.cfg.quant, frozen=mask,
                          max_flips=self.max_flips(lin.in_features), order=self.params["flip_order"])
        n = int(res.n_flips.sum())
        ev = {
            "flips": n,
            "flip_frac": n / lin.weight.numel(),
            "max_flips_row": int(res.n_flips.max()) if res.n_flips.numel() else 0,
            "passes": res.passes,
            "e_before": _summary(res.e_before),
            "e_after": _summary(res.e_after),
            "outlier_frac": float(mask.float().mean()),
        }
        ev.update(info)
        ctx.evidence.setdefault("flip", {})[name] = ev
        log.debug("block %d %s: %d flips, mean |e| %.3g -> %.3g", ctx.index, name, n,
                  ev["e_before"]["mean"], ev["e_after"]["mean"])
        return res

    @torch.no_grad()
    def round_linear(self, ctx: BlockContext | None, name: str, lin: nn.Linear) -> dict | None:
        """Greedy-flip rounding of one linear; returns `code_delta` replay data."""
        if ctx is None or not self.params["use_heuristic"]:
            return super().round_linear(ctx, name, lin)
        res = self._round(ctx, name, lin)
        lin.weight.data.copy_(dequantize(res.q, res.scale, res.zero, self.cfg.quant).to(lin.weight.dtype))
        return code_delta(res.q0, res.q)

    @torch.no_grad()
    def round_codes(self, ctx: BlockContext, name: str, lin: nn.Linear):
        """Greedy-flip rounding of one linear, returning (replay, (q0, q, scale, zero)) (`Nearest.round_codes`)."""
        if not self.params["use_heuristic"]:
            return super().round_codes(ctx, name, lin)
        res = self._round(ctx, name, lin)
        lin.weight.data.copy_(dequantize(res.q, res.scale, res.zero, self.cfg.quant).to(lin.weight.dtype))
        return code_delta(res.q0, res.q), (res.q0, res.q, res.scale, res.zero)

    # replay_linear: Nearest's (round to nearest, then add the recorded code changes)

    def finish_block(self, ctx: BlockContext) -> None:
        self._cache = {k: v for k, v in self._cache.items() if k[0] != ctx.index}


class DynamicFlip(HeuristicFlip):
    """The rounder of awq_dh: HeuristicFlip with per-layer outliers from the knee of the sorted salience curve
    (kneedle.knee_outliers, `knee_tolerance`) and at most
    `cap = max(1, floor(max_flip_percent / 100 · ci))` flips per output row (0 → no flips).
    Params: use_heuristic, knee_tolerance (0.0), max_flip_percent (1.0, in % of ci),
    max_tokens_per_sample, flip_order. Evidence adds ctx.evidence['outlier_frac'][linear].
    """

    PARAMS = {"use_heuristic": True, "knee_tolerance": 0.0, "max_flip_percent": 1.0, "max_tokens_per_sample": 0,
              "flip_order": "gain"}

    def setup(self):
        super().setup()
        if not 0.0 <= float(self.params["max_flip_percent"]) <= 100.0:
            raise AwqnbError("max_flip_percent must lie in [0, 100] (% of a row's input channels).")

    def outliers(self, ctx: BlockContext, key: str) -> torch.Tensor:
        sal = channel_salience(ctx.stats[key], self.cfg.search.salience)
        return knee_outliers(sal, float(self.params["knee_tolerance"]))

    def max_flips(self, ci: int) -> int | None:
        pct = float(self.params["max_flip_percent"])
        return 0 if pct <= 0 else max(1, int(ci * pct / 100.0))

    def _round(self, ctx, name, lin):
        res = super()._round(ctx, name, lin)
        ctx.evidence.setdefault("outlier_frac", {})[name] = ctx.evidence["flip"][name]["outlier_frac"]
        return res


class JamesSteinFlip(HeuristicFlip):
    """The rounder of awq_js: HeuristicFlip with μ replaced by its James-Stein shrinkage (`james_stein`):
    `μ_JS = μ̄ + (1 − (p − 2)·σ²/(n·‖μ − μ̄‖²))₊ (μ − μ̄)`, p = ci, σ² the pooled (mean over
    channels) variance of x/s, n the token count (all tokens, or the subsample of
    max_tokens_per_sample). Same params as awq_sh. Evidence adds ctx.evidence['js_factor'][input
    point] = the shrinkage factor c (1: no shrinkage, 0: all channels set to the grand mean).
    """

    def mean_input(self, ctx: BlockContext, key: str) -> tuple[torch.Tensor, dict]:
        m, var, n = input_moments(ctx, key, int(self.params["max_tokens_per_sample"]))
        mu, c = james_stein(m, var, n)
        ctx.evidence.setdefault("js_factor", {})[key] = c
        return mu, {"js_factor": c}
