"""Where a model runs and in what dtype: `resolve_device` ('auto' → cuda / mps / cpu, anything else
checked) and `cast_parameters` (floating parameters only, RoPE buffers and fp32-marked norms kept)."""
from __future__ import annotations

import torch
from torch import nn

from awqnb.core.dtypes import fp32_names
from awqnb.core.errors import AwqnbError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' → cuda:0 if available, else mps, else cpu; anything else is checked."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise AwqnbError(f"device {device!r} is not a valid torch device ({e}); use auto, cpu or cuda:0.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AwqnbError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu.")
    return dev


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters to `dtype`, leaving buffers (RoPE `inv_freq` must stay fp32:
    `model.to(bf16)` rounds it, an angle error of 0.7 rad at position 511) and parameters marked
    float32 by the quantizer (folded (1+w) norms) as they are."""
    keep = fp32_names(model)
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != dtype and name not in keep:
            p.data = p.data.to(dtype)
    return model

