"""Will a walk fit the GPU? A conservative estimate of its peak device memory, checked before any work.

One engine walk (`awqnb.engine.walk`) holds on the compute device, at its peak,

    peak ≈ W (·2 on a GPU) + A + M + X
    W  the largest decoder block's weights in the compute dtype (tensors already on the device in
       that dtype not counted: they are in use already); twice on a GPU, where the next block is
       prefetched while one is worked on
    A  the activations held at once: tokens × width × bytes of the compute dtype, where tokens =
       n_samples × seqlen of the whole calibration set (or evaluation slice) and width = the
       elements per token the walk keeps: the engine keeps a block's inputs and outputs (2·H);
       the quantizer also its quantized outputs (H) and each scale group's captured linear
       input (H for qkv, n_heads·head_dim for o_proj, H for gate/up, I for down) and the
       search's reference output (H). With
       `offload_activations` they live in pinned CPU memory and the device holds one chunk:
       tokens = batch_size × seqlen.
    M  every chunk's attention mask, kept on the device by the engine even when offloading:
       n_samples × T² (compute dtype bytes with eager attention, 1 byte otherwise)
    X  per-chunk transients (one chunk of batch_size × seqlen tokens): the MLP intermediate
       (gate, up and their product: 3·I per token), the attention projections (q, k, v, output),
       with eager attention its scores and probabilities (2·heads·T² per row, float32); for a
       quantizer the float32 math: the largest scale group's weights and an in×in Hessian of the
       widest input (Llama's down_proj: I²).

It is an estimate from shapes, not a bound. For the settings of the H200 peaks measured in
bench/README.md's scale table (awq, bf16, 128 × 512 calibration, batch 16: Llama-3-8B 8.04 GB,
70B 19.11 GB, 70B offloaded 8.79 GB, before prefetch) it computed 8.34, 20.03 and 10.17 GB, a little above
each; the prefetched block adds 0.44 GB at 8B and 1.71 GB at 70B (8B awq with prefetch: 8.17 GB measured); a
method that holds more (awq_dh: 10.57 GB measured at 8B) can pass the check and still run out of
memory during the walk, where the engine's one-line out-of-memory error takes over.

Sensitivity and evaluation add their own terms (`sensitivity_estimate`, `eval_estimate`). The
total is compared with `torch.cuda.mem_get_info`'s free memory; a walk that would not fit is
refused with one line naming the estimate, the free memory (GB = 10⁹ bytes) and the settings
that make it fit. Only CUDA devices are checked: on the CPU (and MPS, which shares host memory)
the operating system is the judge, and nothing is checked here.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from awqnb.core.dtypes import fp32_names
from awqnb.core.errors import AwqnbError
from awqnb.model.arch import attn_shape, blocks, get_module, resolve_spec
from awqnb.model.checkpoint import tensor_files
from awqnb.model.data import calibration_samples

log = logging.getLogger(__name__)

GB = 1e9
# The sensitivity pass's caches on a GPU, bounded whatever the depth (`awqnb.analysis.sensitivity`):
# the hybrid states held at once, and the cached prefixes (FP and quantized states entering every
# block) kept there; prefixes beyond this go to pinned CPU memory.
SENS_STATES_BYTES = 6 * 2**30
SENS_PREFIX_BYTES = 4 * 2**30
QUANTIZE_FIXES = ("pass --offload-activations (offload_activations=True), a smaller --calib-batch-size "
                  "or fewer calibration samples (--n-calib)")
SENSITIVITY_FIXES = ("pass offload_activations=True, fewer windows (n_windows, the report's SENS_WINDOWS) or a "
                     "shorter seqlen (SENS_SEQLEN)")
EVAL_FIXES = "pass a smaller --seqlen (shorter windows, or texts cut shorter), or free the device"


@dataclass
class Estimate:
    """Bytes of device memory a walk needs at its peak, by part (the formula: module docstring)."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        """'12.30 GB (block weights 0.87, activations 10.20, ...)' (GB = 10⁹ bytes)."""
        inner = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items() if v)
        return f"{self.total / GB:.2f} GB ({inner})"


def _text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _bytes_of(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _cuda(device) -> torch.device | None:
    """`device` as a CUDA device with an index, or None when it is not a CUDA device."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def block_weight_bytes(model: nn.Module, device, dtype: torch.dtype | None) -> int:
    """W: the largest block's parameters and buffers as the engine onloads them (floating ones in
    `dtype`, fp32-marked ones in float32; None: as they are), less what is on `device` already in
    that form."""
    dev = torch.device(device)
    best = 0
    for block in blocks(model, resolve_spec(model)):
        keep = fp32_names(block)
        n = 0
        for name, t in list(block.named_parameters()) + list(block.named_buffers()):
            dt = t.dtype
            if dtype is not None and t.is_floating_point() and not name.endswith("inv_freq"):
                dt = torch.float32 if name in keep else dtype
            if t.device.type == dev.type and (dev.index is None or t.device.index == dev.index) and t.dtype == dt:
                continue
            n += t.numel() * _bytes_of(dt)
        best = max(best, n)
    return best


