"""The reference tools as methods: llm-compressor's AWQ and GPTQ, AutoRound and HQQ run inside an
awqnb comparison.

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

The peers (`awqnb[peers]`): `ar` is AutoRound 0.16 (signed-gradient rounding; `ar@iters=0` its RTN
mode) on the same calibration token ids, seeded with the run's seed; `hqq` is HQQ 0.2.8 (half-
quadratic zero-point optimisation, calibration-free, deterministic). Their own parameters are passed
through (`ar@iters=200,lr=0.005`, `hqq@axis=1,optimize=false`; `check_params` validates them, one
AwqnbError line); bits, group size and symmetry are the run's, lm_head stays in full precision. What
each leaves is turned into awqnb's fake-quant form: plain linears holding the dequantized W4 weights
in the model's dtype, every other tensor as it was. AutoRound: its codes q = round(Ŵ/s + zp) with
its recorded per-group scale (float16) and integer zero point, written as (q − zp)·s (what its
packed export computes); it tunes in bfloat16 on a CPU (its `amp`), and the tensors it only cast are
given back their original values. HQQ: `Quantizer.quantize` with HQQ's own per-linear settings
(`hqq_base_quant_config`), dequantized in float32. `ar@prescale=<awqnb method>` (e.g. `ar@prescale=awq`) is a composition: awqnb's method runs first on a
copy with the same calibration ids, its recorded scales and clip ranges are folded into the model
unrounded, and AutoRound rounds that (the time of both counted). AutoRound's grid is awqnb's (integer zero point);
HQQ's optimised zero point is a float, so its weights are off awqnb's grid unless `optimize=false`
(`on_grid` says which, and the packed exporter refuses them with its one line).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from awqnb.core.codes import grid_of
from awqnb.core.config import QuantConfig, SearchConfig, parse_value
from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import expand_groups
from awqnb.engine.walk import BlockEngine
from awqnb.model.arch import attn_shape, blocks, get_module, resolve_spec
from awqnb.model.data import Calibration, calibration_samples
from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.methods.awq import replay_scales
from awqnb.quant.pipeline import LayerRecord, QuantResult

log = logging.getLogger(__name__)

REFERENCE_METHODS = {
    "llmc_awq": "llm-compressor AWQ (AWQModifier + QuantizationModifier, W asym, groups)",
    "llmc_gptq": "llm-compressor GPTQ (GPTQModifier, its default act-order, W asym, groups)",
    "ar": "AutoRound (SignRound: signed-gradient rounding and min/max tuning; iters=0: its RTN), W asym, groups",
    "hqq": "HQQ (half-quadratic zero-point optimisation, calibration-free), W asym, groups",
}
TESTED_VERSIONS = ("0.14",)  # llm-compressor: major.minor prefixes known to work
INSTALL_HINT = "pip install 'awqnb[reference]' (llmcompressor 0.14.x)"


@dataclass(frozen=True)
class Tool:
    """The package behind a reference method: its name in reports, distribution, import name,
    tested version prefixes and how to install it."""

    label: str
    dist: str
    module: str
    tested: tuple
    hint: str


_LLMC = Tool("llm-compressor", "llmcompressor", "llmcompressor", TESTED_VERSIONS, INSTALL_HINT)
TOOLS = {
    "llmc_awq": _LLMC, "llmc_gptq": _LLMC,
    "ar": Tool("AutoRound", "auto-round", "auto_round", ("0.16",), "pip install 'awqnb[peers]' (auto-round 0.16.x)"),
    "hqq": Tool("HQQ", "hqq", "hqq", ("0.2.8",), "pip install 'awqnb[peers]' (hqq 0.2.8)"),
}
PEERS = ("ar", "hqq")

# Parameters passed through to the peer (AutoRound 0.16 / HQQ 0.2.8 keywords) → type. Unknown keys
# are refused here: AutoRound itself only warns and ignores them.
AR_PARAMS = {
    "iters": int, "batch_size": int, "gradient_accumulate_steps": int, "low_gpu_mem_usage": bool,
    "enable_torch_compile": bool, "amp": bool, "enable_deterministic_algorithms": bool, "enable_neuqi": bool,
    # SignRound's (iters > 0)
    "lr": float, "minmax_lr": float, "momentum": float, "enable_minmax_tuning": bool, "enable_quanted_input": bool,
    "enable_norm_bias_tuning": bool, "not_use_best_mse": bool, "dynamic_max_gap": int, "nblocks": int,
    "enable_alg_ext": bool,
    # its RTN's (iters = 0)
    "disable_opt_rtn": bool,
    # awqnb's, not AutoRound's: an awqnb method whose scaler (scale search and fold, clip) runs first
    "prescale": str,
}
AR_TUNING_ONLY = ("lr", "minmax_lr", "momentum", "enable_minmax_tuning", "enable_quanted_input",
                  "enable_norm_bias_tuning", "not_use_best_mse", "dynamic_max_gap", "nblocks", "enable_alg_ext")
AR_DEFAULT_ITERS = 200
HQQ_PARAMS = {"axis": int, "optimize": bool, "round_zero": bool}
PEER_PARAMS = {"ar": AR_PARAMS, "hqq": HQQ_PARAMS}
FIXED_BY_RUN = {  # keys a user might try, set by the comparison itself
    "bits": "bits", "nbits": "bits", "group_size": "group size", "sym": "symmetry", "symmetric": "symmetry",
    "scheme": "bits, group size and symmetry", "data_type": "bits", "nsamples": "n_calib", "seqlen": "calib_seqlen",
    "dataset": "calib_dataset", "seed": "the run's seeds", "device": "device", "device_map": "device",
    "quant_lm_head": "lm_head (kept in full precision)", "layer_config": "every block linear at W{bits}",
}


def base_name(name: str) -> str:
    """'ar@iters=0' → 'ar' (a reference method may carry its parameters after '@')."""
    return str(name).partition("@")[0].strip()


def is_reference(name: str) -> bool:
    return base_name(name) in REFERENCE_METHODS


def needs_calibration(name: str) -> bool:
    """hqq is calibration-free (one run stands for every seed); the others are not."""
    return base_name(name) != "hqq"


def tool(name: str) -> Tool:
    base = base_name(name)
    if base not in TOOLS:
        raise AwqnbError(f"{name!r} is not a reference method; use one of {', '.join(REFERENCE_METHODS)}.")
    return TOOLS[base]


def tool_version(name: str) -> str | None:
    """The installed version of the package behind reference method `name` (None: absent)."""
    try:
        return importlib.metadata.version(tool(name).dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def llmc_version() -> str | None:
    return tool_version("llmc_gptq")


def versions() -> dict:
    """Installed versions of every reference tool, by distribution name (None: absent)."""
    return {TOOLS[m].dist: tool_version(m) for m in ("llmc_gptq", *PEERS)}


def check_params(name: str, params) -> dict:
    """A reference method's own parameters → a dict; AwqnbError (one line) for an unknown key, a
    key the comparison sets, a value of the wrong type or out of range. llm-compressor's take none."""
    base = base_name(name)
    params = dict(params or {})
    allowed = PEER_PARAMS.get(base, {})
    for k, v in params.items():
        if k in FIXED_BY_RUN:
            raise AwqnbError(f"method spec {name!r}: {k} is set by the comparison ({FIXED_BY_RUN[k]}); "
                             "drop it (the run's bits, group size, calibration and seeds apply to every method).")
        if k not in allowed:
            have = (", ".join(sorted(allowed)) + " (and n_calib, calib_seqlen, calib_dataset)" if allowed
                    else "none (only n_calib, calib_seqlen, calib_dataset)")
            raise AwqnbError(f"method spec {name!r}: {base} has no parameter {k!r}; its parameters are {have}.")
        want = allowed[k]
        ok = (isinstance(v, str) if want is str else isinstance(v, bool) if want is bool else
              isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else
              isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise AwqnbError(f"method spec {name!r}: {k}={v} is not {'an' if want is int else 'a'} {want.__name__}; "
                             f"give e.g. {k}={ {bool: 'true', int: 1, float: 0.005, str: 'awq'}[want] }.")
    if base == "ar":
        iters = params.get("iters", AR_DEFAULT_ITERS)
        if iters < 0:
            raise AwqnbError(f"method spec {name!r}: iters={iters} must be ≥ 0 (0: AutoRound's RTN mode).")
        for k in ("batch_size", "gradient_accumulate_steps", "nblocks"):
            if k in params and params[k] < 1:
                raise AwqnbError(f"method spec {name!r}: {k}={params[k]} must be at least 1.")
        tuning = [k for k in AR_TUNING_ONLY if k in params]
        if iters == 0 and tuning:
            raise AwqnbError(f"method spec {name!r}: AutoRound uses {', '.join(tuning)} only when it tunes "
                             "(iters > 0); drop them or set iters.")
        if "prescale" in params:
            _prescale_method(name, params["prescale"])
        if iters > 0 and "disable_opt_rtn" in params:
            raise AwqnbError(f"method spec {name!r}: disable_opt_rtn only acts in AutoRound's RTN mode (iters=0).")
    if base == "hqq" and params.get("axis", 1) not in (0, 1):
        raise AwqnbError(f"method spec {name!r}: axis={params['axis']} must be 0 or 1 (1: groups along a row, "
                         "as awqnb's).")
    return params


def _prescale_method(spec: str, method: str) -> None:
    """AwqnbError (one line) unless `ar@prescale=<method>` names a registered awqnb method with a scaler."""
    from awqnb.quant.methods import REGISTRY

    cls = REGISTRY.get(method)
    if cls is None or cls.scaler_step is None:
        have = sorted(n for n, c in REGISTRY.items() if c.scaler_step is not None)
        raise AwqnbError(f"method spec {spec!r}: prescale={method} is not an awqnb method with a scaler; "
                         f"use one of {', '.join(have)}.")


def split_name(name: str) -> tuple[str, dict]:
    """'ar@iters=0,lr=0.01' → ('ar', {'iters': 0, 'lr': 0.01}), validated (`check_params`)."""
    base, at, over = str(name).partition("@")
    params = {}
    for kv in (over.split(",") if at else []):
        k, eq, v = kv.partition("=")
        k = k.strip().replace("-", "_")
        if not eq or not k:
            raise AwqnbError(f"method spec {name!r}: {kv!r} must look like key=value, e.g. ar@iters=0.")
        params[k] = parse_value(v)
    return base.strip(), check_params(name, params)


def describe(name: str) -> dict:
    """What a reference method is, for the comparison's provenance: tool, version, what, params."""
    base, params = split_name(name)
    return {"tool": TOOLS[base].label, "version": tool_version(base), "what": REFERENCE_METHODS[base],
            "params": params}


def refusal(name: str) -> str | None:
    """None when `name` can run here; else the one-line reason it cannot."""
    base = base_name(name)
    if base not in REFERENCE_METHODS:
        return f"{name!r} is not a reference method ({', '.join(REFERENCE_METHODS)})."
    t = TOOLS[base]
    try:
        __import__(t.module)  # through builtins.__import__, as an import statement goes
    except Exception as e:  # ImportError, or a broken install raising anything on import
        return (f"{base} needs {t.label}, which is not importable here ({type(e).__name__}: {e}); "
                f"{t.hint}.")
    v = llmc_version() if t is _LLMC else tool_version(base)
    if v is None or not any(v == p or v.startswith(p + ".") for p in t.tested):
        return (f"{base} needs {t.label} {' or '.join(p + '.x' for p in t.tested)}; "
                f"found {v or 'an unknown version'}, outside the tested range; {t.hint}.")
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
    (tokenizer if tokenizer is not None else _stand_in_tokenizer()).save_pretrained(where)


def _stand_in_tokenizer(pad: bool = True):
    """A three-word tokenizer for tools that insist on one while taking token ids (pad=False: no
    pad token, so AutoRound masks no calibration id as padding)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   **({"pad_token": "</s>"} if pad else {}))


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


def quantize_reference(model: nn.Module, name: str, calibration=None, tokenizer=None, bits: int = 4,
                       group_size: int = 128, symmetric: bool = False, device=None, params=None,
                       seed: int | None = None) -> dict:
    """Quantize `model` in place with reference method `name` on `calibration` (an
    `awqnb.model.data.Calibration` or a list of 1-D token-id tensors of equal length; hqq takes
    none) → info: tool, version, parameters, seconds, peak GPU memory, what was found. `name` may
    carry the method's own parameters ('ar@iters=0', as a comparison spec writes them); `params`
    adds to them. seed: AutoRound's (None: torch's current seed, which the comparison runner sets to
    the calibration seed just before). The model is moved to `device` first. AwqnbError (one line)
    when the method cannot run here."""
    why = refusal(name)
    if why:
        raise AwqnbError(why)
    base, own = split_name(name)
    params = check_params(name, {**own, **dict(params or {})})
    if base in PEERS:
        return _quantize_peer(model, base, params, calibration, tokenizer, bits, group_size, symmetric, device,
                              torch.initial_seed() if seed is None else seed)
    if calibration is None:
        raise AwqnbError(f"{base} needs calibration samples; pass awqnb.model.data.load_calibration(...).")
    name = base
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


# --- the peers: AutoRound and HQQ -------------------------------------------------------------

def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """('<block path>.<j>.<linear>', module) for every linear awqnb quantizes (lm_head excluded)."""
    spec = resolve_spec(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [(names.get(id(get_module(b, n)), f"{j}.{n}"), get_module(b, n))
            for j, b in enumerate(blocks(model, spec)) for n in spec.linears]


def _peer_calibration(calibration, base: str) -> list[torch.Tensor]:
    samples = calibration_samples(calibration, base)
    lengths = {int(s.numel()) for s in samples}
    if len(lengths) != 1:
        raise AwqnbError(f"{base} needs calibration samples of one length (got {sorted(lengths)}); "
                         "use a block calibration set such as wikitext2.")
    return [s.to(torch.long).cpu().reshape(1, -1) for s in samples]


def _quantize_peer(model, base, params, calibration, tokenizer, bits, group_size, symmetric, device, seed) -> dict:
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    lins = block_linears(model)
    ids = _peer_calibration(calibration, base) if needs_calibration(base) else None
    __import__("auto_round" if base == "ar" else "hqq.core.quantize")  # imports are not quantization time
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    if base == "ar":
        found = _autoround(model, lins, ids, tokenizer, bits, group_size, symmetric, dev, params, seed)
    else:
        found = _hqq(lins, bits, group_size, symmetric, dev, params)
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    info = {"tool": TOOLS[base].label, "version": tool_version(base), "method": base, "params": dict(params),
            "seconds": seconds, "peak_gpu_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if cuda else None,
            "bits": bits, "group_size": group_size, "symmetric": symmetric, "lm_head": "fp", **found}
    if ids is not None:
        info.update(seed=int(seed), n_calib=len(ids), calib_seqlen=int(ids[0].shape[1]))
    info.update(on_grid(model, QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric)))
    return info


@torch.no_grad()
def _autoround(model, lins, ids, tokenizer, bits, group_size, symmetric, dev, params, seed) -> dict:
    """AutoRound on `model` in place, then back to awqnb's fake-quant form (module docstring)."""
    from auto_round import AutoRound

    odd = [n for n, lin in lins if lin.in_features % 32 or lin.out_features % 32]
    if odd:  # AutoRound 0.16 keeps those in 16 bits (its packing); refused before any work
        raise AwqnbError(f"AutoRound would leave {len(odd)} of {len(lins)} block linears in full precision (e.g. "
                         f"{odd[0]}: sides not multiples of 32); the comparison needs every linear at W{bits}, "
                         "so ar is not comparable on this model.")
    kw = dict(params)
    pre = _prescale(model, kw.pop("prescale"), ids, bits, group_size, symmetric, dev, seed) if "prescale" in kw else {}
    quantized = {id(m) for _, m in lins}
    # every tensor but the block linears' weights: AutoRound casts them to its tuning dtype
    orig = {k: t.detach().to("cpu", copy=True) for k, t in _tensors(model) if id(_owner(model, k)) not in quantized
            or not k.endswith(".weight")}
    dtypes = {k: t.dtype for k, t in _tensors(model)}
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    cfg_dtype = getattr(model.config, "dtype", None)
    iters = kw.pop("iters", AR_DEFAULT_ITERS)
    kw.setdefault("batch_size", min(8, len(ids)))  # AutoRound's default 8, at most the samples there are
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
    tok = tokenizer if tokenizer is not None else _stand_in_tokenizer(pad=False)
    try:
        with torch.enable_grad():
            ar = AutoRound(model, tok, bits=bits, group_size=group_size, sym=symmetric, iters=iters,
                           nsamples=len(ids), seqlen=int(ids[0].shape[1]), dataset=data, seed=int(seed),
                           device_map="cpu" if dev.type == "cpu" else str(dev), **kw)
            ar.quantize()
    except (ValueError, TypeError, AssertionError, RuntimeError, NotImplementedError) as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise AwqnbError(f"AutoRound refused this model or setting ({type(e).__name__}: {msg}).") from e
    fp_left = []
    for name, lin in lins:
        if getattr(lin, "scale", None) is None or int(getattr(lin, "bits", 16) or 16) > 8:
            fp_left.append(name)
    if fp_left:
        raise AwqnbError(f"AutoRound left {len(fp_left)} of {len(lins)} block linears in full precision (e.g. "
                         f"{fp_left[0]}; it keeps linears whose sides are not multiples of 32); the comparison "
                         "needs every linear at W4, so it is not comparable on this model.")
    for name, lin in lins:
        w = _ar_weight(lin, bits, group_size, symmetric, name)
        lin.weight.data = w.to(device=lin.weight.device, dtype=dtypes[f"{name}.weight"])
    restored, tuned = _restore(model, orig, dtypes)
    for n, m in model.named_modules():  # AutoRound's bookkeeping attributes (scale, zp, bits, global_name, ...)
        for a in set(vars(m)) - attrs.get(n, set()):
            delattr(m, a)
    if cfg_dtype is not None:
        model.config.dtype = cfg_dtype
    return {"linears": len(lins), "iters": iters, "restored": restored, "tuned_other": tuned, **pre}


