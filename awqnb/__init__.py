"""awqnb: activation-aware weight quantization workbench."""
__version__ = "0.1.0"

__all__ = ["quantize_with_awq", "detect_quantization"]


def __getattr__(name):
    # lazy: `import awqnb` stays light (no torch) until the API is used
    if name in __all__:
        from awqnb import api

        return getattr(api, name)
    raise AttributeError(f"module 'awqnb' has no attribute {name!r}")
