"""awqnb: activation-aware weight quantization workbench."""
__version__ = "0.1.0"
