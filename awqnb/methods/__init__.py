"""Quantization methods, by name. Importing this package registers every method."""
from .base import REGISTRY, BlockContext, Method, get_method, register
from . import standard as _standard  # noqa: F401  (registers)

__all__ = ["REGISTRY", "BlockContext", "Method", "get_method", "register"]
