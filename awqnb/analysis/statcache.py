"""The diagnostics cache: results keyed by (kind, weights fingerprint, calibration, parameters),
kept in memory and on disk (`awqnb.model.provenance.cache_dir()/diagnostics/<kind>/<key>.*`, written
atomically, never pickled: a cache directory can be shared, and reading it must not run code), so a notebook re-run or a second notebook on the same model and calibration set
reads its statistics instead of recomputing them.

The disk location is `$AWQNB_DIAG_CACHE` when set (tests point it at a temporary directory).
The key never trusts names alone: `weights_fingerprint` hashes the config and, per parameter and
buffer, its shape, dtype and the bytes of a fixed strided sample of its values (a model quantized in
place, folded, or re-initialised gets a new key; a few thousand values per tensor, so keying an 8B or
70B model reads megabytes, not the model), `calibration_key` hashes the token ids next to
`Calibration.to_dict()`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import io
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from awqnb.core.errors import AwqnbError
from awqnb.core.files import atomic_write
from awqnb.model.provenance import cache_dir

log = logging.getLogger(__name__)

DIAG_VERSION = 1  # bump when a frame's definition changes: old cache entries are then ignored


FINGERPRINT_SAMPLE = 4096  # values hashed per tensor: all of a smaller one


def _sample_step(numel: int, last: int, n: int) -> int:
    """The stride of the sample: about numel / n, made coprime with the last dimension so the
    samples walk across every column, not down one (a row length dividing the stride would
    sample column 0 of each row only)."""
    step = max(1, numel // n)
    while step > 1 and math.gcd(step, max(last, 1)) != 1:
        step += 1
    return step


def _tensor_bytes(t: torch.Tensor, n: int = FINGERPRINT_SAMPLE) -> bytes:
    """The raw bytes of every `step`-th element of `t` (flattened), at most n of them: exact for
    the dtype (no float conversion), the same in every process."""
    flat = t.detach().reshape(-1)  # a view of a contiguous tensor: nothing is copied but the sample
    step = _sample_step(flat.numel(), t.shape[-1] if t.dim() else 1, n)
    s = flat[::step][:n].contiguous().cpu()
    try:
        return s.view(torch.uint8).numpy().tobytes()
    except (RuntimeError, TypeError):  # a dtype or tensor subclass with no byte view: its values
        return s.to(torch.float64).numpy().tobytes()


def weights_fingerprint(model: nn.Module) -> str:
    """sha1 of the config and, per parameter and buffer, its name, shape, dtype and the bytes of a
    fixed strided sample of at most `FINGERPRINT_SAMPLE` values (`_tensor_bytes`).

    Cost: O(FINGERPRINT_SAMPLE) per tensor, whatever the model's size. Sound for what changes
    weights here: quantizing a block, a fold (norm weights or rows/columns scaled), a plan or a
    re-initialisation rewrites whole tensors or whole rows/columns, so sampled values change. A
    tensor of at most FINGERPRINT_SAMPLE elements is hashed whole; in a larger one, an edit of
    only unsampled elements (a single hand-edited weight off the sample) does NOT change the key,
    and a cached result for the old weights would be returned: clear the cache (or pass
    cache=False) after such an edit. Stable across calls and processes (no id(), no randomness)."""
    h = hashlib.sha1()
    try:
        h.update(model.config.to_json_string(use_diff=True).encode())
    except Exception:  # noqa: BLE001  a config without JSON: its repr
        h.update(repr(model.config).encode())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for name, t in tensors:
            if t.is_meta:
                raise AwqnbError(f"{name} is on the meta device (not loaded): there are no weights to key the "
                                 "diagnostics cache by; load the model, or pass cache=False.")
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:".encode())
            h.update(_tensor_bytes(t))
            h.update(b";")
    return h.hexdigest()[:16]


def calibration_key(calibration) -> dict:
    """`Calibration.to_dict()` (when available) plus a sha1 of the token ids themselves."""
    info = calibration.to_dict() if hasattr(calibration, "to_dict") else {}
    if isinstance(calibration, torch.Tensor):
        samples = list(calibration.reshape(-1, calibration.shape[-1]))
    else:
        samples = list(getattr(calibration, "samples", calibration) or [])
    h = hashlib.sha1()
    for s in samples:
        h.update(s.detach().reshape(-1).to(torch.int64).cpu().numpy().tobytes())
        h.update(b"|")
    return {**info, "n_samples": len(samples), "ids_sha1": h.hexdigest()[:16]}


def _copy(obj):
    if hasattr(obj, "copy") and hasattr(obj, "columns"):
        return obj.copy(deep=True)
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


class DiagnosticsCache:
    """In-memory + on-disk cache of diagnostics results.

    key = sha1(kind, DIAG_VERSION, model fingerprint, calibration key, parameters); the disk copy is
    data only: `<key>.f<i>.parquet` per DataFrame, `<key>.safetensors` for arrays and tensors, and
    `<key>.json` (the readable key and the structure, written last: its presence marks a complete
    entry), each written atomically (temporary file + rename). Old `.pkl` entries are ignored. `get` returns a deep copy,
    so a caller that edits a frame does not edit the cache. `hits`, `misses` and `computed` count
    lookups; `memory=False` / `disk=False` turn a level off.
    """

    def __init__(self, root: str | Path | None = None, memory: bool = True, disk: bool = True):
        self._root = Path(root) if root is not None else None
        self.memory, self.disk = memory, disk
        self._mem: dict[str, Any] = {}
        self.hits = self.misses = self.computed = 0

    @property
    def root(self) -> Path:
        """`root` if given, else `$AWQNB_DIAG_CACHE`, else `awqnb.model.provenance.cache_dir()/diagnostics`."""
        if self._root is None:
            env = os.environ.get("AWQNB_DIAG_CACHE")
            if env:
                return Path(env).expanduser()
            return cache_dir() / "diagnostics"
        return self._root

    @staticmethod
    def key(kind: str, parts: Mapping[str, Any]) -> str:
        doc = json.dumps({"kind": kind, "version": DIAG_VERSION, **parts}, sort_keys=True, default=str)
        return hashlib.sha1(doc.encode()).hexdigest()[:20]

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.json"

    def contains(self, kind: str, parts: Mapping[str, Any]) -> bool:
        """Whether an entry exists (in memory or on disk) — without loading it."""
        key = self.key(kind, parts)
        return (self.memory and key in self._mem) or (self.disk and self._path(kind, key).is_file())

    def get_or_compute(self, kind: str, parts: Mapping[str, Any], compute: Callable[[], Any]):
        key = self.key(kind, parts)
        if self.memory and key in self._mem:
            self.hits += 1
            return _copy(self._mem[key])
        if self.disk:
            path = self._path(kind, key)
            if path.is_file():
                try:
                    obj = _read_entry(path)
                    self.hits += 1
                    if self.memory:
                        self._mem[key] = obj
                    return _copy(obj)
                except Exception as e:  # noqa: BLE001  a damaged entry is recomputed
                    log.warning("ignoring unreadable diagnostics cache entry %s: %s", path, e)
        self.misses += 1
        obj = compute()
        self.computed += 1
        if self.memory:
            self._mem[key] = obj
        if self.disk:
            try:
                self._write(kind, key, parts, obj)
            except (OSError, TypeError, ValueError) as e:  # disk trouble, or a value with no safe format
                log.warning("could not write the diagnostics cache under %s: %s", self.root, e)
        return _copy(obj)

    def _write(self, kind: str, key: str, parts: Mapping[str, Any], obj) -> None:
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        enc = _Encoder()
        data = enc.encode(obj)
        for i, frame in enumerate(enc.frames):
            buf = io.BytesIO()
            frame.to_parquet(buf)
            atomic_write(path.with_name(f"{key}.f{i}.parquet"), buf.getvalue())
        if enc.arrays or enc.tensors:
            atomic_write(path.with_name(f"{key}.safetensors"), _save_arrays(enc.arrays, enc.tensors))
        doc = {"format": "awqnb-diag/1", "key": {"kind": kind, "version": DIAG_VERSION, **parts}, "data": data}
        atomic_write(path, json.dumps(doc, indent=1, default=str))  # last: marks the entry complete

    def clear(self, disk: bool = False) -> None:
        """Forget the in-memory entries (and the disk entries with disk=True)."""
        self._mem.clear()
        if disk and self.root.is_dir():
            for p in self.root.glob("*/*"):
                if p.suffix in (".pkl", ".json", ".parquet", ".safetensors"):
                    p.unlink(missing_ok=True)


class _Encoder:
    """Frames, arrays and tensors out of a nested result into files; the rest into JSON tags."""

    def __init__(self):
        self.frames: list = []
        self.arrays: dict = {}
        self.tensors: dict = {}

    def encode(self, obj):
        import numpy as np

        if hasattr(obj, "to_parquet") and hasattr(obj, "columns"):
            self.frames.append(obj)
            return {"__frame__": len(self.frames) - 1}
        if isinstance(obj, torch.Tensor):
            k = f"t{len(self.tensors)}"
            self.tensors[k] = obj.detach().cpu().contiguous()
            return {"__tensor__": k}
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                raise TypeError("an object array has no safe on-disk format")
            k = f"a{len(self.arrays)}"
            self.arrays[k] = np.ascontiguousarray(obj)
            return {"__ndarray__": k}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {"__map__": {k: self.encode(v) for k, v in obj.items()}}
            return {"__dict__": [[self.encode(k), self.encode(v)] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v) for v in obj]}
        if isinstance(obj, list):
            return [self.encode(v) for v in obj]
        if isinstance(obj, float) and not math.isfinite(obj):
            return {"__float__": repr(obj)}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, np.generic):
            return {"__npscalar__": [obj.dtype.str, obj.item()]}
        raise TypeError(f"a {type(obj).__name__} has no safe on-disk format")


def _save_arrays(arrays: dict, tensors: dict) -> bytes:
    """One safetensors blob: numpy arrays under `a*`, torch tensors under `t*` (kept apart by the
    key prefix, so each comes back as the type it was)."""
    from safetensors.torch import save

    both = {k: torch.from_numpy(v) for k, v in arrays.items()}
    both.update(tensors)
    return save(both)


def _read_entry(path: Path):
    """Decode an entry written by `_write` (JSON, parquet and safetensors only: nothing executes)."""
    import numpy as np
    import pandas as pd
    from safetensors.torch import load_file

    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or doc.get("format") != "awqnb-diag/1":
        raise ValueError("not an awqnb diagnostics entry")
    key = path.stem
    st = path.with_name(f"{key}.safetensors")
    blobs = load_file(str(st)) if st.is_file() else {}

    def dec(o):
        if isinstance(o, list):
            return [dec(v) for v in o]
        if not isinstance(o, dict):
            return o
        (tag, v), = o.items()
        if tag == "__frame__":
            return pd.read_parquet(path.with_name(f"{key}.f{int(v)}.parquet"))
        if tag == "__tensor__":
            return blobs[v]
        if tag == "__ndarray__":
            return blobs[v].numpy()
        if tag == "__map__":
            return {k: dec(x) for k, x in v.items()}
        if tag == "__dict__":
            return {dec(k): dec(x) for k, x in v}
        if tag == "__tuple__":
            return tuple(dec(x) for x in v)
        if tag == "__float__":
            return float(v)
        if tag == "__npscalar__":
            return np.dtype(v[0]).type(v[1])
        raise ValueError(f"unknown tag {tag!r}")

    return dec(doc["data"])


CACHE = DiagnosticsCache()


def resolve_cache(cache) -> DiagnosticsCache | None:
    """A `cache=` argument as a cache: True/None → the shared CACHE, False → None, a DiagnosticsCache as is."""
    if cache is True or cache is None:
        return CACHE
    if cache is False:
        return None
    if isinstance(cache, DiagnosticsCache):
        return cache
    raise AwqnbError(f"cache={cache!r} is invalid; pass True, False or a DiagnosticsCache.")


def cached_or_compute(cache, kind: str, parts: dict, compute: Callable[[], Any]):
    """`compute()` through the cache `cache=` names (`resolve_cache`), keyed by `kind` and `parts`."""
    c = resolve_cache(cache)
    return compute() if c is None else c.get_or_compute(kind, parts, compute)