def _prescale(model, method: str, ids, bits, group_size, symmetric, dev, seed) -> dict:
    """`ar@prescale=<method>`: awqnb's `method` runs on a copy of `model` with AutoRound's
    calibration ids (its scale search, fold and clip, block by block with quantized propagation, as
    in awqnb's own run); its recorded scales and clip ranges are then folded into `model` itself,
    left unrounded (`pipeline.apply` without the rounding), for AutoRound to round. `method` was
    checked with the spec (`check_params`)."""
    n, seqlen = len(ids), int(ids[0].shape[1])
    calib = Calibration("peer-ids", n, seqlen, int(seed), "AutoRound's calibration token ids",
                        [x.reshape(-1) for x in ids])
    cfg = MethodConfig(method, QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric), SearchConfig(),
                       seed=int(seed))
    t0 = time.perf_counter()
    res = pipeline.quantize(copy.deepcopy(model), cfg, calib, device=dev, progress=False)
    spec = resolve_spec(model)
    attn = attn_shape(model.config)
    pipeline.keep_offset_norms_fp32(model, spec)
    bl = blocks(model, spec)
    with torch.no_grad():
        for rec in res.layers:
            replay_scales(bl[rec.index], rec, spec, attn, cfg.quant)
    alphas = [float(g.best_alpha) for rec in res.layers for g in rec.groups.values()]
    return {"prescale": method, "prescale_s": time.perf_counter() - t0, "prescale_groups": len(alphas),
            "prescale_alpha_mean": sum(alphas) / len(alphas) if alphas else None}


