"""Quantization methods, by name. Importing this package registers every method."""
from awqnb.quant.methods.base import REGISTRY, BlockContext, Method, get_method, register
from awqnb.quant.methods import standard as _standard  # noqa: F401  (registers)
from awqnb.quant.methods import rounding as _rounding  # noqa: F401  (registers awq_sh, awq_dh, awq_js)
from awqnb.quant.methods import gqa as _gqa  # noqa: F401  (registers awq_gqa)
from awqnb.quant.methods import praq as _praq  # noqa: F401  (registers praq, robust_praq)
from awqnb.quant.methods import gptq as _gptq  # noqa: F401  (registers gptq, awq_gptq)

__all__ = ["REGISTRY", "BlockContext", "Method", "get_method", "register"]