def held_width(model: nn.Module, quantizer: bool = False, layer_batch_size: int = 1) -> int:
    """Elements per token the walk keeps for every calibration token (A's width, module docstring)."""
    h = _text_config(model).hidden_size
    if not quantizer:
        return 2 * h
    spec = resolve_spec(model)
    grouped = {n for g in spec.groups for n in g.layers}
    points = {g.layers[0] for g in spec.groups} | {n for n in spec.linears if n not in grouped}
    captured = max(sum(get_module(b, p).in_features for p in points) for b in blocks(model, spec))
    # in, FP out, quantized out, the search's reference output; + the batch's first inputs
    return 4 * h + captured + (h if layer_batch_size > 1 else 0)


def transient_bytes(model: nn.Module, rows: int, seqlen: int, dtype: torch.dtype, quant_math: bool = False) -> int:
    """X: what one chunk of `rows` × `seqlen` tokens needs while a block runs on it (module docstring)."""
    cfg = _text_config(model)
    a = attn_shape(cfg)
    h = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or 4 * h
    tok = rows * seqlen
    n = tok * (3 * inter + (a.n_heads * 2 + a.n_kv * 2) * a.head_dim + h) * _bytes_of(dtype)
    if getattr(cfg, "_attn_implementation", "eager") == "eager":
        n += 2 * rows * a.n_heads * seqlen * seqlen * 4
    if quant_math:
        spec = resolve_spec(model)
        block = max(blocks(model, spec), key=lambda b: sum(p.numel() for p in b.parameters()))
        group = max(sum(get_module(block, n).weight.numel() for n in g.layers) for g in spec.groups)
        widest_in = max(m.in_features for m in block.modules() if isinstance(m, nn.Linear))
        n += (group + widest_in * widest_in) * 4
    return int(n)


def walk_estimate(model: nn.Module, device, dtype: torch.dtype, n_samples: int, seqlen: int, batch_size: int,
                  offload: bool, width: int | None = None, quant_math: bool = False) -> Estimate:
    """W + A + X of one engine walk over `n_samples` samples of `seqlen` tokens in chunks of
    `batch_size` (module docstring); width: elements kept per token (default 2·H)."""
    width = held_width(model) if width is None else width
    rows = min(batch_size, n_samples)
    held = (rows if offload else n_samples) * seqlen
    b = _bytes_of(dtype)
    eager = getattr(_text_config(model), "_attn_implementation", "eager") == "eager"
    w = block_weight_bytes(model, device, dtype)
    return Estimate({"block weights": w,
                     # the engine prefetches block j+1 onto a GPU while block j is worked on
                     "next block (prefetched)": w if _cuda(device) is not None else 0,
                     "activations" + (" (one chunk: offloaded)" if offload else ""): held * width * b,
                     # every chunk's attention mask stays on the device (never offloaded): [b, 1, T, T],
                     # additive in the compute dtype for eager attention, at most boolean otherwise
                     "masks": n_samples * seqlen * seqlen * (b if eager else 1),
                     "per-chunk transients": transient_bytes(model, rows, seqlen, dtype, quant_math)})