def _tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _owner(model: nn.Module, key: str) -> nn.Module:
    return model.get_submodule(key.rpartition(".")[0]) if "." in key else model


def _ar_weight(lin: nn.Linear, bits: int, group_size: int, symmetric: bool, name: str) -> torch.Tensor:
    """(q − zp)·s from AutoRound's recorded scale and zero point, with q the codes of the weight it
    left; AwqnbError when that weight is not on its own recorded grid."""
    w = lin.weight.detach()
    ci = w.shape[1]
    s = lin.scale.detach().to(w.device, torch.float32).reshape(w.shape[0], -1)
    zp = getattr(lin, "zp", None)
    if zp is None or symmetric and not torch.is_tensor(zp):
        z = torch.zeros_like(s)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        z = (zp.detach() if torch.is_tensor(zp) else torch.tensor(float(zp))).to(w.device, torch.float32)
        z = z.expand_as(s) if z.numel() == 1 else z.reshape(s.shape)
        lo, hi = 0, 2 ** bits - 1
    se, ze = expand_groups(s, ci, group_size), expand_groups(z, ci, group_size)
    q = torch.round(w.float() / se + ze).clamp_(lo, hi)
    out = (q - ze) * se
    miss = (out.to(w.dtype).float() - w.float()).abs() > w.float().abs() * 2 ** -7 + 1e-6
    if bool(miss.any()):
        raise AwqnbError(f"{name}: the weight AutoRound left is not on its recorded grid ({int(miss.sum())} values "
                         "off); this AutoRound version leaves modules in a state awqnb cannot read.")
    return out


