"""Nested records (dicts, lists, tuples, numbers, strings, tensors) as JSON + safetensors.

Nothing awqnb reads may execute code, so records are never pickled: tensors go to
`<stem>.safetensors` under the dotted path where they sat, and `<stem>.json` holds the structure
with `{"__tensor__": key}` in their place. Tuples, dicts with non-string keys and torch dtypes are
tagged so that they come back as they were.
"""
from __future__ import annotations

import errno
import json
import math
import uuid
from pathlib import Path
from typing import Any

import torch

from awqnb.core.errors import AwqnbError
from awqnb.core.files import clean_stale, temp_prefix, write_error_text

SUFFIXES = (".json", ".safetensors", ".pt")


def stem(path: str | Path) -> Path:
    """`dir/name` for `dir/name`, `dir/name.json`, `dir/name.safetensors` or `dir/name.pt`."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in SUFFIXES else p


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).replace("torch.", "")}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, f"{key}.k{i}", tensors), _encode(v, f"{key}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _encode(obj.item(), key, tensors)
    raise AwqnbError(f"cannot store a {type(obj).__name__} at {key!r} in a JSON + safetensors record.")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__dtype__"}:
        return getattr(torch, obj["__dtype__"])
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    if set(obj) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if set(obj) == {"__dict__"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save(obj: Any, path: str | Path) -> Path:
    """Write `obj` to `<stem>.json` + `<stem>.safetensors` (each replaced atomically); returns the
    JSON path. A failed write (disk full) raises OSError, safetensors' own error included, and
    leaves no temporary (a killed writer's goes at the next save next to it)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    s = stem(path)
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": "awqnb-record/1", "data": _encode(obj, "r", tensors)}
    s.parent.mkdir(parents=True, exist_ok=True)
    tmps = {}
    for suffix in (".safetensors", ".json"):
        clean_stale(s.parent, name=s.name + suffix)
        tmps[suffix] = s.with_name(temp_prefix(s.name + suffix) + uuid.uuid4().hex[:8])
    try:
        try:
            save_file(tensors, str(tmps[".safetensors"]), metadata={"format": "pt"})
        except SafetensorError as e:  # what its writer raises for a full disk: an OSError like any write's
            full = "No space left" in str(e)
            raise OSError(errno.ENOSPC if full else errno.EIO, write_error_text(e), str(s)) from e
        tmps[".json"].write_text(json.dumps(doc, indent=1))
        for suffix, t in tmps.items():
            t.replace(s.with_suffix(suffix))
    finally:
        for t in tmps.values():
            t.unlink(missing_ok=True)
    return s.with_suffix(".json")


def load(path: str | Path) -> Any:
    """Read a record written by `save` (either file's path, or the stem)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    s = stem(path)
    js, st = s.with_suffix(".json"), s.with_suffix(".safetensors")
    if not js.is_file() or not st.is_file():
        raise AwqnbError(f"no record at {s}: expected {js.name} and {st.name} side by side.")
    try:
        doc = json.loads(js.read_text())
        tensors = load_file(str(st))
    except (OSError, ValueError, SafetensorError) as e:  # truncated or not the format
        raise AwqnbError(f"cannot read the record {s}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != "awqnb-record/1":
        raise AwqnbError(f"{js} is not an awqnb record (format {doc.get('format') if isinstance(doc, dict) else '?'}).")
    try:
        return _decode(doc["data"], tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a tensor or field it names is missing
        raise AwqnbError(f"the record {s} is damaged ({type(e).__name__}: {e}); save it again.") from e
