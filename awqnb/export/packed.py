"""Deployable checkpoints: an awqnb-quantized model saved in compressed-tensors' `pack-quantized`
format, which transformers (with the `compressed-tensors` package) and vLLM load without awqnb.

awqnb quantizes in place ("fake quantization"): every quantized linear holds
`Ŵ = (q − zero) · scale` on awqnb's grid (primitives.py), with AWQ scales already folded into the
previous op and flips / ReFlip already applied to q. Packing therefore needs no calibration data:
`recover_codes` finds (q, scale, zero) from Ŵ alone, checks that dequantizing reproduces Ŵ, and
the compressed-tensors compressor packs them.

Conventions, awqnb → compressed-tensors (INT, `num_bits = b`):
    asymmetric  q ∈ [0, 2^b − 1], zero ∈ [0, 2^b − 1]  →  q_ct = q − 2^(b−1), zero_ct = zero − 2^(b−1)
                (both int8 in [−2^(b−1), 2^(b−1) − 1]); (q_ct − zero_ct) · scale = (q − zero) · scale
    symmetric   q ∈ [−(2^(b−1) − 1), 2^(b−1) − 1]     →  q_ct = q, no zero point
    group g     strategy 'group', scale/zero `[co, ci / g]`;  g = −1: strategy 'channel', `[co, 1]`
compressed-tensors needs `ci % g == 0` for every quantized linear (awqnb allows a shorter last
group): such a model is refused with what to do instead.

Mixed precision (`MethodConfig.plan`): linears a plan keeps in floating point (bits 16) go to the
config's `ignore` list and are stored dense. With a plan, `group_0` targets the exact names of the
linears at the run's bits (never the class `Linear`: vLLM's `find_matched_target` tries a class
target before the parts of its fused `qkv_proj` / `gate_up_proj`, so a class target would serve an
8-bit q/k/v at 4 bits). Linears kept at other bits (8), `other_bits=`:
    'group'  their own config group targeting their exact module names (vLLM, compressed-tensors);
    'dense'  in `ignore`, stored dense with their (8-bit-grid) values in the checkpoint's dtype;
    'auto'   (default) 'group' for symmetric grids, 'dense' for asymmetric ones: transformers (5.23)
             loads asymmetric checkpoints only with `CompressedTensorsConfig(dequantize=True)`,
             which decodes every dense module with ONE config group (`get_dense_scheme`), so an
             8-bit group would be decoded as 4-bit there (awqnb's own loader re-decodes such
             groups: `checkpoint.redecode_other_groups`). Both choices reload bit for bit (tests).
A plan names whole scale groups (q/k/v together, gate/up together), so an engine's fused
projections never mix precisions.

What vLLM serves (its WNA16 kernels; docs/DEPLOY.md): 4 and 8 bits, no quantized lm_head. Other bits
and a quantized lm_head are refused here unless `allow_unservable=True` (then a warning). Act-order
is recorded as compressed-tensors' "weight" (the codes were found in act order, the groups stay
contiguous: no g_idx), never "group".

Loading with transformers: the config holds no loading option; asymmetric (zero-point) checkpoints
need `quantization_config=CompressedTensorsConfig(dequantize=True)` (`load_hint`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from awqnb.core.codes import Codes, recover_codes
from awqnb.core.config import QuantConfig
from awqnb.core.dtypes import DTYPES
from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import dequantize, effective_group_size, expand_groups, quantize
from awqnb.model.arch import blocks, get_module, resolve_spec
from awqnb.model.checkpoint import CT_VERSION, require_compressed_tensors
from awqnb.model.loading import load_model
from awqnb.model.saving import atomic_dir, jsonable
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.plan import FP_BITS, linear_bits

log = logging.getLogger(__name__)

FORMATS = ("packed", "fake")
CT_FORMAT = "pack-quantized"
VLLM_BITS = (4, 8)  # vLLM's compressed-tensors WNA16 types (zero points: 4 and 8 too); docs/DEPLOY.md


# --- which linears are quantized ------------------------------------------------------------

def quantized_linears(model: nn.Module, cfg: MethodConfig, dense_other: bool = False) -> dict[str, nn.Linear]:
    """Full module name → linear, for every linear awqnb quantized under `cfg`: the block
    linears of the architecture spec (but those a plan keeps in floating point, and with
    `dense_other` those it keeps at other bits than `cfg.quant.bits`), and lm_head when
    `cfg.lm_head == 'quantize'`."""
    spec = resolve_spec(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for j, block in enumerate(blocks(model, spec)):
        planned = linear_bits(cfg.plan, spec, j, cfg.quant.bits)
        for rel in spec.linears:
            if planned.get(rel) == FP_BITS or (dense_other and rel in planned):
                continue
            lin = get_module(block, rel)
            out[names[id(lin)]] = lin
    if cfg.lm_head == "quantize":
        head = model.get_output_embeddings()
        out[names[id(head)]] = head
    return out


def linear_grids(model: nn.Module, cfg: MethodConfig) -> dict[str, QuantConfig]:
    """Full module name → the grid of each quantized linear: `cfg.quant`, or the plan's bits on the
    same group size and symmetry for the linears a plan keeps at other bits."""
    import dataclasses

    spec = resolve_spec(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = {n: cfg.quant for n in quantized_linears(model, cfg)}
    for j, block in enumerate(blocks(model, spec)):
        for rel, b in linear_bits(cfg.plan, spec, j, cfg.quant.bits).items():
            if b != FP_BITS:
                out[names[id(get_module(block, rel))]] = dataclasses.replace(cfg.quant, bits=b)
    return out


def check_packable(model: nn.Module, cfg: MethodConfig, allow_unservable: bool | None = False) -> None:
    """Refuse, before any work, a model or setting the pack-quantized format cannot hold, or one
    vLLM would not load (`check_servable`; allow_unservable True: warn instead, None: no check)."""
    require_compressed_tensors()
    if allow_unservable is not None:
        check_servable(model, cfg, allow_unservable)
    q = cfg.quant
    if not 1 <= q.bits <= 8:  # awqnb's own bits (2, 3, 4, 8) all fit; kept for clarity
        raise AwqnbError(f"bits={q.bits} does not fit compressed-tensors' packed INT format (1-8 bits); "
                         "use --bits 4 or 8, or --format fake.")
    if q.group_size == -1:
        return
    for lin in quantized_linears(model, cfg).values():
        effective_group_size(lin.in_features, q.group_size)  # awqnb's own message for g > ci first
    bad = sorted({(n, lin.in_features) for n, lin in quantized_linears(model, cfg).items()
                  if lin.in_features % q.group_size}, key=lambda t: t[0])
    if bad:
        widths = sorted({ci for _, ci in bad})
        fits = [g for g in (128, 64, 32) if all(ci % g == 0 for ci in widths) and g != q.group_size]
        hint = f"--group-size {fits[0]}" if fits else "a group size that divides them"
        raise AwqnbError(
            f"group size {q.group_size} does not divide the {', '.join(map(str, widths))} input channels of "
            f"{len(bad)} linear(s) (e.g. {bad[0][0]}); compressed-tensors' packed format needs equal groups. "
            f"Use {hint}, per-channel (--group-size -1), or --format fake (awqnb's shorter last group)."
        )


def is_mixed(model: nn.Module, cfg: MethodConfig) -> bool:
    """Whether a plan keeps any block linear at other bits than `cfg.quant.bits` (8 or 16)."""
    if not cfg.plan:
        return False
    spec = resolve_spec(model)
    return any(linear_bits(cfg.plan, spec, j, cfg.quant.bits) for j in range(len(blocks(model, spec))))


def check_servable(model: nn.Module, cfg: MethodConfig, allow_unservable: bool = False) -> None:
    """Refuse packed output vLLM would not load (bits other than 4/8, a quantized lm_head), with
    what serves it instead; with allow_unservable, warn and go on (transformers and awqnb read it)."""
    bits = sorted({q.bits for q in linear_grids(model, cfg).values()} - set(VLLM_BITS))
    why = []
    if bits:
        why.append(f"{'/'.join(map(str, bits))}-bit linears (vLLM's packed INT kernels take 4 and 8 bits)")
    if cfg.lm_head == "quantize":
        why.append("a quantized lm_head (vLLM quantizes only linear layers, never lm_head)")
    if not why:
        return
    what = " and ".join(why)
    if not allow_unservable:
        raise AwqnbError(f"the packed format would hold {what}, which vLLM will not load; use --format fake "
                         "(awqnb eval and transformers read it), or allow_unservable=True to pack it anyway.")
    log.warning("packing %s: vLLM will not load this checkpoint (transformers and awqnb will).", what)


def export_actorder(cfg: MethodConfig) -> str | None:
    """compressed-tensors' `actorder` for awqnb's codes: "weight" when a GPTQ rounder ran in act
    order (its groups stay contiguous, so the checkpoint needs no g_idx), else None; never
    "group" (vLLM's Machete refuses it, compressed-tensors 0.19 rejects it)."""
    from awqnb.quant.methods import get_method

    params = {**get_method(cfg.method).PARAMS, **cfg.params}
    return "weight" if params.get("act_order") else None


# --- compressed-tensors config and packing --------------------------------------------------

def ct_scheme(cfg: QuantConfig, actorder: str | None = None):
    """The compressed-tensors QuantizationScheme for awqnb's grid (weights only, INT, static)."""
    require_compressed_tensors()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if cfg.group_size == -1:
        args = QuantizationArgs(num_bits=cfg.bits, type="int", symmetric=cfg.symmetric, strategy="channel",
                                dynamic=False, actorder=actorder)
    else:
        args = QuantizationArgs(num_bits=cfg.bits, type="int", symmetric=cfg.symmetric, strategy="group",
                                group_size=cfg.group_size, dynamic=False, actorder=actorder)
    return QuantizationScheme(targets=["Linear"], weights=args, format=CT_FORMAT)


def ct_config(cfg: QuantConfig, ignore: list[str], others: dict[int, list[str]] | None = None,
              names: list[str] | None = None, actorder: str | None = None):
    """compressed-tensors QuantizationConfig: `group_0` at `cfg` over every Linear but `ignore`, or
    over exactly `names` when given (mixed precision: module docstring); with `others` (bits → full
    module names), one more group per bits targeting those names exactly."""
    import dataclasses

    from compressed_tensors.quantization import QuantizationConfig

    # one precision: the class target `Linear`, as llm-compressor writes W4A16 (and what
    # compressed-tensors' name-only matching, `match_quantizable_tensors`, reads as "every linear")
    base = ct_scheme(cfg, actorder)
    groups = {"group_0": base if names is None else base.model_copy(update={"targets": sorted(names)})}
    for i, (bits, other) in enumerate(sorted((others or {}).items()), start=1):
        scheme = ct_scheme(dataclasses.replace(cfg, bits=bits), actorder)
        groups[f"group_{i}"] = scheme.model_copy(update={"targets": sorted(other)})
    return QuantizationConfig(config_groups=groups, format=CT_FORMAT,
                              quantization_status="compressed", ignore=list(ignore))


def other_groups(model: nn.Module, cfg: MethodConfig) -> dict[int, list[str]]:
    """bits → full names of the linears a plan keeps at bits other than `cfg.quant.bits` (not 16)."""
    out: dict[int, list[str]] = {}
    for n, q in linear_grids(model, cfg).items():
        if q.bits != cfg.quant.bits:
            out.setdefault(q.bits, []).append(n)
    return out


def to_ct(codes: Codes, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """awqnb codes → compressed-tensors' signed int8 codes `[co, ci]` and zero `[co, n_group]`
    (None when symmetric)."""
    if cfg.symmetric:
        return codes.q.to(torch.int8), None
    off = 2 ** (cfg.bits - 1)
    return (codes.q - off).to(torch.int8), (codes.zero - off).to(torch.int8)


@torch.no_grad()
def pack_linear(w: torch.Tensor, cfg: QuantConfig, name: str, scale_dtype: torch.dtype,
                check: bool = True) -> tuple[dict[str, torch.Tensor], Codes]:
    """The compressed-tensors tensors of one fake-quantized linear (local names: weight_packed,
    weight_scale, weight_shape, weight_zero_point), packed by the package's compressor, on the CPU.

    The compressor re-quantizes the weight it is given; it gets `(q_ct − zero_ct) · scale`,
    exact in float32, so its codes are ours; with check=True the packed codes are unpacked and
    compared (and a mismatch raises)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32

    codes = recover_codes(w, cfg, name)
    q_ct, z_ct = to_ct(codes, cfg)
    scheme = ct_scheme(cfg)
    scale = codes.scale.to(scale_dtype)
    ci = w.shape[1]
    k = q_ct.float() - (expand_groups(z_ct.float(), ci, cfg.group_size) if z_ct is not None else 0.0)
    sd = {"weight": k * expand_groups(scale.float(), ci, cfg.group_size), "weight_scale": scale.float()}
    if z_ct is not None:
        sd["weight_zero_point"] = z_ct
    compressor = BaseCompressor.get_value_from_registry(CT_FORMAT)
    out = compressor.compress(sd, scheme)
    if check:
        back = unpack_from_int32(out["weight_packed"], cfg.bits, torch.Size(w.shape))
        if not torch.equal(back.to(torch.int8), q_ct):
            raise AwqnbError(f"internal: compressed-tensors packed {name} to different codes than awqnb's; "
                             f"check the compressed-tensors version (tested: {CT_VERSION}).")
    out["weight_scale"] = scale
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}, codes


def native_dtype(config) -> torch.dtype | None:
    """The floating dtype a checkpoint's config declares (`dtype` / `torch_dtype`), if any."""
    for key in ("dtype", "torch_dtype"):
        d = getattr(config, key, None)
        if isinstance(d, torch.dtype) and d.is_floating_point:
            return d
        if isinstance(d, str) and d in DTYPES:
            return DTYPES[d]
    return None


def source_dtype(name: str | Path) -> torch.dtype | None:
    """The dtype a model directory's config.json declares (None for aliases, GGUF files, Hub ids:
    awqnb's working copy of those is float32)."""
    f = Path(name).expanduser() / "config.json"
    try:
        c = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return None
    d = c.get("dtype") or c.get("torch_dtype") or (c.get("text_config") or {}).get("dtype")
    return DTYPES.get(d) if isinstance(d, str) else None


def _state_dict_without_ties(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied duplicates dropped (the first name of a shared tensor is
    kept, as save_pretrained does when the config ties them)."""
    seen, out = {}, {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else None
        if key is not None and key in seen:
            if tied:
                continue
            v = v.clone()
        seen[key] = k
        out[k] = v
    return out


@torch.no_grad()
def packed_state_dict(model: nn.Module, cfg: MethodConfig, scale_dtype: torch.dtype,
                      dtype: torch.dtype | None = None,
                      dense_other: bool = False) -> tuple[dict[str, torch.Tensor], list[str], dict]:
    """(state dict to save, ignore list, export stats) of a fake-quantized model.

    Quantized linears become weight_packed / weight_scale / weight_shape (/ weight_zero_point);
    every other tensor is saved as it is, floating ones cast to `dtype` (default: unchanged).
    dense_other: linears a plan keeps at other bits are stored dense and ignored (module docstring).
    Packs what vLLM would not serve too: `save_packed` / `check_packable` decide that."""
    check_packable(model, cfg, allow_unservable=None)
    qlins = quantized_linears(model, cfg, dense_other)
    grids = linear_grids(model, cfg)
    names = {id(m): n for n, m in model.named_modules()}
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in qlins)
    packed_keys = {f"{n}.weight" for n in qlins}
    sd = {}
    for k, v in _state_dict_without_ties(model).items():
        if k in packed_keys:
            continue
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v.detach().cpu().contiguous()
    stats = {"linears": 0, "quantized_weights": 0, "lattice_groups": 0, "max_abs_err": 0.0}
    for n, lin in qlins.items():
        t, codes = pack_linear(lin.weight.data, grids[n], n, scale_dtype)
        for local, v in t.items():
            sd[f"{n}.{local}"] = v
        stats["linears"] += 1
        stats["quantized_weights"] += lin.weight.numel()
        stats["lattice_groups"] += codes.lattice_groups
        stats["max_abs_err"] = max(stats["max_abs_err"], codes.max_abs_err)
    del names
    return sd, ignore, stats


def storage_bits(sd: dict[str, torch.Tensor], cfg: MethodConfig) -> dict:
    """Bytes of the packed tensors and bits per quantized weight (codes + scales + zeros)."""
    packed = sum(v.numel() * v.element_size() for k, v in sd.items()
                 if k.endswith((".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape")))
    n = sum(int(v[0]) * int(v[1]) for k, v in sd.items() if k.endswith(".weight_shape"))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    return {"packed_bytes": packed, "quantized_weights": n, "bits_per_weight": 8 * packed / n if n else None,
            "tensor_bytes": total}


def save_packed(model: nn.Module, tokenizer, dest: str | Path, cfg: MethodConfig, metadata: dict,
                overwrite: bool = False, result=None, scale_dtype: torch.dtype | None = None,
                dtype: torch.dtype | None = None, other_bits: str = "auto",
                allow_unservable: bool = False) -> Path:
    """Save a fake-quantized model in compressed-tensors' pack-quantized format, atomically.

    dest gets config.json (with `quantization_config`), model.safetensors, the tokenizer,
    `quantization_metadata.json` (metadata + an `export` record) and, with `result`, the replay
    record (`QuantResult.save`). dtype: the config's `dtype` (what transformers loads it in) and,
    when given, the dtype the unquantized tensors are cast to (default: the quantized weights'
    dtype, tensors as they are). scale_dtype: of the saved
    scales (default float32: transformers casts them to the dtype the model is loaded in, so a
    float32 load reproduces the float32 fake-quant weights exactly). other_bits: 'auto', 'group' or
    'dense' — how linears a plan keeps at other bits (8) are stored (module docstring).
    allow_unservable: write 2/3-bit linears or a quantized lm_head (which vLLM does not load) with
    a warning instead of refusing them (`check_servable`).
    """
    from safetensors.torch import save_file

    ct = require_compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor

    cast = dtype  # only an explicit dtype casts the unquantized tensors (fp32-kept norms stay fp32)
    # default: the dtype the quantized weights are in (a cast working copy may keep its config's)
    dtype = dtype or next(iter(quantized_linears(model, cfg).values())).weight.dtype
    scale_dtype = scale_dtype or torch.float32
    check_packable(model, cfg, allow_unservable)
    if other_bits not in ("auto", "group", "dense"):
        raise AwqnbError(f"other_bits={other_bits!r} is unknown; use 'auto', 'group' or 'dense'.")
    dense_other = other_bits == "dense" or (other_bits == "auto" and not cfg.quant.symmetric)
    dest = Path(dest)
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        sd, ignore, stats = packed_state_dict(model, cfg, scale_dtype, cast, dense_other)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        conf = model.config
        old = getattr(conf, "dtype", None)
        try:
            conf.dtype = dtype  # the dtype transformers loads it in by default
            conf.save_pretrained(tmp)
        finally:
            conf.dtype = old
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        others = {} if dense_other else other_groups(model, cfg)
        base = sorted(n for n, q in linear_grids(model, cfg).items()
                      if q.bits == cfg.quant.bits) if is_mixed(model, cfg) else None
        qconf = ct_config(cfg.quant, ignore, others, names=base, actorder=export_actorder(cfg))
        ModelCompressor(quantization_config=qconf).update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        size = storage_bits(sd, cfg)
        del sd
        meta = dict(metadata)
        meta["export"] = {"format": "packed", "compressed_tensors_format": CT_FORMAT,
                          "compressed_tensors": ct.__version__, "scale_dtype": str(scale_dtype).replace("torch.", ""),
                          "dtype": str(dtype).replace("torch.", ""), "ignore": ignore,
                          "other_bits": {"stored": "dense" if dense_other else "group",
                                         **{str(b): sorted(v) for b, v in other_groups(model, cfg).items()}},
                          **stats, **size}
        (tmp / "quantization_metadata.json").write_text(json.dumps(meta, indent=1, default=jsonable))
        if result is not None:
            result.save(tmp / "quant_result")
    log.info("packed %d linears (%.3f bits/weight) into %s", stats["linears"], size["bits_per_weight"] or 0, dest)
    return dest


def is_packed(path: str | Path) -> bool:
    """Whether a directory holds a compressed-tensors checkpoint (its config.json says so)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return False
    try:
        conf = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    qc = (conf.get("quantization_config") if isinstance(conf, dict) else None) or {}
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def load_hint(qc: dict) -> str:
    """How to load a compressed-tensors checkpoint with transformers (5.23, compressed-tensors 0.19),
    from its `quantization_config`: the option the config no longer carries, and when it is wrong."""
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
    asym = any((g.get("weights") or {}).get("symmetric") is False for g in groups)
    if len(groups) > 1 and asym:
        return ("awqnb: awqnb.model.loading.load_model(path); transformers cannot load it correctly (with "
                "dequantize=True it decodes every group with group_0's bits, without it the zero points do "
                "not fit); vLLM reads the config groups as written")
    if len(groups) > 1:
        return ("transformers: AutoModelForCausalLM.from_pretrained(path), dense on the first forward "
                "(not dequantize=True: it decodes every group with group_0's bits); or awqnb's load_model(path)")
    if asym:
        return ("transformers: AutoModelForCausalLM.from_pretrained(path, quantization_config="
                "CompressedTensorsConfig(dequantize=True)), dense at load (a plain load refuses the packed "
                "zero points); or awqnb's load_model(path)")
    return ("transformers: AutoModelForCausalLM.from_pretrained(path), dense on the first forward, or with "
            "quantization_config=CompressedTensorsConfig(dequantize=True), dense at load; or awqnb's load_model(path)")


def load_packed(path: str | Path, device=None, dtype: torch.dtype | None = torch.float32):
    """(model, tokenizer) of a compressed-tensors directory with dense (dequantized) weights:
    `loading.load_model`, which checks the tensors and records first (dtype None: the config's)."""
    return load_model(str(path), device=device, dtype=dtype if dtype is not None else "auto")


def decompress(model: nn.Module) -> nn.Module:
    """Dequantize a compressed-tensors model's packed linears in place (what transformers does on
    the first forward), so that its weights can be read and moved."""
    q = getattr(model, "hf_quantizer", None)
    comp = getattr(q, "compressor", None)
    if comp is not None and any(hasattr(m, "weight_packed") for m in model.modules()):
        comp.decompress_model(model)
    return model