def _restore(model: nn.Module, orig: dict, dtypes: dict) -> tuple[int, list[str]]:
    """Give back the original of each tensor AutoRound only cast (its value the original's in the
    cast dtype); a tensor it changed (norm/bias tuning) is kept, cast back to its dtype."""
    n, tuned = 0, []
    for key, t in list(_tensors(model)):
        if key not in orig:
            continue
        o = orig[key]
        mod, attr = _owner(model, key), key.rpartition(".")[2]
        if t.dtype == o.dtype and torch.equal(t.detach().cpu(), o):
            continue
        if torch.equal(t.detach().cpu(), o.to(t.dtype)):
            new = o.to(t.device)
            n += 1
        else:
            new = t.detach().to(dtypes[key])
            tuned.append(key)
        if attr in mod._parameters:
            mod._parameters[attr].data = new
        else:
            mod._buffers[attr] = new
    return n, tuned


@torch.no_grad()
def _hqq(lins, bits, group_size, symmetric, dev, params) -> dict:
    """HQQ's quantizer on each block linear, dequantized into the weight (module docstring)."""
    from hqq.core.quantize import Quantizer, hqq_base_quant_config

    if symmetric:
        raise AwqnbError("hqq quantizes with a zero point per group (asymmetric) only; run it with symmetric=False.")
    gs = None if group_size == -1 else group_size
    try:
        wqp = dict(hqq_base_quant_config(nbits=bits, group_size=gs, axis=params.get("axis", 1))["weight_quant_params"])
    except AssertionError as e:
        raise AwqnbError(f"HQQ refused bits={bits}, group size {group_size}: {e}") from e
    wqp.update({k: params[k] for k in ("optimize", "round_zero") if k in params})
    for name, lin in lins:
        w = lin.weight.data
        try:
            w_q, meta = Quantizer.quantize(w, device=str(dev), compute_dtype=torch.float32, bitpack=False, **wqp)
        except AssertionError as e:
            raise AwqnbError(f"HQQ refused {name} {tuple(w.shape)} at group size {group_size}: {e}") from e
        meta["compute_dtype"] = torch.float32
        lin.weight.data = Quantizer.dequantize(w_q, meta).to(device=w.device, dtype=w.dtype)
    return {"linears": len(lins), "hqq_weight_params": {k: v for k, v in wqp.items() if k != "view_as_float"}}


