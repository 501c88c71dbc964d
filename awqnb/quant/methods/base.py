"""A method as data: the block context, the step interface, the composite `Method` and the registry.

A method is a composition of steps, each owning its part of the block algorithm, its parameters
(`PARAMS`), its evidence (`ctx.evidence[...]`) and its replay record:

    salience   importance `[ci]` of a scale group's input channels (`Activation`: L1/L2; praq.py)
    scaler     what happens to the weights before rounding (awq.py: `Clip`, `AWQGrid` = α search,
               fold, clip); None: nothing (the weights are rounded as they are)
    rounder    the final rounding of each linear (`Nearest`; rounding.py: the flip heuristics;
               gptq.py: GPTQ)
    refiners   changes to the rounded block (gqa.py: `ReFlip` of q_proj)

`register(name, doc, salience=..., scaler=..., rounder=..., refiners=(...))` makes one method; the
registry in `awqnb.quant.methods` is one such line per method. The pipeline walks the blocks and
calls the method's steps in that order (`pipeline.quantize_block`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import compute_qparams, dequantize, fake_quant, quantize
from awqnb.engine.capture import ChannelStats
from awqnb.model.arch import ArchSpec, AttnShape, ScaleGroup
from awqnb.quant.method_config import MethodConfig


@dataclass
class BlockContext:
    """One decoder block while it is being quantized.

    inputs[key]: list of `[b, T, c]` chunk inputs of the linears read at input point `key` (the
    first layer of a scale group: q_proj for q/k/v, gate_proj for gate/up, ...), in the block's
    current (already scaled) space. stats[key]: streaming channel statistics of the same, taken
    before any scale was folded. kwargs: per-chunk attention kwargs.
    """

    index: int
    block: nn.Module
    spec: ArchSpec
    attn: AttnShape
    inputs: dict[str, list[torch.Tensor]]
    stats: dict[str, ChannelStats]
    kwargs: list[dict]
    input_key: dict[str, str]  # linear name → input point key
    scale_of: dict[str, torch.Tensor] = field(default_factory=dict)  # key → folded s `[c]`
    evidence: dict[str, Any] = field(default_factory=dict)

    def flat_inputs(self, key: str) -> torch.Tensor:
        """All calibration tokens at an input point, current space: `[n_tok, c]`."""
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in self.inputs[key]], 0)

    def sample_inputs(self, key: str, max_tokens: int, device=None) -> torch.Tensor:
        """Every `step`-th calibration token at an input point (step = n_tok // max_tokens), at
        most `max_tokens`, taken chunk by chunk (all tokens are never concatenated): `[n, c]`."""
        xs = self.inputs[key]
        total = sum(x.numel() // x.shape[-1] for x in xs)
        step = max(1, total // max_tokens) if total > max_tokens else 1
        out, offset = [], 0
        for x in xs:
            flat = x.reshape(-1, x.shape[-1])
            first = (-offset) % step
            out.append(flat[first::step].to(device if device is not None else flat.device))
            offset += flat.shape[0]
        return torch.cat(out, 0)[:max_tokens]


def channel_salience(st: ChannelStats, kind: str) -> torch.Tensor:
    """The one L1/L2 salience `[c]` of an input point's channels, before scaling (from its
    streaming stats): 'l1' E|x|, 'l2' sqrt(E[x²])."""
    return st.mean_abs if kind == "l1" else st.mean_sq.clamp(min=0).sqrt()


class Step:
    """One part of a method. The registry holds a prototype; each `Method(cfg)` binds its own copy
    (`bind`: the run's config and merged parameters, then `setup` validates them and starts state).

    PARAMS: the step's parameters and defaults (a method's PARAMS are the union of its steps').
    needs_calibration: the step reads calibration inputs (a method needs calibration if any does).
    """

    PARAMS: dict[str, Any] = {}
    needs_calibration = False

    def bind(self, method: "Method") -> "Step":
        s = copy.copy(self)
        s.cfg = method.cfg
        s.params = method.params
        s.setup()
        return s

    def setup(self) -> None:
        """Validate `self.params` (raise AwqnbError) and start per-run state."""

    def finish_block(self, ctx: BlockContext) -> None:
        """The block is rounded and refined: drop this block's state."""


class Activation(Step):
    """Salience from the input activations: L1 `E|x|` or L2 `sqrt(E[x²])` per `SearchConfig.salience`."""

    needs_calibration = True

    def salience(self, ctx: BlockContext, group: ScaleGroup) -> torch.Tensor:
        """Salience `[ci]` of the group's input channels (drives the α search)."""
        return channel_salience(ctx.stats[group.layers[0]], self.cfg.search.salience)


class Nearest(Step):
    """Round-to-nearest `Q(W)` of each linear; no replay data (apply rounds again)."""

    @torch.no_grad()
    def round_linear(self, ctx: BlockContext | None, name: str, lin: nn.Linear) -> dict | None:
        """Replace the weight by its rounded version; return replay data for `apply` (or None)."""
        lin.weight.data.copy_(fake_quant(lin.weight.data, self.cfg.quant))
        return None

    @torch.no_grad()
    def round_codes(self, ctx: BlockContext, name: str, lin: nn.Linear):
        """Round `lin` and return (replay, (q0, q, scale, zero)): its integer codes before and after
        this rounder's own changes and the grid, for a refiner that changes codes (`recode`)."""
        fp = lin.weight.data.float().clone()
        scale, zero = compute_qparams(fp, self.cfg.quant)
        q0 = quantize(fp, scale, zero, self.cfg.quant)
        lin.weight.data.copy_(dequantize(q0, scale, zero, self.cfg.quant).to(lin.weight.dtype))
        return code_delta(q0, q0), (q0, q0, scale, zero)

    def recode(self, replay: dict, q0: torch.Tensor, q: torch.Tensor) -> None:
        """Rewrite a `round_codes` replay record (in place) for the codes `q`."""
        replay.update(code_delta(q0, q))

    @torch.no_grad()
    def replay_linear(self, name: str, lin: nn.Linear, replay: dict | None) -> None:
        """Redo `round_linear` without calibration: round to nearest, then add the recorded code
        changes (`code_delta`), if any."""
        if replay is None:
            lin.weight.data.copy_(fake_quant(lin.weight.data, self.cfg.quant))
            return
        w = lin.weight.data
        scale, zero = compute_qparams(w, self.cfg.quant)
        q = apply_code_delta(quantize(w.float(), scale, zero, self.cfg.quant), replay)
        w.copy_(dequantize(q, scale, zero, self.cfg.quant).to(w.dtype))


def code_delta(q0: torch.Tensor, q: torch.Tensor) -> dict:
    """Replay data: flattened indices `[n]` (int32, int64 past 2**31) and int8 code changes
    `q − q0` of the changed weights, on the CPU."""
    diff = (q - q0).flatten()
    idx = torch.nonzero(diff, as_tuple=False).flatten()
    itype = torch.int32 if q.numel() < 2**31 else torch.int64
    return {"idx": idx.to(itype).cpu(), "delta": diff[idx].to(torch.int8).cpu()}


def apply_code_delta(q0: torch.Tensor, replay: dict) -> torch.Tensor:
    """`q0` with the recorded code changes added."""
    q = q0.clone()
    if replay is not None and replay["idx"].numel():
        q.view(-1)[replay["idx"].to(q.device).long()] += replay["delta"].to(device=q.device, dtype=q.dtype)
    return q


class Method:
    """A composition of steps bound to one run's config (`register` makes the subclasses).

    The pipeline calls, per block: `salience` + `scaler.scale` per scale group (when the scaler
    searches scales), `scaler.clip`, `round_linear` per linear, `finish_block`; `replay_linear`
    redoes the rounding from the records.
    """

    name = "base"
    salience_step: Step | None = None
    scaler_step: Step | None = None
    rounder_step: Step = Nearest()
    refiner_steps: tuple[Step, ...] = ()
    searches_scales = False
    needs_calibration = False
    PARAMS: dict[str, Any] = {}

    def __init__(self, cfg: MethodConfig):
        unknown = set(cfg.params) - set(self.PARAMS)
        if unknown:
            raise AwqnbError(
                f"method {self.name!r} has no parameter(s) {sorted(unknown)}; "
                f"its parameters are {sorted(self.PARAMS) or 'none'}."
            )
        self.cfg = cfg
        self.params = {**self.PARAMS, **cfg.params}
        bind = lambda s: s.bind(self) if s is not None else None  # noqa: E731
        self.rounder = bind(self.rounder_step)
        self.refiners = tuple(bind(s) for s in self.refiner_steps)
        self.scaler = bind(self.scaler_step)
        self.salience_of = bind(self.salience_step)

    def steps(self) -> list[Step]:
        return [s for s in (self.salience_of, self.scaler, self.rounder, *self.refiners) if s is not None]

    def salience(self, ctx: BlockContext, group: ScaleGroup) -> torch.Tensor:
        """Salience `[ci]` of the group's input channels (used by scale-searching methods)."""
        return self.salience_of.salience(ctx, group)

    @torch.no_grad()
    def round_linear(self, ctx: BlockContext | None, name: str, lin: nn.Linear) -> dict | None:
        """Round one linear (a refiner that wants it rounds it through the rounder); return its
        replay data for `apply` (or None)."""
        if ctx is not None:
            for r in self.refiners:
                if r.wants(ctx, name):
                    return r.round_linear(ctx, name, lin, self.rounder)
        return self.rounder.round_linear(ctx, name, lin)

    @torch.no_grad()
    def replay_linear(self, name: str, lin: nn.Linear, replay: dict | None) -> None:
        """Redo `round_linear` from its replay data, without calibration."""
        self.rounder.replay_linear(name, lin, replay)

    def finish_block(self, ctx: BlockContext) -> None:
        """Refine the block after all its linears were rounded (records go in ctx.evidence)."""
        for r in self.refiners:
            r.refine(ctx, self.rounder)
        for s in self.steps():
            s.finish_block(ctx)


REGISTRY: dict[str, type[Method]] = {}


def register(name: str, doc: str, salience: Step | None = None, scaler: Step | None = None,
             rounder: Step | None = None, refiners: tuple[Step, ...] = ()) -> type[Method]:
    """Register the method `name` as a composition of steps; `doc`'s first line is what
    `awqnb quantize --list` prints. PARAMS: the union of the steps' (salience, scaler, rounder,
    refiners order); needs_calibration: any step's; searches_scales: the scaler's."""
    rounder = rounder if rounder is not None else Nearest()
    steps = [s for s in (salience, scaler, rounder, *refiners) if s is not None]
    params: dict[str, Any] = {}
    for s in steps:
        params.update(s.PARAMS)
    searches = bool(getattr(scaler, "searches_scales", False))
    if searches and salience is None:
        raise AwqnbError(f"method {name!r}: a scaler that searches scales needs a salience step.")
    cls = type(f"Method_{name}", (Method,), {
        "__doc__": doc, "name": name, "salience_step": salience, "scaler_step": scaler, "rounder_step": rounder,
        "refiner_steps": tuple(refiners), "searches_scales": searches, "PARAMS": params,
        "needs_calibration": any(s.needs_calibration for s in steps), "__module__": __name__})
    REGISTRY[name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class for a name; 'full_<name>' is <name> (MethodConfig sets group_size -1)."""
    if name.startswith("full_"):
        name = name[len("full_"):]
    if name not in REGISTRY:
        raise AwqnbError(f"unknown method {name!r}; available methods: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[name]
