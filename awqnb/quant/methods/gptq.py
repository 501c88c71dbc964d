"""GPTQ (Frantar et al. 2022) on awqnb's own grid: the `GPTQ` rounder of `gptq`, `awq_gptq` (AWQ scales,
then GPTQ), `praq_gptq` and `awq_gptq_reflip`.

For one linear `W: [co, ci]` with calibration inputs `X: [n, ci]` at its input point (the current,
already scaled space for awq_gptq):

    H = 2·XᵀX / n                       (fp32, summed chunk by chunk on the weight's device)
    dead columns (H_jj = 0): H_jj := 1  (their weights are rounded to nearest and, unlike the
                                         reference tools, NOT zeroed: calibration never saw them,
                                         evaluation may)
    act_order: columns processed by decreasing H_jj (stable), else in their own order
    H += λ·I,  λ = damp_percent · mean(diag H)   (×10 and retried while Cholesky fails; after 4
                                         failures H⁻¹ := I, i.e. round to nearest, recorded)
    U = chol(H⁻¹) upper                  (of the permuted, dampened H)
    for each column j in processing order (blocks of `block_size`, lazy batch updates):
        q_j   = clamp(round(w_j / scale_g) + zero_g, q_min, q_max)       g = j's group
        ŵ_j   = (q_j − zero_g) · scale_g
        e_j   = (w_j − ŵ_j) / U_jj
        w_k  -= e_j · U_jk   for every later column k        (error compensation)
        loss += (w_j − ŵ_j)² / U_jj² / 2

The grid is primitives.compute_qparams' (min-max, asymmetric or symmetric, per (row, group) of
contiguous input columns, `group_size -1` per row, partial last group on its own columns):
  static_groups: every group's scale/zero from the original W before any update (what the
      reference tools do; it keeps act_order on awqnb's contiguous groups).
  otherwise: a group's scale/zero from its current (already compensated) weights when its first
      column is processed (in act order: the group's first column in that order), as GPTQ does.
The result lies exactly on that grid: Ŵ = dequantize(q, scale, zero). The replay record stores
the codes (uint8, two per byte at ≤ 4 bits) and the qparams, so `pipeline.apply` rewrites Ŵ bit
for bit without calibration.

Linears that share an input point (q/k/v, gate/up) share H and are rounded together as one matrix
with their rows stacked: rows are independent in GPTQ, so this is exact and saves the column loop.

Cost: `hessian` (one GEMM per chunk; bf16/fp16 chunks straight into float32 H on a GPU),
`gptq_factor` (permutation, damping, two Cholesky factorisations and an inverse) and `gptq_round`
(the column loop). At 8B sizes the loop is bound by launching its tiny per-column kernels, so it
runs only the algorithm's 7 tensor ops per column, with no host sync; everything else is per block.

Evidence (ctx.evidence['gptq'][linear]): the GPTQ loss Σ(w − ŵ)²/U_jj²/2, the layer output error
proxy tr(ΔW H ΔWᵀ) of round-to-nearest (on compute_qparams(W)) and of GPTQ (H undampened), their
ratio, the dead columns, the damping used and whether Cholesky fell back to round-to-nearest.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import compute_qparams, dequantize, effective_group_size, fake_quant, qrange
from awqnb.model.arch import get_module
from awqnb.quant.methods.base import BlockContext, Nearest

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 4


@dataclass
class GPTQResult:
    """One matrix rounded by GPTQ: codes q `[co, ci]` (float holding integers, awqnb's range),
    scale and zero `[co, n_group]` (float32), per-row GPTQ loss `[co]`, damping λ used, whether
    the inverse fell back to the identity, and the number of dead columns."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    loss: torch.Tensor
    damp: float
    fallback: bool
    n_dead: int

    def weight(self, cfg: QuantConfig) -> torch.Tensor:
        """Ŵ = (q − zero) · scale, float32 `[co, ci]`."""
        return dequantize(self.q, self.scale, self.zero, cfg)


def hessian(xs: list[torch.Tensor], device, dtype=torch.float32) -> tuple[torch.Tensor, int]:
    """H = 2·XᵀX/n `[c, c]` from chunks `[..., c]` (each moved to `device` while it is used), and n.

    bf16/fp16 chunks on a GPU are multiplied as they are into the float32 H (`out_dtype`): their
    products are exact in float32 and the sums are float32 as before, so H is the float32 one up to
    summation order, at tensor-core speed and without a float32 copy of each chunk."""
    c = xs[0].shape[-1]
    h = torch.zeros(c, c, device=device, dtype=dtype)
    n = 0
    direct = dtype == torch.float32 and h.device.type == "cuda"
    for x in xs:
        f = x.to(device, non_blocking=True).reshape(-1, c)
        n += f.shape[0]
        if direct and f.dtype in (torch.bfloat16, torch.float16):
            try:
                torch.addmm(h, f.T, f, out_dtype=torch.float32, out=h)
                continue
            except (RuntimeError, TypeError, NotImplementedError):  # an older torch or GPU: the float32 way
                direct = False
        f = f.to(dtype)
        h.addmm_(f.T, f)
    if n == 0:
        raise AwqnbError("GPTQ needs calibration tokens at every input point; the calibration set is empty.")
    return h.mul_(2.0 / n), n


def layer_error(dw: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) = Σ_t 2/n ‖ΔW x_t‖²: the layer's output error on the calibration tokens."""
    return float(((dw.float() @ h) * dw.float()).sum(dtype=torch.float64))


@dataclass
class GPTQFactor:
    """What GPTQ needs of H: `u` `[ci, ci]`, the upper Cholesky factor of (H + λI)⁻¹ in processing
    order; `perm` the processing order (None: the columns' own); the damping λ used, whether it fell
    back to the identity (round to nearest) and the number of dead columns."""

    u: torch.Tensor
    perm: torch.Tensor | None
    damp: float
    fallback: bool
    n_dead: int


@torch.no_grad()
def gptq_factor(h: torch.Tensor, damp_percent: float = 0.01, act_order: bool = True) -> GPTQFactor:
    """Dead columns, act-order permutation, damping and U = chol((H + λI)⁻¹) upper, on h's device.

    Holds at most two other ci² float32 matrices besides h at any time (h is not modified)."""
    ci = h.shape[0]
    d = h.diagonal().float()
    dead = d == 0
    n_dead = int(dead.sum())
    d = d.masked_fill(dead, 1.0)  # isolated column: H⁻¹ has no coupling to it, so it is rounded to nearest
    perm = torch.argsort(d, descending=True, stable=True) if act_order else None

    def build() -> torch.Tensor:
        # one gather (or copy) of h, in processing order, float32
        hp = h.float()[perm[:, None], perm[None, :]] if perm is not None else h.to(torch.float32, copy=True)
        hp.diagonal().masked_fill_(dead[perm] if perm is not None else dead, 1.0)
        return hp

    H = build()
    damp = float(damp_percent) * float(H.diagonal().mean())
    diag0 = H.diagonal().clone()
    for _ in range(MAX_DAMP_RETRIES):
        if H is None:
            H = build()
        H.diagonal().copy_(diag0 + damp)
        low, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            del H  # rebuilt from h only if the second factorisation fails
            H = None
            hinv = torch.cholesky_inverse(low)
            del low
            up, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and bool(torch.isfinite(up.diagonal()).all()):
                return GPTQFactor(up, perm, damp, False, n_dead)
        damp *= 10.0
    log.warning("GPTQ: H is not positive definite even with damping %.3g; rounding to nearest", damp)
    return GPTQFactor(torch.eye(ci, device=h.device, dtype=torch.float32), perm, damp, True, n_dead)


# The column loop of a full block as a CUDA graph (static groups on CUDA), unless switched off here.
CUDA_GRAPH = True


@torch.no_grad()
def gptq_round(w: torch.Tensor, f: GPTQFactor, cfg: QuantConfig, block_size: int = 128,
               static_groups: bool = True, cuda_graph: bool | None = None) -> GPTQResult:
    """The column loop: GPTQ-round `w: [co, ci]` with the factor of its Hessian (`gptq_factor`).

    Per column only the arithmetic of the algorithm runs (7 tensor ops, no view created, no host
    sync): q' = clamp(round(w/s), lo − z, hi − z) = q − z, e = (w − q'·s)/U_jj, the rank-1 update
    of the block. Codes (q = q' + z), losses and the lazy update of later columns are batched per
    block; a dynamic group's qparams are taken once, at its first column.

    cuda_graph (CUDA, static groups): the column loop of a full block is recorded once as a CUDA
    graph and replayed per block, so the GPU is not left waiting for Python between the tiny
    per-column kernels; the same kernels on the same values, so the same codes
    (bench/probes/gptq_layer.py compares it with the eager loop). None: `CUDA_GRAPH`. One graph
    per (block size, rows, device) is kept and reused by every later linear of that shape."""
    co, ci = w.shape
    dev = w.device
    g = effective_group_size(ci, cfg.group_size)
    ng = math.ceil(ci / g)
    lo, hi = qrange(cfg)
    W = w.float()
    perm = f.perm
    U = f.u.to(device=dev, dtype=torch.float32)
    if static_groups:
        scale, zero = compute_qparams(W, cfg)
    else:
        scale = torch.zeros(co, ng, device=dev)
        zero = torch.zeros(co, ng, device=dev)
    # columns as rows (`[ci, co]`, processing order): each column and each block is contiguous
    Wt = W.T.index_select(0, perm.to(dev)) if perm is not None else W.T.contiguous()
    del W
    st, zt = scale.T.contiguous(), zero.T.contiguous()  # `[n_group, co]`
    lz, hz = lo - zt, hi - zt  # the clamp bounds of q − z
    perm_cpu = perm.cpu() if perm is not None else torch.arange(ci)
    gpos = perm_cpu // g  # processing position → group
    group_at = gpos.tolist()
    gpos = gpos.to(dev)
    dyn = {} if static_groups else _group_plan(perm_cpu, g, ci, block_size, dev)
    s_rows, lz_rows, hz_rows = st.unbind(0), lz.unbind(0), hz.unbind(0)
    d_all = U.diagonal().unbind(0)
    Qt = torch.empty_like(Wt)
    ebuf = torch.empty(min(ci, block_size), co, device=dev)
    loss_rows = torch.zeros(co, device=dev)
    graph = None
    if cuda_graph is None:
        cuda_graph = CUDA_GRAPH
    if cuda_graph and static_groups and dev.type == "cuda" and ci >= block_size:
        key = (block_size, co, dev)
        graph = _GRAPHS.get(key)
        if graph is None:
            graph = _GRAPHS[key] = _BlockGraph(block_size, co, dev)
    for i1 in range(0, ci, block_size):
        i2 = min(i1 + block_size, ci)
        cnt = i2 - i1
        if graph is not None and cnt == block_size:
            E1 = graph.run(Wt[i1:i2], U[i1:i2, i1:i2], st, lz, hz, gpos[i1:i2], Qt[i1:i2])
            Qt[i1:i2].add_(zt.index_select(0, gpos[i1:i2]))
            loss_rows += (E1 * E1).sum(0)
            if i2 < ci:
                Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)
            continue
        W1 = Wt[i1:i2]  # updated in place: nothing reads a block's columns after it
        Q1 = Qt[i1:i2]
        E1 = ebuf[:cnt]
        U1 = U[i1:i2, i1:i2]
        w_r, q_r, e_r, u_r = W1.unbind(0), Q1.unbind(0), E1.unbind(0), U1.unbind(0)
        for i in range(cnt):
            p = i1 + i
            gi = group_at[p]
            if p in dyn:
                _start_group(dyn[p], Wt, W1, E1, U, i1, i, st[gi], zt[gi], lz[gi], hz[gi], lo, hi, cfg)
            s, q, e = s_rows[gi], q_r[i], e_r[i]
            torch.div(w_r[i], s, out=q)
            q.round_()
            torch.clamp(q, lz_rows[gi], hz_rows[gi], out=q)  # q − z
            torch.mul(q, s, out=e)
            torch.sub(w_r[i], e, out=e)
            e.div_(d_all[p])
            # the whole block: U is upper triangular, so rows before i get exactly zero added, and
            # no slice has to be made per column
            W1.addr_(u_r[i], e, alpha=-1.0)
        Q1.add_(zt.index_select(0, gpos[i1:i2]))
        loss_rows += (E1 * E1).sum(0)  # (w − ŵ)²/U_jj², halved at the end
        if i2 < ci:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)  # the lazy batch update of later columns
    if perm is not None:
        Qt = Qt.index_select(0, torch.argsort(perm).to(dev))
    return GPTQResult(Qt.T.contiguous(), st.T.contiguous(), zt.T.contiguous(), loss_rows / 2, f.damp,
                      f.fallback, f.n_dead)


