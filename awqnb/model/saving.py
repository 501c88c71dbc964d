"""Writing models: `save_quantized` (the fake-quantized HF layout plus its metadata), the directory
name `model_tag`, and `atomic_dir` / `check_writable`, which every writer of a model directory uses
(a failed write leaves nothing and keeps what was there)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from awqnb.core.errors import AwqnbError
from awqnb.core.files import clean_stale, is_write_error, temp_prefix, write_error_text
from awqnb.model.sources import short_name

SAVE_FORMATS = ("packed", "fake")


def model_tag(name: str, cfg, calibration: dict | None = None, fmt: str = "fake") -> str:
    """`smollm2-135m_awq_w4_g64_headfp16_packed_<hash8>`: the model's short name, the method config
    tag, the save format (`packed`: `export.save_packed`, `fake`: `save_quantized`) and a hash of
    everything else that decides the result (the whole config, seed included, and the calibration
    set: name, size, length), so different configurations, or one configuration's two formats,
    never share a directory."""
    if fmt not in SAVE_FORMATS:
        raise AwqnbError(f"format {fmt!r} is unknown; use one of {', '.join(SAVE_FORMATS)}.")
    doc = json.dumps({"config": cfg.to_dict(), "calibration": calibration or {}}, sort_keys=True, default=str)
    return f"{short_name(name)}_{cfg.tag}_{fmt}_{hashlib.sha256(doc.encode()).hexdigest()[:8]}"


@contextmanager
def atomic_dir(dest: Path, overwrite: bool = False):
    """Yield a temporary directory next to `dest`; move it to `dest` only if the body succeeds.

    Nothing the user had is lost on failure: an existing `dest` is replaced only after the new
    one is complete (and only with overwrite=True). Without overwrite the final move is a plain
    rename, which the OS refuses onto a non-empty directory: of two writers racing for one `dest`,
    exactly one wins and the other gets an error (its files are removed). The directory gets the
    user's normal permissions (umask), not mkdtemp's 0700. The temporary directory is named
    `.<dest>.tmp-<host>-<pid>-…` (awqnb.core.files): if this process is killed, the next writer into the
    same folder removes it. A failed write (disk full: OSError, or safetensors' SafetensorError)
    is one AwqnbError; the folders made for `dest` are removed again."""
    import errno
    import uuid

    dest = Path(dest)
    if dest.exists() and not overwrite and (not dest.is_dir() or any(dest.iterdir())):
        raise AwqnbError(f"{dest} already exists; pass --overwrite (overwrite=True) or choose another path.")
    check_writable(dest.parent)  # (also removes what killed writers left there)
    made = [q for q in (dest.parent, *dest.parent.parents) if not q.exists()]
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest.name), dir=dest.parent))
        try:
            yield tmp
            _fix_modes(tmp)
        except Exception as e:  # disk full, permissions changed under us: say so, leave nothing
            if not is_write_error(e):
                raise
            what = write_error_text(e)
            full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "space" in what.lower()
            raise AwqnbError(f"could not write {dest} ({what}); nothing was written there. "
                             + ("Free some space or choose another output directory." if full else
                                "Choose another output directory.")) from e
        if not overwrite:
            try:
                tmp.rename(dest)  # atomic; fails if another writer got there first
            except OSError as e:
                raise AwqnbError(f"{dest} was created by another run while this one was writing; "
                                 "pass --overwrite (overwrite=True) or choose another path.") from e
            return
        old = None
        if dest.exists():  # named like a temporary: if we die before the swap, the next writer puts it back
            old = dest.with_name(temp_prefix(dest.name, "old") + uuid.uuid4().hex[:8])
            dest.rename(old)
        try:
            tmp.rename(dest)
        except OSError as e:
            if old is not None:
                old.rename(dest)
            raise AwqnbError(f"could not move the new {dest} into place ({e.strerror or e}); "
                             "the earlier one is kept.") from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for q in made:  # deepest first; a folder someone else filled meanwhile stays
            try:
                q.rmdir()
            except OSError:
                break
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fix_modes(root: Path) -> None:
    """Directories 0777 and files 0666 minus the umask (mkdtemp/mkstemp make them private)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def check_writable(directory: str | Path) -> Path:
    """Prove a file can be written in `directory` (or, if it does not exist yet, in the nearest
    existing folder above it, creating nothing), or AwqnbError saying what is wrong (a file in the
    way, read-only, full): checked before any long work. An existing `directory` is first rid of
    the temporaries of killed awqnb processes (awqnb.core.files.clean_stale): they may be what fills it."""
    d = Path(directory).expanduser().absolute()
    existing = next(q for q in (d, *d.parents) if q.exists())
    if not existing.is_dir():
        raise AwqnbError(f"cannot write under {d}: {existing} is a file, not a directory; choose another output directory.")
    if existing == d:
        clean_stale(d, legacy=True)
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix("awqnb-write-probe"), dir=existing)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise AwqnbError(f"cannot write to {existing} ({e.strerror or e}); choose a writable output directory "
                         "with free space.") from e
    return d


def save_quantized(model: nn.Module, tokenizer, dest: str | Path, metadata: dict, overwrite: bool = False,
                   result=None, dtype: torch.dtype | None = None) -> Path:
    """Save a (fake-)quantized model in the HF layout plus `quantization_metadata.json` (and,
    with `result`, its replay record `quant_result.json` + `.safetensors`), atomically: a failed
    save leaves nothing at `dest` and keeps what was there. dtype: save the floating tensors in
    this dtype (e.g. the checkpoint's own bf16) without changing the model in memory.
    (The deployable packed INT format is `awqnb.export.packed.save_packed`.)"""
    dest = Path(dest)
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        if dtype is None or dtype == next(model.parameters()).dtype:
            model.save_pretrained(tmp)
        else:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
            old = model.config.dtype
            try:
                model.config.dtype = dtype  # the saved config says what the tensors are
                model.save_pretrained(tmp, state_dict=sd)
            finally:
                model.config.dtype = old
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = dict(metadata, export={"format": "fake", "dtype": str(dtype or next(model.parameters()).dtype)[6:]})
        (tmp / "quantization_metadata.json").write_text(json.dumps(meta, indent=1, default=jsonable))
        if result is not None:
            result.save(tmp / "quant_result")
    return dest


def jsonable(o):
    """`json.dumps` default: tensors → lists, Paths → str; anything else raises TypeError."""
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
