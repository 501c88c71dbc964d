"""AWQ: activation-aware per-input-channel scaling, searched on a grid of α, folded exactly;
and the scaler steps `Clip` (the clip search alone) and `AWQGrid` (α search, fold, then clip).

For a scale group with salience `a: [ci]` (L1 `E|x|` or L2 `sqrt(E[x²])`):
  s(α) = a**α                      (duo_scaling: a**α / (w_mean**(1-α) + 1e-4))
  s   /= sqrt(max(s) · min(s))
  W'(α) = Q(W · diag(s)) · diag(s)^-1
  L(α) = mean‖F(X; W'(α)) − F(X; W)‖²     F = the module the group feeds
  α* = argmin over α ∈ {0, 1/n_grid, …, 1}; ties → smallest α.
       (SearchConfig.alpha_select 'smooth': the argmin of L's 3-point moving average over the
       grid instead, so a single-α dip made by one row's lucky rounding does not win over a
       broad minimum; the recorded best_loss is still L(α*) itself.)
The chosen s is folded: prev op output channels ÷ s, scaled layers' input columns × s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from awqnb.core.config import ALPHA_SELECT, QuantConfig, SearchConfig
from awqnb.core.dtypes import mark_fp32
from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import effective_group_size, expand_groups, fake_quant, group_view
from awqnb.model.arch import ArchSpec, AttnShape, ScaleGroup, get_module
from awqnb.quant.methods.base import BlockContext, Step


@dataclass
class GroupSearch:
    """Evidence of one scale group's search: the α→loss curve and the chosen scales.

    scales: `[ci_prev]`, in the space of the previous op's outputs (for the GQA v→o group:
    `[n_kv * head_dim]`, repeated over query heads to reach o_proj's inputs).
    """

    name: str
    alphas: list[float]
    losses: list[float]
    best_alpha: float
    best_loss: float
    scales: torch.Tensor
    salience: torch.Tensor
    extra: dict = field(default_factory=dict)

    @property
    def rtn_loss(self) -> float:
        """Loss at α=0: s ≡ 1, i.e. plain round-to-nearest."""
        return self.losses[0]


def kv_space(a: torch.Tensor, attn: AttnShape) -> torch.Tensor:
    """o_proj-input salience `[n_heads*hd]` → v_proj-output space `[n_kv*hd]`, averaged over
    the n_rep query heads that read each kv head."""
    return a.view(attn.n_kv, attn.n_rep, attn.head_dim).mean(1).reshape(-1)


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ's w_mean `[ci]`: |W| normalised by each (row, group) absmax, averaged over rows."""
    w = torch.cat([x.float() for x in weights], 0)
    ci = w.shape[1]
    wg = group_view(w.abs(), group_size)
    norm = wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)
    return norm.reshape(w.shape[0], -1)[:, :ci].mean(0)


def scales_for(a: torch.Tensor, alpha: float, w_mean: torch.Tensor | None) -> torch.Tensor:
    """s(α), normalised so that sqrt(max·min) = 1. `[c]` float32."""
    a = a.float()
    if w_mean is not None:
        s = a.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)
    else:
        s = a.pow(alpha)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def selection_curve(losses: list[float], how: str = "argmin") -> list[float]:
    """The curve α* minimises, one value per grid point; NaN/inf losses read as +inf.

    'argmin': the losses themselves. 'smooth': their 3-point moving average over the α grid (at
    each end the mean of the two points there), so any average touching a non-finite loss is +inf.
    """
    v = [float(l) if math.isfinite(l) else math.inf for l in losses]
    if how == "argmin" or len(v) < 3:
        return v
    if how != "smooth":
        raise AwqnbError(f"alpha_select={how!r} is unknown; use one of {', '.join(ALPHA_SELECT)}.")
    out = []
    for i in range(len(v)):
        w = v[max(0, i - 1):i + 2]
        out.append(math.inf if math.inf in w else sum(w) / len(w))
    return out


def select_alpha(losses: list[float], how: str = "argmin") -> int | None:
    """Index of the chosen α: the first minimum of `selection_curve` (ties → the smaller α);
    None when every value is +inf (every loss NaN/inf)."""
    best_i, best = None, math.inf
    for i, c in enumerate(selection_curve(losses, how)):
        if c < best:  # strict: ties keep the smaller α
            best_i, best = i, c
    return best_i


