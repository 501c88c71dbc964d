"""The reference tools as methods: llm-compressor's AWQ and GPTQ run inside an awqnb comparison.

`llmc_awq` (AWQModifier + QuantizationModifier) and `llmc_gptq` (GPTQModifier, its default
act-order) quantize a model in place through llm-compressor's `oneshot`, with the calibration token
ids the awqnb methods get, W{bits} asymmetric integer weights in groups of the run's group size
(lm_head left in full precision, as awqnb does). They are not awqnb quantizers: the comparison
runner (`awqnb.compare.runner`) accepts their names beside the registered methods.

What `oneshot` leaves (llm-compressor 0.14.0.1, compressed-tensors 0.19.0, seen on CPU): every
module's parameters in an offload cache of its sequential pipeline (removed here with
compressed-tensors' `remove_dispatch`, tensors onloaded), and in each targeted `nn.Linear`: `weight_scale` and `weight_zero_point` parameters, a `quantization_scheme`,
status FROZEN, and an instance `forward` that fake-quantizes the weight on every call. GPTQ has
also written the fake-quantized weight into `weight`; AWQ + QuantizationModifier leaves `weight`
dense and full precision (scaled, not rounded): a bare `F.linear(x, weight)` would compute with FP
weights. `finalize` therefore writes `fake_quantize(weight, scale, zero_point)` into `weight`,
removes the scale, zero point, scheme and the instance forward, and checks on a random input that
each linear now computes `x · W_qᵀ` — a plain dense model with quantized weights, evaluated by
awqnb's protocols like any other (and castable to bf16 without re-quantizing).

Tested range: llm-compressor 0.14.x. Absent or another version: `refusal(name)` gives the one-line
reason and the runner skips the method (the others still run).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from awqnb.core.errors import AwqnbError
from awqnb.model.data import calibration_samples

log = logging.getLogger(__name__)

REFERENCE_METHODS = {
    "llmc_awq": "llm-compressor AWQ (AWQModifier + QuantizationModifier, W asym, groups)",
    "llmc_gptq": "llm-compressor GPTQ (GPTQModifier, its default act-order, W asym, groups)",
}
TESTED_VERSIONS = ("0.14",)  # major.minor prefixes known to work
INSTALL_HINT = "pip install 'awqnb[reference]' (llmcompressor 0.14.x)"


def is_reference(name: str) -> bool:
    return name in REFERENCE_METHODS


def llmc_version() -> str | None:
    try:
        return importlib.metadata.version("llmcompressor")
    except importlib.metadata.PackageNotFoundError:
        return None


def refusal(name: str) -> str | None:
    """None when `name` can run here; else the one-line reason it cannot."""
    if name not in REFERENCE_METHODS:
        return f"{name!r} is not a reference method ({', '.join(REFERENCE_METHODS)})."
    try:
        import llmcompressor  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything on import
        return (f"{name} needs llm-compressor, which is not importable here ({type(e).__name__}: {e}); "
                f"{INSTALL_HINT}.")
    v = llmc_version()
    if v is None or not any(v == t or v.startswith(t + ".") for t in TESTED_VERSIONS):
        return (f"{name} needs llm-compressor {' or '.join(t + '.x' for t in TESTED_VERSIONS)}; "
                f"found {v or 'an unknown version'}, outside the tested range; {INSTALL_HINT}.")
    return None


def _scheme(bits: int, group_size: int, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = "channel" if group_size == -1 else "group"
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                               group_size=None if group_size == -1 else group_size)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def recipe(name: str, bits: int = 4, group_size: int = 128, symmetric: bool = False) -> list:
    """The llm-compressor modifiers of a reference method (lm_head ignored)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups = {"group_0": _scheme(bits, group_size, symmetric)}
    if name == "llmc_awq":
        try:
            from llmcompressor.modifiers.transform import AWQModifier
        except ImportError:  # before 0.14 it lived in modifiers.awq
            from llmcompressor.modifiers.awq import AWQModifier
        return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if name == "llmc_gptq":
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    raise AwqnbError(f"unknown reference method {name!r}; use one of {', '.join(REFERENCE_METHODS)}.")


def _save_tokenizer(model: nn.Module, tokenizer, where: Path) -> None:
    """llm-compressor resolves `model.config.name_or_path` to a folder with a config.json and a
    tokenizer; calibration goes in as token ids, so the tokenizer only satisfies its loader."""
    model.config.save_pretrained(where)
    if tokenizer is not None:
        tokenizer.save_pretrained(where)
        return
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                            unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(where)


@contextlib.contextmanager
def _cpu_without_pinning():
    """llm-compressor 0.14 pins its cached activations (`IntermediatesCache.pin_memory`), which
    raises on a machine without an accelerator; pinning only speeds host→device copies, so on
    such a machine it is skipped for the duration of the call."""
    if torch.cuda.is_available():
        yield
        return
    try:
        from llmcompressor.pipelines.cache import IntermediatesCache
    except ImportError:
        yield
        return
    orig = IntermediatesCache.__dict__.get("pin_memory")
    if orig is None:
        yield
        return
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = orig


