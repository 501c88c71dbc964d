"""Where awqnb keeps its caches, and the one `versions()`: what every result records it was made with."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch


def cache_dir() -> Path:
    root = os.environ.get("AWQNB_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "awqnb"


def versions() -> dict:
    """Versions of everything a result depends on (goes into every report and metadata file): the one
    versions() of awqnb; a package that is not installed is None (read from metadata, never imported)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("awqnb", "torch", "transformers", "datasets", "numpy", "pandas", "gguf", "papermill", "plotly",
                "compressed-tensors", "llmcompressor"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out
