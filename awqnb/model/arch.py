"""Architecture as data: which ops feed which linears, per model family.

A `ScaleGroup` says: divide the output channels of `prev_op` by s, multiply the input columns
of each of `layers` by s, and judge the choice of s by the output of `inspect`.
Generic code reads these specs; it never branches on `model_type`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from awqnb.core.errors import AwqnbError


@dataclass(frozen=True)
class ScaleGroup:
    """One AWQ scale group inside a decoder block (names relative to the block).

    prev_kind: 'norm' (an RMSNorm; `norm_offset` of the spec applies) or 'linear'.
    inspect_kind: 'attention' (called with the block's attention kwargs), 'module' or 'linear'.
    gqa_fold: the scale lives on v_proj's `[n_kv * head_dim]` outputs and is repeated over the
    `n_rep` query heads that read each kv head to reach o_proj's `[n_heads * head_dim]` inputs.
    """

    name: str
    prev_op: str
    prev_kind: str
    layers: tuple[str, ...]
    inspect: str
    inspect_kind: str
    gqa_fold: bool = False
    clip_skip: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchSpec:
    """A model family: where the blocks are, their scale groups and quantized linears."""

    family: str
    model_types: tuple[str, ...]
    blocks_path: str
    norm_offset: float  # RMSNorm computes x * (offset + w): 0 for Llama, 1 for Gemma
    groups: tuple[ScaleGroup, ...]
    linears: tuple[str, ...]
    activation_attr: str  # config attribute naming the MLP activation
    mlp_gate: str = "mlp.gate_proj"
    mlp_up: str = "mlp.up_proj"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LINEARS = _ATTN + ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _groups(mlp_norm: str) -> tuple[ScaleGroup, ...]:
    return (
        ScaleGroup("qkv", "input_layernorm", "norm", _ATTN, "self_attn", "attention",
                   clip_skip=("self_attn.q_proj", "self_attn.k_proj")),
        ScaleGroup("vo", "self_attn.v_proj", "linear", ("self_attn.o_proj",), "self_attn.o_proj",
                   "linear", gqa_fold=True),
        ScaleGroup("gate_up", mlp_norm, "norm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", "module"),
        ScaleGroup("down", "mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj", "linear"),
    )


LLAMA = ArchSpec(
    family="llama",
    model_types=("llama", "qwen2", "mistral", "qwen3"),
    blocks_path="model.layers",
    norm_offset=0.0,
    groups=_groups("post_attention_layernorm"),
    linears=_LINEARS,
    activation_attr="hidden_act",
)

GEMMA3 = ArchSpec(
    family="gemma3",
    model_types=("gemma3_text", "gemma3"),
    blocks_path="model.layers",
    norm_offset=1.0,
    groups=_groups("pre_feedforward_layernorm"),
    linears=_LINEARS,
    activation_attr="hidden_activation",
)

SPECS = (LLAMA, GEMMA3)


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for s in SPECS for t in s.model_types)


# Families with fused projections (one qkv_proj, one gate_up_proj): AWQ's scale groups need the
# separate linears, so these are refused by name rather than mis-quantized.
FUSED_FAMILIES = ("phi3", "phimoe", "chatglm", "glm", "gpt_bigcode", "falcon", "bloom", "gpt_neox", "mpt", "dbrx")


def check_model_type(model_type, where: str = "the model", architectures=None) -> None:
    """AwqnbError unless `model_type` is one awqnb has an ArchSpec for (from a config, before any
    weights are loaded)."""
    if any(model_type in s.model_types for s in SPECS):
        return
    why = (" (it fuses q/k/v or gate/up into one projection, which AWQ's scale groups cannot split)"
           if model_type in FUSED_FAMILIES else "")
    arch = f" {architectures[0]}" if isinstance(architectures, list) and architectures else ""
    raise AwqnbError(
        f"{where}: architecture {model_type!r}{arch} is not supported{why}; awqnb quantizes "
        f"{', '.join(supported_model_types())} models (Llama and Gemma 3 families). "
        "Add an ArchSpec for it in awqnb/model/arch.py."
    )


def resolve_spec(model: nn.Module) -> ArchSpec:
    """The ArchSpec for a HF causal LM, or a clear error for an unsupported architecture."""
    mt = getattr(model.config, "model_type", None)
    for spec in SPECS:
        if mt in spec.model_types:
            return spec
    raise AwqnbError(
        f"architecture {mt!r} is not supported; awqnb quantizes {', '.join(supported_model_types())}. "
        "Add an ArchSpec for it in awqnb/model/arch.py."
    )


@dataclass(frozen=True)
class AttnShape:
    """GQA facts read from the config: query head h reads kv head h // n_rep."""

    n_heads: int
    n_kv: int
    head_dim: int

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv

    def o_index(self, device=None) -> torch.Tensor:
        """For each o_proj input channel (h*head_dim + d), the v_proj output it reads:
        `(h // n_rep) * head_dim + d`. `[n_heads * head_dim]` long."""
        h = torch.arange(self.n_heads, device=device).repeat_interleave(self.head_dim)
        d = torch.arange(self.head_dim, device=device).repeat(self.n_heads)
        return (h // self.n_rep) * self.head_dim + d


def attn_shape(config) -> AttnShape:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return AttnShape(n_heads, n_kv, head_dim)


def get_module(root: nn.Module, path: str) -> nn.Module:
    m = root
    for part in path.split("."):
        m = getattr(m, part)
    return m


def blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return get_module(model, spec.blocks_path)
