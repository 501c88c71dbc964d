"""One quantization run's configuration: method, grid, search, lm_head, batches, dtype and
mixed-precision plan (`awqnb.quant.plan.Plan`), frozen and validated, passed whole to the quantizers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from awqnb.core.config import DTYPE_NAMES, QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.quant.plan import Plan


@dataclass(frozen=True)
class MethodConfig:
    """One quantization run.

    method: a registered method name ('rtn', 'awq', ...); 'full_<name>' is the same method per
    channel (group_size forced to -1: the seeds' "Full-" variants). params: method-specific
    parameters (validated by the method). lm_head: 'fp16' keeps it in full precision, 'quantize'
    rounds it in `lmhead_chunks` row chunks. layer_batch_size: decoder blocks calibrated per pass
    (their activations are held together). calib_batch_size: calibration samples per forward.
    dtype: compute dtype of the capture and search forwards ('auto' = the model's own dtype).
    plan: an `awqnb.quant.plan.Plan` (or its JSON document / entry list): (layer, family) kept at other
    bits (8: round to nearest at 8 bits; 16: floating point); None or empty = every family at `quant`.
    """

    method: str = "awq"
    quant: QuantConfig = field(default_factory=QuantConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    params: Mapping[str, Any] = field(default_factory=dict)
    lm_head: str = "fp16"
    lmhead_chunks: int = 8
    layer_batch_size: int = 1
    calib_batch_size: int = 16
    seed: int = 42
    dtype: str = "auto"
    plan: Any = None

    def __post_init__(self):
        if self.method.startswith("full_"):
            object.__setattr__(self, "method", self.method[len("full_"):])
            object.__setattr__(self, "quant", dataclasses.replace(self.quant, group_size=-1))
        if self.lm_head not in ("fp16", "quantize"):
            raise AwqnbError(f"lm_head={self.lm_head!r} is unknown; use 'fp16' or 'quantize'.")
        if self.lmhead_chunks < 1:
            raise AwqnbError("lmhead_chunks must be at least 1.")
        if self.layer_batch_size < 1:
            raise AwqnbError("layer_batch_size must be at least 1.")
        if self.calib_batch_size < 1:
            raise AwqnbError("calib_batch_size must be at least 1.")
        if self.dtype not in DTYPE_NAMES:
            raise AwqnbError(f"dtype={self.dtype!r} is unknown; use one of {', '.join(DTYPE_NAMES)}.")
        object.__setattr__(self, "params", dict(self.params))
        if self.plan is not None:
            plan = Plan.from_obj(self.plan)
            object.__setattr__(self, "plan", plan if plan else None)  # empty plan: same run as none

    @property
    def tag(self) -> str:
        head = "headfp16" if self.lm_head == "fp16" else "headq"
        keep = f"_keep{len(self.plan)}" if self.plan else ""
        return f"{self.method}_{self.quant.tag}_{head}{keep}"

    def to_dict(self) -> dict:
        d = {
            "method": self.method,
            "quant": self.quant.to_dict(),
            "search": self.search.to_dict(),
            "params": dict(self.params),
            "lm_head": self.lm_head,
            "lmhead_chunks": self.lmhead_chunks,
            "layer_batch_size": self.layer_batch_size,
            "calib_batch_size": self.calib_batch_size,
            "seed": self.seed,
            "dtype": self.dtype,
        }
        if self.plan:  # only when set: configs without a plan keep their hash (output directory names)
            d["plan"] = self.plan.to_list()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MethodConfig":
        d = dict(d)
        d["quant"] = QuantConfig(**d.get("quant", {}))
        d["search"] = SearchConfig(**d.get("search", {}))
        return cls(**d)