_GRAPHS: dict = {}  # (block size, rows, device) → _BlockGraph: a few MB each, captured once


class _BlockGraph:
    """The column loop of one full block (static groups) as a CUDA graph on fixed buffers."""

    def __init__(self, bs: int, co: int, dev):
        z = lambda *shape: torch.zeros(*shape, device=dev)  # noqa: E731
        self.w, self.s, self.lz, self.hz = z(bs, co), torch.ones(bs, co, device=dev), z(bs, co), z(bs, co)
        self.q, self.e, self.u = z(bs, co), z(bs, co), torch.eye(bs, device=dev)  # finite warm-up values
        self.d = self.u.diagonal()
        self.graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self._loop()  # warm-up outside the capture, as CUDA graphs want
        torch.cuda.current_stream(dev).wait_stream(side)
        with torch.cuda.graph(self.graph):
            self._loop()

    def _loop(self):
        w, q, e, s, u = self.w, self.q, self.e, self.s, self.u
        for i in range(w.shape[0]):
            torch.div(w[i], s[i], out=q[i])
            q[i].round_()
            torch.clamp(q[i], self.lz[i], self.hz[i], out=q[i])
            torch.mul(q[i], s[i], out=e[i])
            torch.sub(w[i], e[i], out=e[i])
            e[i].div_(self.d[i])
            if i + 1 < w.shape[0]:
                w[i + 1:].addr_(u[i, i + 1:], e[i], alpha=-1.0)

    def run(self, w1, u1, st, lz, hz, gidx, q_out) -> torch.Tensor:
        """Replay on block (w1 `[bs, co]`, u1 `[bs, bs]`, the block's groups gidx); codes q − z
        into q_out; returns the scaled errors `[bs, co]` (valid until the next run)."""
        self.w.copy_(w1)
        self.u.copy_(u1)
        torch.index_select(st, 0, gidx, out=self.s)
        torch.index_select(lz, 0, gidx, out=self.lz)
        torch.index_select(hz, 0, gidx, out=self.hz)
        self.graph.replay()
        q_out.copy_(self.q)
        return self.e