def check_fits(est: Estimate, device, what: str, fixes: str) -> None:
    """AwqnbError (one line) when `est` exceeds the free memory of the CUDA device `device`;
    nothing is checked on other devices."""
    dev = _cuda(device)
    if dev is None:
        log.debug("%s on %s: no memory check (not a CUDA device)", what, device)
        return
    free, _total = torch.cuda.mem_get_info(dev)
    if est.total > free:
        raise AwqnbError(f"{what} needs about {est.describe()} on {dev} but {free / GB:.2f} GB is free; {fixes}.")
    log.debug("%s: about %s of %.2f GB free on %s", what, est.describe(), free / GB, dev)


def quantize_estimate(model: nn.Module, device, dtype: torch.dtype, calibration=None, batch_size: int = 16,
                      offload: bool = False, layer_batch_size: int = 1) -> Estimate:
    """The quantizer's walk: the calibration set's activations at the quantizer's width
    (`held_width`), the float32 math on the largest linear. Without calibration (RTN): one block
    and that math (also for an empty set: the caller refuses that with its own message)."""
    try:
        samples = calibration_samples(calibration, "the memory estimate") if calibration is not None else []
    except AwqnbError:
        samples = []
    if not samples:
        return Estimate({"block weights": block_weight_bytes(model, device, dtype),
                         "per-chunk transients": transient_bytes(model, 0, 0, dtype, quant_math=True)})
    seqlen = max(s.numel() for s in samples)
    return walk_estimate(model, device, dtype, len(samples), seqlen, batch_size, offload,
                         held_width(model, quantizer=True, layer_batch_size=layer_batch_size), quant_math=True)


def check_quantize(model: nn.Module, device, dtype: torch.dtype, calibration=None, batch_size: int = 16,
                   offload: bool = False, layer_batch_size: int = 1, what: str = "quantizing") -> None:
    """Refuse, before any work, a quantization whose walk would not fit `device` (CUDA only)."""
    if _cuda(device) is None:
        return
    est = quantize_estimate(model, device, dtype, calibration, batch_size, offload, layer_batch_size)
    if not any(k.startswith("activations") for k in est.parts):
        fixes = "free the device or pass --device cpu"
    elif offload:  # the device holds one chunk: only a smaller chunk helps
        fixes = "pass a smaller --calib-batch-size (calib_batch_size), or free the device"
    else:
        fixes = QUANTIZE_FIXES
    check_fits(est, device, what, fixes)


def sensitivity_estimate(model: nn.Module, device, dtype: torch.dtype, n_windows: int, seqlen: int,
                         batch_size: int, offload: bool, logit_rows: int, n_variants: int = 8) -> Estimate:
    """The sensitivity pass (`awqnb.analysis.sensitivity`): two copies of a block's weights (its
    own and the quantized ones swapped in), the cached FP and quantized hidden states entering
    every block (2·L + 1 states of n_windows × seqlen × H, kept on the GPU only up to
    SENS_PREFIX_BYTES, else in pinned CPU memory: bounded whatever the depth), the FP
    logits of the slice (positions × vocabulary, float32), at least one group of `n_variants`
    hybrid states, and per chunk the transients and `logit_rows` rows of logits (4 float32 copies).
    With `offload` the states and logits live in pinned CPU memory: one chunk of each on the device."""
    cfg = _text_config(model)
    h, vocab = cfg.hidden_size, cfg.vocab_size
    n_layers = len(blocks(model, resolve_spec(model)))
    b = _bytes_of(dtype)
    rows = min(batch_size, n_windows)
    state = (rows if offload else n_windows) * seqlen * h * b
    positions = (rows if offload else n_windows) * (seqlen - 1)
    prefixes = (2 * n_layers + 1) * state
    if not offload and prefixes > SENS_PREFIX_BYTES:
        prefixes = 2 * state  # on the CPU: the one being read and the one being written
    return Estimate({"block weights": 2 * block_weight_bytes(model, device, dtype),
                     "cached states": prefixes + n_variants * state,
                     "FP logits": positions * vocab * 4,
                     "per-chunk transients": transient_bytes(model, rows, seqlen, dtype)
                     + 4 * min(logit_rows, rows * seqlen) * vocab * 4})


