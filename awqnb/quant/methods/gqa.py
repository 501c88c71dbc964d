"""awq_gqa: awq_js, then ReFlip of q_proj's integer weights against the attention-score error.

Per query head h, reading kv head g = h // n_rep (GQA; `AttnShape` from the config), with the
block's calibration inputs `X: [n_tok, H]` of the q/k/v group in the current (scaled) space,
`Gx = XᵀX / n_tok: [H, H]`, FP scaled weights `Wq_h: [hd, H]`, `Wk_g: [hd, H]` (taken before
rounding) and the rounded ones `Ŵq_h`, `Ŵk_g` (k_proj as awq_js rounded it — the keys the model
will really use), the objective is the mean squared error of the raw (pre-RoPE, and for Gemma3
pre-q_norm/k_norm) attention scores over all pairs of calibration tokens:

    J_h = E_{t,u}[(q̂_t·k̂_u − q_t·k_u)²] = ‖X Ŵq_hᵀ Ŵk_g Xᵀ − X Wq_hᵀ Wk_g Xᵀ‖²_F / n_tok²
        = ⟨Ŵq Gx Ŵqᵀ, Gk⟩ − 2 tr(Ŵq Gx Wqᵀ · C) + ⟨Wq Gx Wqᵀ, Wk Gx Wkᵀ⟩
    with Gk = Ŵk_g Gx Ŵk_gᵀ, C = Wk_g Gx Ŵk_gᵀ  ([hd, hd]).

With RoPE (`gqa_rope`, default on) the objective is the error of the scores the model computes:
Llama and Gemma score `(R_t q_t)·(R_u k_u) = q_tᵀ M_Δ k_u`, `M_Δ = a²·rot(Δ)` for the offset
`Δ = u − t` (a: the rotary attention scaling, 1 for plain RoPE). For a fixed set of causal offsets
`D = {0, −1, −2, −4, …}` (powers of two up to the calibration length; `rope_rotations`),

    J_h^RoPE = mean_{Δ∈D} E_{t,u}[(q̂_tᵀ M_Δ k̂_u − q_tᵀ M_Δ k_u)²]

is the same formula with the keys' weights `M_Δ Wk_g` — still quadratic in Ŵq_h, with `Gk`, `C`
and the constant replaced by their averages `mean_Δ M_Δ (·) M_Δᵀ` (`_rope_average`). Gemma3's
q_norm/k_norm (per-head RMSNorms before RoPE) stay outside the objective, as before. The cos/sin
are the block's own `position_embeddings` (so Gemma's local and global layers get their own bases).
Evidence reports both the pre-RoPE and the post-RoPE score error, whichever was minimised.

Everything goes through the Gram matrix, so J covers *every* calibration token pair (t, u)
(also pairs from different samples and u > t: the score error, not the masked attention) at
the cost of one `XᵀX` pass — no token subsampling is needed; `max_tokens_per_sample > 0`
subsamples the Gram pass like μ.

A ±1 code flip `c = ±scale[r, g(j)]` on weight (row r = h·hd + d, column j) changes J by
    ΔJ = 2c·M[j, d] + c²·Gx[j, j]·Gk[d, d],   M_h = Gx (Ŵq_hᵀ Gk − Wq_hᵀ C): [H, hd]
and a set F of flips in distinct dims by Σ_F 2c_f M[j_f, d_f] + Σ_{F×F} c_f c_f' Gx[j_f, j_f'] Gk[d_f, d_f'].

ReFlip, per head, vectorised over heads: only the `n_crit = max(1, floor(critical_dim_pct·hd))`
critical dims with the largest key magnitude `Gk[d, d] = E[k̂_d²]` are touched, each at most
`cap = max(1, floor(max_flip_pct·H))` times. Each iteration takes, in every critical dim, the
flip (column j, sign −sign(M[j, d])) with the lowest ΔJ among those keeping the code in range;
sorts the dims by it; and applies the prefix of them whose *joint* ΔJ (exact, with the cross
terms) is lowest — at least the single best flip, so J strictly falls. Stops automatically when
no flip lowers J in any head (or every cap is used). M and J are updated exactly (rank-|F|).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import dequantize, expand_groups, qrange
from awqnb.model.arch import AttnShape, get_module
from awqnb.quant.methods.base import BlockContext, Step
from awqnb.quant.methods.rounding import acc_dtype, even_positions

log = logging.getLogger(__name__)


def gram(xs: list[torch.Tensor], max_tokens_per_sample: int = 0, device=None) -> tuple[torch.Tensor, int]:
    """`Gx = XᵀX / n_tok: [H, H]` (float64 where available) over chunks `[b, T, H]`, optionally
    from at most `max_tokens_per_sample` evenly spaced tokens per sample; returns (Gx, n_tok).
    device: where to compute (chunks offloaded to the CPU are moved there one at a time)."""
    g = None
    n = 0
    for x in xs:
        x = x.to(device) if device is not None else x
        x = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
        if max_tokens_per_sample > 0:
            x = x[:, even_positions(x.shape[1], max_tokens_per_sample, x.device), :]
        xf = x.reshape(-1, x.shape[-1]).float()
        part = (xf.T @ xf).to(acc_dtype(xf.device))
        g = part if g is None else g + part
        n += xf.shape[0]
    if g is None:
        raise AwqnbError("ReFlip needs the q/k/v calibration inputs but none were captured.")
    return g / max(n, 1), n


def _heads(w: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    return w.reshape(n, hd, -1)


def rope_offsets(seqlen: int) -> list[int]:
    """The causal offsets Δ = u − t of the RoPE objective: 0, −1, −2, −4, … down to −(seqlen−1)."""
    out, p = [0], 1
    while p < seqlen:
        out.append(-p)
        p *= 2
    return out


def rope_rotations(cos: torch.Tensor, sin: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """`M_Δ: [n_off, hd, hd]` with `(R_t q)·(R_u k) = qᵀ M_{u−t} k` for HF's rotate-half RoPE
    (`q·cos + rotate_half(q)·sin`), from the block's cos/sin `[..., T, hd]` at positions 0..T−1.

    R_p = diag(cos_p) + diag(sin_p)·P (P = rotate_half as a matrix); with cos_p = a·cos(pθ),
    R_tᵀ R_u = a²·rot(u − t), and rot(−p) = rot(p)ᵀ, so M_{−p} = a·R_pᵀ (a = cos_0)."""
    cos = cos.reshape(-1, cos.shape[-2], cos.shape[-1])[0].double()  # [T, hd]
    sin = sin.reshape(-1, sin.shape[-2], sin.shape[-1])[0].double()
    hd = cos.shape[-1]
    half = hd // 2
    rot_half = torch.zeros(hd, hd, dtype=torch.float64, device=cos.device)
    idx = torch.arange(half, device=cos.device)
    rot_half[idx, idx + half] = -1.0  # rotate_half(x)[i] = −x[i + hd/2]
    rot_half[idx + half, idx] = 1.0   # rotate_half(x)[i + hd/2] = x[i]
    a = cos[0].mean()  # attention scaling (cos of angle 0)
    mats = []
    for d in offsets:
        p = abs(d)
        if p >= cos.shape[0]:
            raise AwqnbError(f"RoPE offset {d} is beyond the {cos.shape[0]} calibration positions.")
        r = torch.diag(cos[p]) + torch.diag(sin[p]) @ rot_half  # R_p
        mats.append(a * (r.T if d <= 0 else r))
    return torch.stack(mats)


def _rope_average(mat: torch.Tensor, rot: torch.Tensor | None) -> torch.Tensor:
    """`mean_Δ M_Δ mat M_Δᵀ` for `mat: [nh, hd, hd]`, `rot: [n_off, hd, hd]` (mat when rot is None)."""
    if rot is None:
        return mat
    rot = rot.to(mat.dtype)
    return torch.einsum("oij,hjk,olk->hil", rot, mat, rot) / rot.shape[0]


def score_error(gx: torch.Tensor, wq_hat: torch.Tensor, wq: torch.Tensor, wk_hat: torch.Tensor,
                wk: torch.Tensor, attn: AttnShape, rot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head: (J_h `[n_heads]`, reference `E[(q_t·k_u)²]` `[n_heads]`); with `rot`
    (`rope_rotations`), the post-RoPE J_h^RoPE and reference averaged over its offsets.

    wq_hat, wq: `[n_heads·hd, H]`; wk_hat, wk: `[n_kv·hd, H]` (module docstring), kv head h // n_rep.
    """
    acc = gx.dtype
    hd = attn.head_dim
    kv = torch.arange(attn.n_heads, device=gx.device) // attn.n_rep
    qh, q = _heads(wq_hat.to(acc), attn.n_heads, hd), _heads(wq.to(acc), attn.n_heads, hd)
    kh, k = _heads(wk_hat.to(acc), attn.n_kv, hd)[kv], _heads(wk.to(acc), attn.n_kv, hd)[kv]
    gk = _rope_average(kh @ gx @ kh.transpose(1, 2), rot)
    c = _rope_average(k @ gx @ kh.transpose(1, 2), rot)
    skk = _rope_average(k @ gx @ k.transpose(1, 2), rot)
    sqq = q @ gx @ q.transpose(1, 2)
    j = ((qh @ gx @ qh.transpose(1, 2)) * gk).sum((1, 2)) \
        - 2 * ((qh @ gx @ q.transpose(1, 2)) * c.transpose(1, 2)).sum((1, 2)) + (sqq * skk).sum((1, 2))
    return j.clamp(min=0), (sqq * skk).sum((1, 2))