def _group_plan(perm_cpu: torch.Tensor, g: int, ci: int, block_size: int, dev) -> dict:
    """Dynamic groups: for each group's first processing position p, the rows of its columns that
    are in p's block (block-relative) and those after it, as device indices made before the loop."""
    pos_of = torch.argsort(perm_cpu)  # original column → processing position
    plan = {}
    for gi in range(math.ceil(ci / g)):
        pos = pos_of[gi * g:min((gi + 1) * g, ci)]
        p = int(pos.min())
        i1 = p - p % block_size
        i2 = min(i1 + block_size, ci)
        plan[p] = ((pos[pos < i2] - i1), pos[pos >= i2])
    flat = torch.cat([t for pair in plan.values() for t in pair]).to(dev)  # one transfer
    out, k = {}, 0
    for p, (a, b) in plan.items():
        out[p] = (flat[k:k + len(a)], flat[k + len(a):k + len(a) + len(b)])
        k += len(a) + len(b)
    return out


def _start_group(idx, Wt, W1, E1, U, i1, i, s_g, z_g, lz_g, hz_g, lo, hi, cfg) -> None:
    """A dynamic group's qparams from its current weights, at its first column (block position i):
    block columns are up to date in W1; later ones still lack this block's updates."""
    inb, out = idx
    parts = []
    if inb.numel():
        parts.append(W1.index_select(0, inb))
    if out.numel():
        later = Wt.index_select(0, out)
        if i > 0:
            later = later - U[i1:i1 + i].index_select(1, out).T @ E1[:i]
        parts.append(later)
    cur = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    s, z = compute_qparams(cur.T, replace(cfg, group_size=-1))
    s_g.copy_(s[:, 0])
    z_g.copy_(z[:, 0])
    lz_g.copy_(lo - z_g)
    hz_g.copy_(hi - z_g)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, cfg: QuantConfig, damp_percent: float = 0.01,
                  block_size: int = 128, act_order: bool = True, static_groups: bool = True,
                  cuda_graph: bool | None = None) -> GPTQResult:
    """GPTQ-round `w: [co, ci]` against the Hessian `h: [ci, ci]` (2·XᵀX/n) on awqnb's grid.

    Everything runs on w's device in float32; see the module docstring for the algorithm."""
    co, ci = w.shape
    if h.shape != (ci, ci):
        raise AwqnbError(f"GPTQ: Hessian of shape {tuple(h.shape)} does not match a weight with {ci} columns.")
    if block_size < 1:
        raise AwqnbError(f"block_size={block_size} must be >= 1.")
    f = gptq_factor(h.to(w.device), damp_percent, act_order)
    return gptq_round(w, f, cfg, block_size, static_groups, cuda_graph)


