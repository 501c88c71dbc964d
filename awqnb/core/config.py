"""Frozen, validated configuration passed whole to the quantizers.

`QuantConfig` is the integer grid, `SearchConfig` the AWQ scale search; a full quantization run
(`MethodConfig`, with its mixed-precision plan) lives in `awqnb.quant.method_config`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from awqnb.core.errors import AwqnbError

SUPPORTED_BITS = (2, 3, 4, 8)
# Compute dtype of the block forwards ('auto': the model's own dtype); quantization math
# (scales, zero points, folded norms) is float32 whatever this says.
DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")
# How the α search picks α from its loss curve (methods/awq.py select_alpha): 'argmin' of the
# losses, or 'smooth' = argmin of their 3-point moving average over the grid.
ALPHA_SELECT = ("argmin", "smooth")


def parse_value(text: str):
    """An override's value (a method spec's `key=value`): an int, else a float, else true/false
    (any case), else the text."""
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


@dataclass(frozen=True)
class QuantConfig:
    """Group-wise uniform integer grid.

    bits: 2, 3, 4 or 8. group_size: input channels per group, or -1 for one group per row.
    symmetric: [-(2**(b-1)-1), 2**(b-1)-1] around zero instead of asymmetric [0, 2**b-1].
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise AwqnbError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}.")
        if self.group_size != -1 and self.group_size < 2:
            raise AwqnbError(
                f"group_size={self.group_size} is invalid; use a positive size such as 64 or 128, "
                "or -1 for one group per output row."
            )

    @property
    def tag(self) -> str:
        g = "ch" if self.group_size == -1 else str(self.group_size)
        return f"w{self.bits}_g{g}" + ("_sym" if self.symmetric else "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SearchConfig:
    """AWQ scale search (see METHODS.md, awq).

    salience: 'l1' (E|x|, reference AWQ) or 'l2' (sqrt(E[x^2]), the seeds' default).
    n_grid: alpha in {0, 1/n_grid, ..., 1}. duo_scaling: AutoAWQ's s = a**alpha / w_mean**(1-alpha).
    clip: AutoAWQ-style per-group max shrink search. propagate: what the next block sees,
    'quantized' (block N's quantized output) or 'fp' (the full-precision output).
    alpha_select: 'argmin' (α* = the grid point of least loss) or 'smooth' (the least 3-point moving
    average of the loss over the grid: a broad minimum wins over a one-point dip; issue 15).
    """

    n_grid: int = 20
    salience: str = "l2"
    duo_scaling: bool = False
    clip: bool = False
    propagate: str = "quantized"
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_max_tokens: int = 512
    alpha_select: str = "argmin"

    def __post_init__(self):
        if self.alpha_select not in ALPHA_SELECT:
            raise AwqnbError(f"alpha_select={self.alpha_select!r} is unknown; use one of {', '.join(ALPHA_SELECT)}.")
        if self.salience not in ("l1", "l2"):
            raise AwqnbError(f"salience={self.salience!r} is unknown; use 'l1' or 'l2'.")
        if self.propagate not in ("quantized", "fp"):
            raise AwqnbError(f"propagate={self.propagate!r} is unknown; use 'quantized' or 'fp'.")
        if self.n_grid < 1:
            raise AwqnbError(f"n_grid={self.n_grid} must be at least 1 (20 gives 21 alpha points).")
        if not 0.0 < self.clip_max_shrink < 1.0:
            raise AwqnbError("clip_max_shrink must lie in (0, 1); 0.5 searches 1.0 down to 0.55.")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["alpha_select"] == "argmin":  # the default is left out: earlier configs keep their hash
            del d["alpha_select"]
        return d