@dataclass
class ReflipResult:
    """codes: q_proj codes after ReFlip `[n_heads·hd, H]`; j_before/j_after/ref: `[n_heads]`;
    flips: `[n_heads]`; dim_flips: flips per critical dim `[n_heads, n_crit]`; dims: the
    critical dims `[n_heads, n_crit]`; cap: flips allowed per dim; iterations run."""

    codes: torch.Tensor
    j_before: torch.Tensor
    j_after: torch.Tensor
    ref: torch.Tensor
    flips: torch.Tensor
    dim_flips: torch.Tensor
    dims: torch.Tensor
    cap: int
    iterations: int


@torch.no_grad()
def reflip(gx: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wk_hat: torch.Tensor, codes: torch.Tensor,
           scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig, attn: AttnShape,
           critical_dim_pct: float = 0.15, max_flip_pct: float = 0.05, max_iters: int | None = None,
           rot: torch.Tensor | None = None) -> ReflipResult:
    """Greedy ReFlip of q_proj codes `[n_heads·hd, H]` (module docstring).

    gx: `[H, H]`; wq: FP scaled q_proj `[n_heads·hd, H]`; wk, wk_hat: FP and rounded k_proj
    `[n_kv·hd, H]`; scale, zero: q_proj's grid `[n_heads·hd, n_group]`. rot: `rope_rotations`
    (the post-RoPE objective; j_before/j_after are then J^RoPE) or None (pre-RoPE).
    """
    dev = codes.device
    acc = gx.dtype
    nh, hd = attn.n_heads, attn.head_dim
    H = codes.shape[1]
    if codes.shape[0] != nh * hd or wk.shape[0] != attn.n_kv * hd:
        raise AwqnbError(f"q_proj/k_proj shapes {tuple(codes.shape)}/{tuple(wk.shape)} do not match "
                         f"{nh} heads, {attn.n_kv} kv heads of dim {hd}.")
    lo, hi = qrange(cfg)
    codes = codes.clone()
    wq_hat = dequantize(codes, scale, zero, cfg)
    j0, ref = score_error(gx, wq_hat, wq, wk_hat, wk, attn, rot)
    n_crit = 0 if critical_dim_pct <= 0 else min(hd, max(1, int(critical_dim_pct * hd)))
    cap = 0 if max_flip_pct <= 0 else max(1, int(max_flip_pct * H))
    empty = torch.zeros(nh, 0, dtype=torch.long, device=dev)
    if n_crit == 0 or cap == 0:
        return ReflipResult(codes, j0, j0.clone(), ref, torch.zeros(nh, dtype=torch.long), empty, empty, cap, 0)

    kv = torch.arange(nh, device=dev) // attn.n_rep
    kh = _heads(wk_hat.to(acc), attn.n_kv, hd)[kv]  # [nh, hd, H]
    k = _heads(wk.to(acc), attn.n_kv, hd)[kv]
    gk = _rope_average(kh @ gx @ kh.transpose(1, 2), rot)  # [nh, hd, hd]
    c_mat = _rope_average(k @ gx @ kh.transpose(1, 2), rot)
    dims = torch.topk(torch.diagonal(gk, dim1=1, dim2=2), n_crit, dim=1).indices  # [nh, n_crit]
    col = dims[:, None, :].expand(nh, hd, n_crit)
    qh_t = _heads(wq_hat.to(acc), nh, hd).transpose(1, 2)  # [nh, H, hd]
    q_t = _heads(wq.to(acc), nh, hd).transpose(1, 2)
    m = gx @ (qh_t @ torch.gather(gk, 2, col) - q_t @ torch.gather(c_mat, 2, col))  # [nh, H, n_crit]
    gkdd = torch.gather(torch.gather(gk, 1, dims[:, :, None].expand(nh, n_crit, hd)), 2,
                        dims[:, None, :].expand(nh, n_crit, n_crit))  # Gk[D, D]  [nh, n_crit, n_crit]
    gk_diag = torch.diagonal(gkdd, dim1=1, dim2=2)  # [nh, n_crit]
    gx_diag = torch.diagonal(gx)  # [H]
    rows = dims[:, :, None].expand(nh, n_crit, H)
    sig = torch.gather(_heads(expand_groups(scale, H, cfg.group_size), nh, hd), 1, rows).to(acc)  # [nh, n_crit, H]
    cd = torch.gather(_heads(codes, nh, hd), 1, rows)  # codes of the critical dims [nh, n_crit, H]
    count = torch.zeros(nh, n_crit, dtype=torch.long, device=dev)
    j_cur = j0.clone()
    quad = sig * sig * gx_diag[None, None, :] * gk_diag[:, :, None]
    ar = torch.arange(n_crit, device=dev)
    limit = max_iters if max_iters is not None else n_crit * cap + 1
    it = 0
    for it in range(1, limit + 1):
        mt = m.transpose(1, 2)  # [nh, n_crit, H]
        s = -torch.sign(mt)
        dj = -2 * sig * mt.abs() + quad
        ok = (s != 0) & (cd + s >= lo) & (cd + s <= hi) & (count < cap)[:, :, None] & (dj < 0)
        dj = torch.where(ok, dj, torch.full_like(dj, float("inf")))
        best_dj, best_j = dj.min(2)  # [nh, n_crit]
        if not bool(torch.isfinite(best_dj).any()):
            it -= 1
            break
        perm = torch.argsort(best_dj, dim=1, stable=True)  # dims by single-flip ΔJ, best first
        dj_s = torch.gather(best_dj, 1, perm)
        j_s = torch.gather(best_j, 1, perm)
        s_s = torch.gather(torch.gather(s, 2, best_j[:, :, None]).squeeze(2), 1, perm)
        c_s = s_s * torch.gather(torch.gather(sig, 2, best_j[:, :, None]).squeeze(2), 1, perm)  # [nh, n_crit]
        m_s = torch.gather(torch.gather(mt, 2, best_j[:, :, None]).squeeze(2), 1, perm)
        finite = torch.isfinite(dj_s)
        c_s = torch.where(finite, c_s, torch.zeros_like(c_s))
        gxjj = gx[j_s[:, :, None], j_s[:, None, :]]  # [nh, n_crit, n_crit]
        gkp = torch.gather(torch.gather(gkdd, 1, perm[:, :, None].expand(nh, n_crit, n_crit)), 2,
                           perm[:, None, :].expand(nh, n_crit, n_crit))
        b = c_s[:, :, None] * c_s[:, None, :] * gxjj * gkp
        quad_prefix = torch.diagonal(b.cumsum(1).cumsum(2), dim1=1, dim2=2)  # Σ over the first k×k block
        joint = (2 * c_s * m_s).cumsum(1) + quad_prefix  # ΔJ of applying the first k+1 flips
        joint = torch.where(finite, joint, torch.full_like(joint, float("inf")))
        kbest = joint.argmin(1)  # index of the last flip applied
        active = torch.isfinite(joint.gather(1, kbest[:, None]).squeeze(1))
        take = (ar[None, :] <= kbest[:, None]) & active[:, None] & finite
        c_t = torch.where(take, c_s, torch.zeros_like(c_s))
        # apply: codes, counts, J, and the exact rank-|F| update of M
        p_dim = perm  # crit position of each sorted flip
        cd_flat = cd.reshape(nh, -1)
        lin_idx = p_dim * H + j_s
        cd_flat.scatter_add_(1, lin_idx, torch.where(take, s_s, torch.zeros_like(s_s)).to(cd.dtype))
        cd = cd_flat.reshape(nh, n_crit, H)
        count.scatter_add_(1, p_dim, take.long())
        j_cur = j_cur + torch.where(active, joint.gather(1, kbest[:, None]).squeeze(1), torch.zeros_like(j_cur))
        gx_cols = gx[:, j_s].permute(1, 0, 2)  # [nh, H, n_crit(sorted)]
        gk_rows = torch.gather(gkdd, 1, perm[:, :, None].expand(nh, n_crit, n_crit))  # Gk[d_f, D]
        m = m + gx_cols @ (c_t[:, :, None] * gk_rows)
        if not bool(take.any()):
            it -= 1
            break
    out = _heads(codes, nh, hd).clone()
    out.scatter_(1, rows, cd)
    out = out.reshape(nh * hd, H)
    j1, _ = score_error(gx, dequantize(out, scale, zero, cfg), wq, wk_hat, wk, attn, rot)
    flips = count.sum(1)
    log.debug("reflip: J %s -> %s (tracked %s), %d iterations", j0.tolist(), j1.tolist(), j_cur.tolist(), it)
    return ReflipResult(out, j0, j1, ref, flips.cpu(), count, dims, cap, max(it, 0))


