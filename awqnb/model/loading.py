"""`load_model`: (model, tokenizer) for an alias, an HF directory, a GGUF file or a Hub id
(names: awqnb.model.sources; GGUF cache: awqnb.model.gguf; tiny models: awqnb.model.tiny)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from awqnb.core.dtypes import parse_dtype
from awqnb.core.errors import AwqnbError
from awqnb.model import checkpoint
from awqnb.model.checkpoint import require_compressed_tensors
from awqnb.model.devices import cast_parameters, resolve_device
from awqnb.model.gguf import drop_quantizer, gguf_cache, load_errors
from awqnb.model.sources import ALIASES, GGUF_ALIASES, TINY_ALIASES
from awqnb.model.tiny import build_tiny


@contextlib.contextmanager
def no_progress_bars():
    """transformers' progress bars off for the duration (its 'Loading weights' bar: in a notebook a
    widget that redirecting stderr does not catch, left as stray text in an exported report)."""
    from transformers.utils import logging as tlogging

    was = tlogging.is_progress_bar_enabled()
    tlogging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlogging.enable_progress_bar()


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
            src = gguf_cache(name, want)
        elif p.suffix == ".gguf":
            if not p.is_file():
                raise AwqnbError(f"GGUF file {p} does not exist; check the path.")
            src = gguf_cache(str(p), want)
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
        with load_errors(name), checkpoint.quiet_loaders(), no_progress_bars():
            tok = AutoTokenizer.from_pretrained(src)
            model, info = AutoModelForCausalLM.from_pretrained(src, dtype=load_dtype, output_loading_info=True, **kw)
        checkpoint.check_loading_info(info, str(src))
        if kw:  # dense at load decoded every group with the first one's grid: the others again
            checkpoint.redecode_other_groups(model, src, qc)
        drop_quantizer(model)
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    if want is not None:
        cast_parameters(model, want)  # not model.to(dtype): that rounds RoPE's inv_freq buffer
    if device is not None:
        model = model.to(resolve_device(device))
    model.eval()
    return model, tok