def scaled_fake_quant(w: torch.Tensor, s_full: torch.Tensor, qcfg: QuantConfig) -> torch.Tensor:
    """Q(W · diag(s)) · diag(s)^-1 in w's dtype."""
    wf = w.float() * s_full
    return (fake_quant(wf, qcfg) / s_full).to(w.dtype)


def _rel(path: str, prefix: str) -> str:
    return path[len(prefix) + 1:] if prefix and path.startswith(prefix + ".") else ("" if path == prefix else path)


class InspectRunner:
    """Runs a group's inspect module on the captured inputs, optionally with substitute weights.

    xs: list of `[b, T, c]` chunk inputs (on the compute device, or on the CPU when activations
    are offloaded: each chunk is moved while it is used); kwargs: per-chunk kwargs for attention.
    Losses stay on the device (a 0-d float32 tensor per call): the caller reads them back once.
    """

    def __init__(self, block: nn.Module, group: ScaleGroup, xs: list[torch.Tensor], kwargs: list[dict]):
        self.module = get_module(block, group.inspect)
        self.group = group
        self.xs = xs
        self.kwargs = kwargs
        self.names = [(_rel(n, group.inspect) + ".weight").lstrip(".") for n in group.layers]
        w = get_module(block, group.layers[0]).weight
        self.device, self.dtype = w.device, w.dtype
        self.n_tok = sum(x.numel() // x.shape[-1] for x in xs)
        # A single linear's output error is a quadratic form in ΔW: mean((X ΔWᵀ)²) =
        # Σ (ΔW G) ⊙ ΔW / (n_tok·co) with G = XᵀX `[ci, ci]`, so each α costs co·ci² instead of
        # n_tok·ci·co and the token outputs are never recomputed. In fp32 only: a bf16 Gram
        # would round G; there the error X ΔWᵀ is computed directly (bf16 product, fp32 sum).
        self.linear = group.inspect_kind == "linear" and len(group.layers) == 1
        self.gram = None
        # half-precision on CUDA: G summed in fp32 from bf16 products (mm out_dtype), and each
        # α's ΔW·G taken in bf16 with fp32 output; elsewhere in half precision: X ΔWᵀ directly
        self.half_gram = self.linear and self.dtype != torch.float32 and self.device.type == "cuda"
        if self.linear and (self.dtype == torch.float32 or self.half_gram):
            self.gram = torch.zeros(xs[0].shape[-1], xs[0].shape[-1], device=self.device)
            for x in xs:
                f = self._x(x).reshape(-1, x.shape[-1])
                if self.half_gram:
                    self.gram += torch.mm(f.T, f, out_dtype=torch.float32)
                else:
                    f = f.float()
                    self.gram += f.T @ f
            if self.half_gram:
                self.gram = self.gram.to(self.dtype)

    def _x(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def _call(self, i: int, params: dict | None):
        x = self._x(self.xs[i])
        if self.group.inspect_kind == "attention":
            args, kw = (), dict(hidden_states=x, **self.kwargs[i])
        else:
            args, kw = (x,), {}
        if params is None:
            out = self.module(*args, **kw)
        else:
            out = functional_call(self.module, params, args, kw, strict=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        if self.linear:
            return []  # the error of a single linear is linear in ΔW: no reference outputs needed
        return [self._call(i, None) for i in range(len(self.xs))]

    @torch.no_grad()
    def loss_tensor(self, weights: list[torch.Tensor], ref: list[torch.Tensor]) -> torch.Tensor:
        """mean((F(X; weights) − ref)²) over all chunks and elements, as a 0-d fp32 device tensor."""
        if self.linear:
            d = weights[0].float() - self.module.weight.float()  # [co, ci]
            if self.half_gram:
                dh = d.to(self.dtype)
                return (torch.mm(dh, self.gram, out_dtype=torch.float32) * d).sum() / (self.n_tok * d.shape[0])
            if self.gram is not None:
                return ((d @ self.gram) * d).sum() / (self.n_tok * d.shape[0])
            d = d.to(self.dtype)
            tot = torch.zeros((), device=self.device)
            for x in self.xs:
                tot += (self._x(x) @ d.T).float().pow(2).sum()
            return tot / (self.n_tok * d.shape[0])
        params = dict(zip(self.names, weights))
        tot = torch.zeros((), device=self.device)
        n = 0
        for i in range(len(self.xs)):
            out = self._call(i, params)
            tot += (out.float() - ref[i].float()).pow(2).sum()
            n += out.numel()
        return tot / max(n, 1)

    def loss(self, weights: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
        return float(self.loss_tensor(weights, ref))


def search_group(block: nn.Module, group: ScaleGroup, a: torch.Tensor, runner: InspectRunner,
                 qcfg: QuantConfig, scfg: SearchConfig, attn: AttnShape) -> GroupSearch:
    """Grid-search α for one scale group. `a`: salience of the layers' input channels `[ci]`.
    The losses of the whole grid are read back from the device at once."""
    layers = [get_module(block, n) for n in group.layers]
    ws = [m.weight.data for m in layers]
    dev = ws[0].device
    a = a.to(dev)
    idx = attn.o_index(dev) if group.gqa_fold else None
    a_prev = kv_space(a, attn) if group.gqa_fold else a
    w_mean = None
    if scfg.duo_scaling:
        wm = weight_mean(ws, qcfg.group_size)
        w_mean = kv_space(wm, attn) if group.gqa_fold else wm
    ref = runner.outputs()
    alphas = [i / scfg.n_grid for i in range(scfg.n_grid + 1)]
    losses_t = []
    for alpha in alphas:
        s = scales_for(a_prev, alpha, w_mean)
        s_full = s[idx] if idx is not None else s
        losses_t.append(runner.loss_tensor([scaled_fake_quant(w, s_full, qcfg) for w in ws], ref))
    del ref
    losses = torch.stack(losses_t).double().cpu().tolist()  # the one host sync of this group
    i = select_alpha(losses, scfg.alpha_select)  # first minimum: ties keep the smaller α; NaN never wins
    extra = {}
    if i is None:  # every loss was NaN/inf: fall back to s ≡ 1 (RTN)
        best_alpha, best_loss = 0.0, losses[0]
        best_s = scales_for(a_prev, 0.0, None)
    else:
        best_alpha, best_loss = alphas[i], losses[i]
        best_s = scales_for(a_prev, best_alpha, w_mean)
    if scfg.alpha_select != "argmin":  # what the plain argmin would have chosen (default records unchanged)
        j = select_alpha(losses, "argmin")
        extra["argmin_alpha"] = alphas[j] if j is not None else None
        extra["argmin_loss"] = losses[j] if j is not None else None
    return GroupSearch(group.name, alphas, losses, best_alpha, best_loss, best_s.cpu(), a_prev.float().cpu(),
                       extra)


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor, spec: ArchSpec, attn: AttnShape) -> torch.Tensor:
    """Fold s into the block exactly: prev op outputs ÷ s, scaled layers' input columns × s.

    RMSNorm computing x·(offset + w) becomes x·(offset + w)/s, i.e. w' = (offset + w)/s − offset.
    Returns s expanded to the scaled layers' input channels `[ci]`.
    """
    prev = get_module(block, group.prev_op)
    dev = prev.weight.device
    s = s.to(dev).float()
    if group.prev_kind == "norm":
        if spec.norm_offset:
            mark_fp32(prev)  # (offset + w)/s − offset is not representable in bf16
        w = prev.weight.data.float()
        prev.weight.data.copy_(((spec.norm_offset + w) / s - spec.norm_offset).to(prev.weight.dtype))
    else:
        prev.weight.data.copy_((prev.weight.data.float() / s[:, None]).to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.data.copy_((prev.bias.data.float() / s).to(prev.bias.dtype))
    s_full = s[attn.o_index(dev)] if group.gqa_fold else s
    for name in group.layers:
        lin = get_module(block, name)
        lin.weight.data.copy_((lin.weight.data.float() * s_full[None, :]).to(lin.weight.dtype))
    return s_full


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, qcfg: QuantConfig, scfg: SearchConfig,
                oc_batch: int = 256) -> torch.Tensor:
    """AutoAWQ-style clipping: per (row, group), the absmax shrink r ∈ {1, 1−1/n, …} (down to
    1 − max_shrink, exclusive) minimising the group's output error on sampled tokens:
      err_g(r) = mean_t ( x_t,g · (W_g − Q(clamp(W_g, ±r·absmax_g)))) )²
    w: `[co, ci]`, x: `[n_tok, ci]` (inputs already in the scaled space). Returns max_val `[co, n_group]`."""
    co, ci = w.shape
    g = effective_group_size(ci, qcfg.group_size)
    if x.shape[0] > scfg.clip_max_tokens:
        step = x.shape[0] // scfg.clip_max_tokens
        x = x[::step][: scfg.clip_max_tokens]
    x = x.float()
    pad = (-ci) % g
    xg = torch.cat([x, x.new_zeros(x.shape[0], pad)], 1) if pad else x
    xg = xg.reshape(x.shape[0], -1, g)  # [n_tok, n_group, g]; padded columns carry x = 0
    n_steps = int(scfg.clip_max_shrink * scfg.clip_grid)
    out = []
    for o0 in range(0, co, oc_batch):
        wb = w[o0:o0 + oc_batch].float()
        wg = group_view(wb, qcfg.group_size)  # [ob, n_group, g]
        absmax = wg.abs().amax(-1, keepdim=True)
        ref = torch.einsum("tng,ong->otn", xg, wg)
        best_err = torch.full(absmax.shape[:2], float("inf"), device=w.device)
        best_max = absmax.squeeze(-1).clone()
        for i in range(n_steps):
            mx = absmax * (1 - i / scfg.clip_grid)
            cw = torch.clamp(wg, -mx, mx).reshape(wb.shape[0], -1)[:, :ci]
            qw = group_view(fake_quant(cw, qcfg), qcfg.group_size)
            err = (torch.einsum("tng,ong->otn", xg, qw) - ref).pow(2).mean(1)  # [ob, n_group]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, mx.squeeze(-1), best_max)
        out.append(best_max)
    return torch.cat(out, 0)


@torch.no_grad()
def apply_clip(lin: nn.Linear, max_val: torch.Tensor, qcfg: QuantConfig) -> None:
    """Clamp each (row, group) of the weight to ±max_val `[co, n_group]`."""
    w = lin.weight.data
    ci = w.shape[1]
    mv = expand_groups(max_val.to(w.device).float(), ci, qcfg.group_size)
    lin.weight.data.copy_(torch.clamp(w.float(), -mv, mv).to(w.dtype))


class Clip(Step):
    """The scaler of methods without a scale search (gptq): AutoAWQ's clip search alone (when
    `SearchConfig.clip`), on every linear outside clip_skip and the plan. Record: LayerRecord.clip
    (linear → max_val `[co, n_group]`); replay: `replay_scales`."""

    searches_scales = False
    needs_calibration = True

    def scale(self, ctx: BlockContext, rec, salience) -> None:
        """Search and fold this block's scales (none here)."""

    @torch.no_grad()
    def clip(self, ctx: BlockContext, rec, planned: dict) -> None:
        """Search and apply the clip ranges of the block's linears (not the `planned` ones: clip
        ranges are for the base grid)."""
        cfg = self.cfg
        if not cfg.search.clip:
            return
        spec, block = ctx.spec, ctx.block
        skip = {n for g in spec.groups for n in g.clip_skip} | set(planned)
        for name in spec.linears:
            if name in skip:
                continue
            lin = get_module(block, name)
            x = ctx.sample_inputs(ctx.input_key[name], cfg.search.clip_max_tokens, lin.weight.device)
            mv = search_clip(lin.weight.data, x, cfg.quant, cfg.search)
            apply_clip(lin, mv, cfg.quant)
            rec.clip[name] = mv.cpu()


class AWQGrid(Clip):
    """The scaler of awq: per scale group, the α grid search on the method's salience
    (`search_group`), the exact fold (`fold_scales`; the group's inputs move to the scaled space,
    `ctx.scale_of` keeps s), then `Clip`. Record: LayerRecord.groups (group → GroupSearch) and
    .clip; evidence: the α→loss curves."""

    searches_scales = True

    @torch.no_grad()
    def scale(self, ctx: BlockContext, rec, salience) -> None:
        cfg = self.cfg
        block, spec, attn = ctx.block, ctx.spec, ctx.attn
        for group in spec.groups:
            key = group.layers[0]
            a = salience(ctx, group)
            runner = InspectRunner(block, group, ctx.inputs[key], [kw for kw in ctx.kwargs])
            gs = search_group(block, group, a, runner, cfg.quant, cfg.search, attn)
            s_full = fold_scales(block, group, gs.scales, spec, attn)
            ctx.inputs[key] = [x / s_full.to(x.device, x.dtype) for x in ctx.inputs[key]]
            ctx.scale_of[key] = s_full
            rec.groups[group.name] = gs


@torch.no_grad()
def replay_scales(block: nn.Module, rec, spec: ArchSpec, attn: AttnShape, qcfg: QuantConfig) -> None:
    """Redo a scaler's record on a fresh block: fold the recorded scales, clamp the recorded clip ranges."""
    for group in spec.groups:
        if group.name in rec.groups:
            fold_scales(block, group, rec.groups[group.name].scales, spec, attn)
    for name, mv in rec.clip.items():
        apply_clip(get_module(block, name), mv, qcfg)
