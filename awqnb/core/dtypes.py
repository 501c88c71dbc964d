"""Dtypes by name, and the float32 mark on parameters that stay float32 in a lower-precision model."""
from __future__ import annotations

import torch
from torch import nn

from awqnb.core.config import DTYPE_NAMES
from awqnb.core.errors import AwqnbError

# On a module: the names of its parameters that stay float32 (cast, offload). Kept on the module, not
# the Parameter, because `copy.deepcopy` of a Parameter drops its attributes.
KEEP_FP32 = "_awqnb_keep_fp32"

# The one dtype vocabulary: config.DTYPE_NAMES ('auto' = the model's own dtype, then these names) and
# the short aliases the CLI and configs accept. A checkpoint's config.json names its dtype the same way.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
assert set(DTYPE_NAMES) - {"auto"} <= set(DTYPES)


def parse_dtype(dtype) -> torch.dtype | None:
    """'auto'/None → None (the model's own dtype); a name or torch.dtype → that dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise AwqnbError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPE_NAMES)}.")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def mark_fp32(module: nn.Module, name: str = "weight") -> None:
    """Store `module.<name>` in float32 from now on (exact folded (1+w) norm gains in a bf16 model)."""
    p = getattr(module, name)
    if p.dtype != torch.float32:
        p.data = p.data.float()
    setattr(module, KEEP_FP32, set(getattr(module, KEEP_FP32, ())) | {name})


def fp32_names(module: nn.Module) -> set[str]:
    """Qualified names of the parameters under `module` that `mark_fp32` marked."""
    return {f"{mn}.{n}" if mn else n for mn, m in module.named_modules() for n in getattr(m, KEEP_FP32, ())}
