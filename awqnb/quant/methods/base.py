"""The method interface the pipeline calls, and the registry of method names."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import fake_quant
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


class Method:
    """Base quantization method: round-to-nearest of every block linear, no scale search.

    Subclasses override: `salience` (importance driving the α search), `round_linear` (the final
    rounding of one linear) and `finish_block` (refinement after the block is rounded).
    PARAMS: method-specific parameters and their defaults (validated against MethodConfig.params).
    """

    name = "base"
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

    def salience(self, ctx: BlockContext, group: ScaleGroup) -> torch.Tensor:
        """Salience `[ci]` of the group's input channels (used by scale-searching methods)."""
        st = ctx.stats[group.layers[0]]
        if self.cfg.search.salience == "l1":
            return st.mean_abs
        return st.mean_sq.sqrt()

    @torch.no_grad()
    def round_linear(self, ctx: BlockContext | None, name: str, lin: nn.Linear) -> dict | None:
        """Replace the weight by its rounded version; return replay data for `apply` (or None)."""
        lin.weight.data.copy_(fake_quant(lin.weight.data, self.cfg.quant))
        return None

    @torch.no_grad()
    def replay_linear(self, name: str, lin: nn.Linear, replay: dict | None) -> None:
        """Redo `round_linear` from its replay data, without calibration."""
        lin.weight.data.copy_(fake_quant(lin.weight.data, self.cfg.quant))

    def finish_block(self, ctx: BlockContext) -> None:
        """Refine a block after all its linears were rounded (records go in ctx.evidence)."""


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class for a name; 'full_<name>' is <name> (MethodConfig sets group_size -1)."""
    if name.startswith("full_"):
        name = name[len("full_"):]
    if name not in REGISTRY:
        raise AwqnbError(f"unknown method {name!r}; available methods: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[name]