def _undispatch(model: nn.Module, dev: torch.device) -> None:
    """oneshot's sequential pipeline leaves every module's parameters in a compressed-tensors
    OffloadCache (onloaded to its main device at each forward); give them back as plain
    parameters on `dev`, so that casts and `.to()` act on the real tensors."""
    try:
        from compressed_tensors.offload import remove_dispatch
    except ImportError:  # older compressed-tensors: accelerate hooks, if any
        try:
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(model, recurse=True)
        except ImportError:
            pass
    else:
        remove_dispatch(model, onload_tensors=True)
    model.to(dev)


@torch.no_grad()
def finalize(model: nn.Module) -> dict:
    """Turn what `oneshot` left into plain linears computing with the fake-quantized dense
    weights (see the module docstring) → {"linears": n, "weight_was_quantized": n already holding
    quantized values, "actorder": ...}. AwqnbError if a linear does not then compute x·W_qᵀ."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    n = already = 0
    actorder = set()
    gen = torch.Generator().manual_seed(0)
    for name, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if not isinstance(mod, nn.Linear) or scheme is None or getattr(scheme, "weights", None) is None:
            continue
        args = scheme.weights
        actorder.add(str(getattr(args, "actorder", None)))
        w = mod.weight.data
        wq = forward_quantize(mod, w, "weight", args).to(w.dtype)  # what the module's own forward computes with
        x = torch.randn(2, mod.in_features, generator=gen).to(device=w.device, dtype=w.dtype)
        before = mod(x)
        already += int(torch.equal(wq, w))
        for attr in ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale"):
            if hasattr(mod, attr):
                delattr(mod, attr)
        for attr in ("forward", "quantization_scheme", "quantization_status", "quantization_enabled"):
            if attr in vars(mod):
                delattr(mod, attr)
        mod.weight.data = wq
        after = mod(x)
        ref = nn.functional.linear(x, wq, mod.bias)
        if not (torch.allclose(before, ref, rtol=1e-4, atol=1e-5) and torch.equal(after, ref)):
            raise AwqnbError(f"{name}: after llm-compressor, the linear does not compute with its quantized "
                             "weight; this llm-compressor version leaves modules in a state awqnb cannot read.")
        n += 1
    if n == 0:
        raise AwqnbError("llm-compressor quantized no linear of this model (no quantization scheme attached); "
                         "check the model's architecture against its supported ones.")
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        with contextlib.suppress(AttributeError):
            del cfg.quantization_config
    return {"linears": n, "weight_was_quantized": already, "actorder": sorted(actorder)}


def quantize_reference(model: nn.Module, name: str, calibration, tokenizer=None, bits: int = 4,
                       group_size: int = 128, symmetric: bool = False, device=None) -> dict:
    """Quantize `model` in place with llm-compressor's `name` method on `calibration` (an
    `awqnb.model.data.Calibration` or a list of 1-D token-id tensors of equal length) → info: seconds,
    peak GPU memory, llm-compressor version, the recipe, what `finalize` found. The model is moved
    to `device` first (llm-compressor onloads block by block onto its own main device). AwqnbError
    (one line) when the method cannot run here."""
    why = refusal(name)
    if why:
        raise AwqnbError(why)
    from datasets import Dataset
    from llmcompressor import oneshot

    samples = calibration_samples(calibration, name)
    lengths = {int(s.numel()) for s in samples}
    if len(lengths) != 1:
        raise AwqnbError(f"{name} needs calibration samples of one length (got {sorted(lengths)}); "
                         "use a block calibration set such as wikitext2.")
    ids = torch.stack([s.to(torch.long).cpu() for s in samples])
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    rec = recipe(name, bits, group_size, symmetric)
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    saved = (getattr(model.config, "name_or_path", None), getattr(model, "name_or_path", None))
    with tempfile.TemporaryDirectory() as d:
        _save_tokenizer(model, tokenizer, Path(d))
        model.config.name_or_path = d
        model.name_or_path = d
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        try:
            with _cpu_without_pinning():
                oneshot(model=model, recipe=rec, dataset=ds, max_seq_length=ids.shape[1],
                        num_calibration_samples=ids.shape[0], tokenizer=d)
        finally:
            model.config.name_or_path, model.name_or_path = saved
        if cuda:
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
    _undispatch(model, dev)
    found = finalize(model)
    return {"tool": "llm-compressor", "version": llmc_version(), "method": name, "seconds": seconds,
            "peak_gpu_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if cuda else None,  # GB = 10⁹ bytes
            "recipe": [f"{type(m).__name__}" for m in rec], "bits": bits, "group_size": group_size,
            "symmetric": symmetric, "n_calib": int(ids.shape[0]), "calib_seqlen": int(ids.shape[1]), **found}