# -- replay record --------------------------------------------------------------------------

def pack_codes(q: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Codes `[co, ci]` → uint8 `q − q_min`, two per byte (low nibble first) when bits ≤ 4."""
    lo, _ = qrange(cfg)
    u = (q - lo).to(torch.uint8)
    if cfg.bits > 4:
        return u.cpu()
    if u.shape[1] % 2:
        u = torch.cat([u, torch.zeros_like(u[:, :1])], 1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).cpu()


def unpack_codes(packed: torch.Tensor, ci: int, cfg: QuantConfig, device=None) -> torch.Tensor:
    """Inverse of `pack_codes`: float32 codes `[co, ci]` in awqnb's range."""
    lo, _ = qrange(cfg)
    p = packed.to(device) if device is not None else packed
    if cfg.bits <= 4:
        p = torch.stack([p & 15, p >> 4], -1).reshape(p.shape[0], -1)
    return p[:, :ci].float() + lo


class GPTQ(Nearest):
    """The GPTQ rounder: Hessian-based error-compensating rounding (module docstring).

    Params: damp_percent (0.01 of mean diag H), block_size (128 columns per lazy batch update),
    act_order (True: columns by decreasing H_jj), static_groups (True: qparams from the original
    W, as llm-compressor's default actorder 'weight'; False: when each group starts).
    Replay: {'codes': uint8 (packed at ≤ 4 bits), 'scale': float32, 'zero': uint8} per linear.
    """

    needs_calibration = True
    PARAMS = {"damp_percent": 0.01, "block_size": 128, "act_order": True, "static_groups": True}

    def setup(self):
        p = self.params
        if not float(p["damp_percent"]) > 0:
            raise AwqnbError(f"damp_percent={p['damp_percent']} must be > 0 (0.01 = 1% of the mean of diag H).")
        if int(p["block_size"]) < 1:
            raise AwqnbError(f"block_size={p['block_size']} must be >= 1 (128 is usual).")
        self._done: dict = {}  # (block, linear) → (Ŵ in the weight's dtype, replay, codes) of a joint run

    @torch.no_grad()
    def round_linear(self, ctx: BlockContext | None, name: str, lin: nn.Linear) -> dict | None:
        """GPTQ-round `lin` with every not yet rounded linear at the same input point (rows stacked);
        returns the replay record of `lin`."""
        if ctx is None:  # no calibration: round to nearest
            return super().round_linear(ctx, name, lin)
        if (ctx.index, name) not in self._done:
            self._round_joint(ctx, name)
        wq, rep, _codes = self._done.pop((ctx.index, name))
        lin.weight.data.copy_(wq)
        return rep

    @torch.no_grad()
    def round_codes(self, ctx: BlockContext, name: str, lin: nn.Linear):
        """`round_linear`, returning (replay, (q, q, scale, zero)): GPTQ's codes are the base a
        refiner changes (`recode` repacks them)."""
        if (ctx.index, name) not in self._done:
            self._round_joint(ctx, name)
        wq, rep, codes = self._done.pop((ctx.index, name))
        lin.weight.data.copy_(wq)
        return rep, codes

    def recode(self, replay: dict, q0: torch.Tensor, q: torch.Tensor) -> None:
        replay["codes"] = pack_codes(q, self.cfg.quant)

    def _round_joint(self, ctx: BlockContext, name: str) -> None:
        t0 = time.perf_counter()
        key = ctx.input_key[name]
        names = [n for n in ctx.spec.linears if ctx.input_key.get(n) == key and (ctx.index, n) not in self._done]
        if name not in names:
            names = [name]
        lins = [get_module(ctx.block, n) for n in names]
        w0 = lins[0].weight
        h, _ = hessian(ctx.inputs[key], w0.device)  # used once: every linear at `key` is rounded now
        w = torch.cat([m.weight.data.float() for m in lins], 0)
        p = self.params
        qcfg = self.cfg.quant
        res = gptq_quantize(w, h, qcfg, damp_percent=float(p["damp_percent"]), block_size=int(p["block_size"]),
                            act_order=bool(p["act_order"]), static_groups=bool(p["static_groups"]))
        wq = res.weight(qcfg)
        seconds = time.perf_counter() - t0
        row = 0
        for n, m in zip(names, lins):
            co = m.weight.shape[0]
            sl = slice(row, row + co)
            row += co
            wf = w[sl]
            err_rtn = layer_error(wf - fake_quant(wf, qcfg), h)
            err_gptq = layer_error(wf - wq[sl], h)
            ev = {
                "gptq_loss": float(res.loss[sl].sum(dtype=torch.float64)),
                "layer_err_rtn": err_rtn,
                "layer_err_gptq": err_gptq,
                "rel_err": err_gptq / err_rtn if err_rtn > 0 else float("nan"),
                "dead_columns": res.n_dead,
                "damp": res.damp,
                "fallback_rtn": res.fallback,
                "joint_with": [x for x in names if x != n],
                "seconds": seconds,
            }
            ctx.evidence.setdefault("gptq", {})[n] = ev
            log.debug("block %d %s: layer error %.4g (rtn %.4g)", ctx.index, n, err_gptq, err_rtn)
            rep = {"codes": pack_codes(res.q[sl], qcfg), "scale": res.scale[sl].cpu(),
                   "zero": res.zero[sl].to(torch.uint8).cpu()}
            self._done[(ctx.index, n)] = (wq[sl].to(m.weight.dtype), rep, (res.q[sl], res.q[sl], res.scale[sl],
                                                                           res.zero[sl]))

    @torch.no_grad()
    def replay_linear(self, name: str, lin: nn.Linear, replay: dict | None) -> None:
        """Write Ŵ = (q − zero) · scale from the recorded codes and qparams (no calibration)."""
        if replay is None:
            return super().replay_linear(name, lin, replay)
        w = lin.weight.data
        qcfg = self.cfg.quant
        q = unpack_codes(replay["codes"], w.shape[1], qcfg, w.device)
        scale = replay["scale"].to(device=w.device, dtype=torch.float32)
        zero = replay["zero"].to(device=w.device, dtype=torch.float32)
        if q.shape != w.shape or scale.shape[0] != w.shape[0]:
            raise AwqnbError(f"GPTQ replay of {name}: codes {tuple(q.shape)} do not fit the weight {tuple(w.shape)}.")
        w.copy_(dequantize(q, scale, zero, qcfg).to(w.dtype))

    def finish_block(self, ctx: BlockContext) -> None:
        self._done = {k: v for k, v in self._done.items() if k[0] != ctx.index}