def check_sensitivity(model: nn.Module, device, dtype: torch.dtype, n_windows: int, seqlen: int, batch_size: int,
                      offload: bool, logit_rows: int) -> None:
    """Refuse, before any work, a sensitivity pass that would not fit `device` (CUDA only)."""
    if _cuda(device) is None:
        return
    est = sensitivity_estimate(model, device, dtype, n_windows, seqlen, batch_size, offload, logit_rows)
    fixes = SENSITIVITY_FIXES if not offload else "pass a smaller batch_size or logit_rows, or a shorter seqlen"
    check_fits(est, device, "the sensitivity pass", fixes)


def eval_estimate(model: nn.Module, device, placement: str, seqlen: int, batch_size: int = 1,
                  logit_chunk: int = 512) -> Estimate:
    """Evaluation of batches of `batch_size` × `seqlen` tokens. 'whole': the model's weights still
    to move; 'stream': the largest block, and the output head (its weight) after the walk. Both:
    one batch's hidden states, in and out (2·H per token: the streamed walk groups more batches
    only within the memory left, `awqnb.analysis.evaluate`), its transients, and `logit_chunk`
    positions of logits per row (3 float32 copies: logits, their float copy, the loss)."""
    cfg = _text_config(model)
    dtype = next((p.dtype for p in blocks(model, resolve_spec(model)).parameters() if p.is_floating_point()),
                 torch.float32)
    dev = torch.device(device)
    if placement == "whole":
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                      if t.device.type != dev.type)
    else:
        head = model.get_output_embeddings()
        weights = block_weight_bytes(model, device, None) + (head.weight.numel() * head.weight.element_size()
                                                             if head is not None else 0)
    return Estimate({"weights": weights,
                     "activations": batch_size * seqlen * 2 * cfg.hidden_size * _bytes_of(dtype),
                     "per-chunk transients": transient_bytes(model, batch_size, seqlen, dtype)
                     + 3 * batch_size * min(logit_chunk, seqlen) * cfg.vocab_size * 4})


def check_eval(model: nn.Module, device, placement: str, seqlen: int, batch_size: int = 1,
               logit_chunk: int = 512) -> None:
    """Refuse, before any work, an evaluation that would not fit `device` (CUDA only)."""
    if _cuda(device) is None:
        return
    check_fits(eval_estimate(model, device, placement, seqlen, batch_size, logit_chunk), device,
               f"evaluation ({placement})", EVAL_FIXES)


# --- a checkpoint's size, before loading it ---------------------------------------------------

_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}
_PACKED_AUX = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def checkpoint_bytes(path: str | Path) -> int | None:
    """Bytes of a Hugging Face directory's weights once loaded, from config.json and the safetensors
    headers alone (no tensor data read, except each packed linear's 2-number `weight_shape`): a
    packed (compressed-tensors) linear counts as its dense weight in the config's dtype, as it is
    dequantized at load. None when it cannot tell (not a directory, no safetensors files)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    try:  # the model's own shards (an index's, or model.safetensors), not e.g. quant_result.safetensors
        files = sorted({p / f for f in tensor_files(p).values()})
    except AwqnbError as e:
        log.debug("could not size %s from its headers: %s", p, e)
        return None
    if not files:
        return None
    try:
        conf = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = (conf.get("text_config") or {}).get("torch_dtype") or conf.get("torch_dtype") or conf.get("dtype")
    dense = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(name), 2)
    from safetensors import safe_open

    total = 0
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                keys = set(h.keys())
                for k in keys:
                    if k.endswith("weight_packed"):
                        if k.removesuffix("packed") + "shape" not in keys:
                            return None
                        total += int(torch.prod(h.get_tensor(k.removesuffix("packed") + "shape").long())) * dense
                        continue
                    if k.rpartition(".")[2] in _PACKED_AUX:
                        continue
                    sl = h.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= int(d)
                    total += n * _ST_BYTES.get(sl.get_dtype(), 4)
    except (OSError, ValueError, RuntimeError) as e:
        log.debug("could not size %s from its headers: %s", p, e)
        return None
    return total