@torch.no_grad()
def on_grid(model: nn.Module, quant: QuantConfig) -> dict:
    """Whether every block linear's weight lies on a `quant` grid that awqnb's `recover_codes`
    accepts (so `awqnb.export.packed` can pack it) → {"on_awqnb_grid": bool, "off_grid_linears": n,
    "off_grid_example": the first refusal's line or None}."""
    off, first = 0, None
    for name, lin in block_linears(model):
        try:
            grid_of(lin.weight.detach(), quant, name)
        except AwqnbError as e:
            off += 1
            first = first or str(e).split(":")[0]
    return {"on_awqnb_grid": off == 0, "off_grid_linears": off, "off_grid_example": first}


# --- a peer's model through awqnb's own evidence ---------------------------------------------

def peer_config(info: dict) -> MethodConfig:
    """The MethodConfig recording a reference run (method 'ar', 'hqq', ...; the run's grid; its
    parameters and seed); lm_head in full precision."""
    quant = QuantConfig(bits=info["bits"], group_size=info["group_size"], symmetric=info["symmetric"])
    return MethodConfig(method=info["method"], quant=quant, params=dict(info.get("params") or {}),
                        seed=int(info.get("seed", 42)))


def grid_config(info: dict) -> MethodConfig:
    """The run's grid in a registered method's terms, for `awqnb.export.packed.save_packed`, which
    reads the method only for its act order ('rtn': none; no scales folded into the weights).
    Record the peer itself in the export's metadata (`peer_config(info).to_dict()`, `info`)."""
    return MethodConfig(method="rtn", quant=peer_config(info).quant)


