"""Random-initialised test models (`tiny-random-llama`, `tiny-random-gemma3`): GQA, hidden sizes that
are not multiples of 128, random norms with a few outlier channels, SmolLM2's tokenizer;
deterministic for a seed."""
from __future__ import annotations

import torch
from torch import nn

from awqnb.model.arch import resolve_spec
from awqnb.model.gguf import gguf_cache


def _tiny_config(kind: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, hidden_size=160, intermediate_size=224, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True)
    if kind == "tiny-random-llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, head_dim=40, rms_norm_eps=1e-5, hidden_act="silu")
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**common, head_dim=48, hidden_activation="gelu_pytorch_tanh", sliding_window=32,
                            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=48)


@torch.no_grad()
def _perturb_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Random norm gains with a few loud channels, so that activation outliers exist (as in real
    models) and AWQ has something to find."""
    spec = resolve_spec(model)
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if w is None or w.dim() != 1 or "norm" not in name.split(".")[-1]:
            continue
        gain = 0.5 + torch.rand(w.shape, generator=gen)
        loud = torch.randperm(w.numel(), generator=gen)[: max(1, w.numel() // 32)]
        gain[loud] *= 8.0
        w.copy_(gain - spec.norm_offset)


def build_tiny(kind: str, seed: int = 0):
    """A random-initialised model of the given tiny kind, deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer_smollm2()
    cfg = _tiny_config(kind, len(tok))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _perturb_norms(model, torch.Generator().manual_seed(seed))
    model.eval()
    return model, tok


def load_tokenizer_smollm2():
    """SmolLM2's tokenizer (from the converted cache, converting the GGUF once if needed)."""
    from transformers import AutoTokenizer

    d = gguf_cache("smollm2-135m")
    return AutoTokenizer.from_pretrained(d)