def _positions(ctx: BlockContext):
    """The block's (cos, sin) `[b, T, hd]` from its attention kwargs, or None."""
    for kw in ctx.kwargs:
        pe = kw.get("position_embeddings") if isinstance(kw, dict) else None
        if isinstance(pe, (tuple, list)) and len(pe) == 2 and all(isinstance(t, torch.Tensor) for t in pe):
            return pe
    return None


def rope_offsets_of(ctx: BlockContext) -> list[int]:
    pe = _positions(ctx)
    return [] if pe is None else rope_offsets(pe[0].shape[-2])


def _block_rotations(ctx: BlockContext, device) -> torch.Tensor | None:
    """`rope_rotations` for this block's positions, or None when it has no rotary embeddings."""
    pe = _positions(ctx)
    if pe is None or pe[0].shape[-1] != ctx.attn.head_dim or ctx.attn.head_dim % 2:
        return None
    cos, sin = pe
    return rope_rotations(cos.to(device), sin.to(device), rope_offsets(cos.shape[-2])).to(acc_dtype(device))


class ReFlip(Step):
    """The refiner of awq_gqa: ReFlip of q_proj per query head against the attention-score error
    with keys from the rounded k_proj of its kv head h // n_rep (`reflip`, module docstring).

    Params: apply_gqa_reflip (True), gqa_critical_dim_pct (0.15, fraction of head dims),
    gqa_max_flip_pct (0.05, fraction of a dim's H weights), gqa_rope (True: minimise the post-RoPE
    score error over `rope_offsets`; False: the pre-RoPE proxy); the Gram pass subsamples like μ
    when the method has max_tokens_per_sample > 0. It keeps the FP weights of q_proj and k_proj
    before the rounder rounds them, has the rounder round q_proj to codes (`round_codes`), and runs
    in `finish_block`, when q_proj and k_proj are rounded: the q_proj replay record is rewritten in
    place by the rounder's `recode` (the pipeline keeps that dict object in `LayerRecord.replay`),
    so `pipeline.apply` reproduces the ReFlip weights. Evidence ctx.evidence['gqa']: per head
    score_err_before/after (J_h), score_ref (E[(q·k)²]), flips; rel_improvement
    1 − ΣJ_after/ΣJ_before; critical_dims, cap_per_dim, iterations; objective ('rope' / 'pre-rope');
    rope_err_before/after and rope_rel_improvement (the post-RoPE error, whichever objective ran,
    when the block has rotary position embeddings), pre_rope_err_before/after likewise.
    """

    PARAMS = {"apply_gqa_reflip": True, "gqa_critical_dim_pct": 0.15, "gqa_max_flip_pct": 0.05, "gqa_rope": True}
    needs_calibration = True

    def setup(self):
        for k in ("gqa_critical_dim_pct", "gqa_max_flip_pct"):
            if not 0.0 <= float(self.params[k]) <= 1.0:
                raise AwqnbError(f"{k}={self.params[k]} must be a fraction in [0, 1] (0.15 = 15%).")
        self._stash: dict = {}

    def wants(self, ctx: BlockContext, name: str) -> bool:
        """q_proj and k_proj are rounded through `round_linear` below."""
        return bool(self.params["apply_gqa_reflip"]) and name in (ctx.spec.q_proj, ctx.spec.k_proj)

    @torch.no_grad()
    def round_linear(self, ctx: BlockContext, name: str, lin: nn.Linear, rounder: Step) -> dict | None:
        fp = lin.weight.data.float().clone()
        if name == ctx.spec.k_proj:
            self._stash[(ctx.index, name)] = {"fp": fp}
            return rounder.round_linear(ctx, name, lin)
        replay, (q0, q, scale, zero) = rounder.round_codes(ctx, name, lin)
        self._stash[(ctx.index, name)] = {"fp": fp, "q0": q0, "q": q, "scale": scale, "zero": zero,
                                          "replay": replay}
        return replay

    @torch.no_grad()
    def refine(self, ctx: BlockContext, rounder: Step) -> None:
        qn, kn = ctx.spec.q_proj, ctx.spec.k_proj
        qs, ks = self._stash.pop((ctx.index, qn), None), self._stash.pop((ctx.index, kn), None)
        if qs is not None and ks is not None:
            q_lin, k_lin = get_module(ctx.block, qn), get_module(ctx.block, kn)
            gx, n_tok = gram(ctx.inputs[ctx.input_key[qn]], int(self.params.get("max_tokens_per_sample", 0)),
                             q_lin.weight.device)
            gx = gx.to(q_lin.weight.device)
            rot = _block_rotations(ctx, gx.device)
            if rot is None and self.params["gqa_rope"]:
                log.warning("block %d has no rotary position embeddings: ReFlip minimises the pre-RoPE error", ctx.index)
            use = rot if self.params["gqa_rope"] else None
            wk_hat = k_lin.weight.data.float()
            rr = reflip(gx, qs["fp"], ks["fp"], wk_hat, qs["q"], qs["scale"], qs["zero"],
                        self.cfg.quant, ctx.attn, float(self.params["gqa_critical_dim_pct"]),
                        float(self.params["gqa_max_flip_pct"]), rot=use)
            q_before = dequantize(qs["q"], qs["scale"], qs["zero"], self.cfg.quant)
            q_after = dequantize(rr.codes, qs["scale"], qs["zero"], self.cfg.quant)
            measures = {"pre_rope": None} if rot is None else {"pre_rope": None, "rope": rot}
            other = {}  # each error before and after, the minimised one and the other
            for label, r in measures.items():
                if (r is None) == (use is None):  # the objective: reflip measured it
                    other[label] = (rr.j_before.double().cpu(), rr.j_after.double().cpu())
                else:
                    other[label] = tuple(score_error(gx, w, qs["fp"], wk_hat, ks["fp"], ctx.attn, r)[0].double().cpu()
                                         for w in (q_before, q_after))
            q_lin.weight.data.copy_(q_after.to(q_lin.weight.dtype))
            rounder.recode(qs["replay"], qs["q0"], rr.codes)  # same dict object as LayerRecord.replay[qn]
            jb, ja = rr.j_before.double().cpu(), rr.j_after.double().cpu()
            ctx.evidence["gqa"] = {
                "score_err_before": jb.tolist(),
                "score_err_after": ja.tolist(),
                "score_ref": rr.ref.double().cpu().tolist(),
                "flips": rr.flips.tolist(),
                "rel_improvement": float(1 - ja.sum() / jb.sum()) if float(jb.sum()) > 0 else 0.0,
                "critical_dims": int(rr.dims.shape[1]),
                "cap_per_dim": rr.cap,
                "iterations": rr.iterations,
                "n_tok": n_tok,
                "objective": "rope" if use is not None else "pre-rope",
                "rope_offsets": None if rot is None else rope_offsets_of(ctx),
            }
            for label, (b, a) in other.items():
                ctx.evidence["gqa"][f"{label}_err_before"] = b.tolist()
                ctx.evidence["gqa"][f"{label}_err_after"] = a.tolist()
                ctx.evidence["gqa"][f"{label}_rel_improvement"] = float(1 - a.sum() / b.sum()) if float(b.sum()) > 0 else 0.0
            log.debug("block %d ReFlip: score error %.4g -> %.4g", ctx.index, float(jb.sum()), float(ja.sum()))