@torch.no_grad()
def block_errors(model: nn.Module, qmodel: nn.Module, calibration, device=None, propagate: str = "quantized",
                 batch_size: int = 16) -> list[float]:
    """Per block, Σ‖B_q(x) − B(x)‖² / Σ‖B(x)‖² on the calibration inputs (the evidence awqnb's
    pipeline records as block_rel_err): B the FP block of `model`, B_q the same block with
    `qmodel`'s linear weights swapped in, x what the block sees when every earlier block is
    quantized (propagate='quantized', awqnb's default) or FP ('fp')."""
    if propagate not in ("quantized", "fp"):
        raise AwqnbError(f"propagate={propagate!r} is unknown; use 'quantized' or 'fp'.")
    spec = resolve_spec(model)
    qblocks = blocks(qmodel, spec)
    eng = BlockEngine(model, calibration, device=device, batch_size=batch_size)
    out = []
    for step in eng.walk():
        ref = step.forward()
        lins = {n: get_module(step.block, n) for n in spec.linears}
        old = {n: lin.weight.data for n, lin in lins.items()}
        try:
            for n, lin in lins.items():
                lin.weight.data = get_module(qblocks[step.index], n).weight.data.to(old[n].device, old[n].dtype)
            q = step.forward()
        finally:
            for n, lin in lins.items():
                lin.weight.data = old[n]
        num = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(q, ref))
        den = sum(float(b.float().pow(2).sum()) for b in ref)
        out.append(num / den if den > 0 else float("nan"))
        step.next_hidden = q if propagate == "quantized" else ref
    return out


def peer_result(model: nn.Module, qmodel: nn.Module, info: dict, calibration=None, device=None,
                propagate: str = "quantized", model_name: str | None = None) -> QuantResult:
    """A QuantResult for `qmodel`, quantized from `model` by a reference method (`info`: what
    `quantize_reference` returned), so awqnb's evidence reads it as its own: `layer_mse(model,
    calib, {label: (qmodel, res)})`, `sensitivity(model, None, calib, tokens, result=(qmodel,
    res))`, `res.block_errors()` (measured here when `calibration` is given, see `block_errors`).
    No scales are folded into a peer's weights, so W_eff = its weights."""
    n = len(blocks(model, resolve_spec(model)))
    errs = block_errors(model, qmodel, calibration, device, propagate) if calibration is not None else [None] * n
    layers = [LayerRecord(j, evidence={} if e is None else {"block_rel_err": e, "block_inputs": propagate})
              for j, e in enumerate(errs)]
    calib = calibration.to_dict() if hasattr(calibration, "to_dict") else None
    return QuantResult(peer_config(info), model_name or getattr(model.config, "name_or_path", "") or type(model).__name__,
                       getattr(model.config, "model_type", ""), calib, layers, {"total_s": info.get("seconds")},
                       {TOOLS[info["method"]].dist: info.get("version")})
