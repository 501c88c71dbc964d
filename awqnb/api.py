"""The seed-004 API: `quantize_with_awq(src, dst, calib_path, ...)` and `detect_quantization(path)`.

`quantize_with_awq` calibrates on a text file of prompts (one per line), quantizes with an awqnb
method ("awq" by default) and writes one directory under `dst`, named as the seed document names
its models: `{base}_AWQ_w4_g128_headfp16` for the research copy (format "fake") and the same with
`_quantized` for the deployable packed model (format "packed", compressed-tensors).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.export import packed as export
from awqnb.model import checkpoint, devices, loading, provenance, saving, sources
from awqnb.model.data import Calibration
from awqnb.model.sources import short_name
from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.methods import get_method

log = logging.getLogger(__name__)


def read_prompts(calib_path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 prompts file (surrounding whitespace stripped)."""
    p = Path(calib_path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise AwqnbError(f"prompts file {p} does not exist; give a text file with one prompt per line.") from e
    except (OSError, UnicodeDecodeError) as e:
        raise AwqnbError(f"cannot read prompts file {p} ({e}); give a UTF-8 text file with one prompt per line.") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise AwqnbError(f"prompts file {p} has no prompts (it is empty or blank); put one prompt per line.")
    return prompts


def prompt_calibration(tokenizer, calib_path: str | Path, seqlen: int = 512, seed: int = 13,
                       chat_template: bool = False, max_prompts: int | None = None):
    """An `awqnb.model.data.Calibration` with one sample per prompt (token ids, at most `seqlen`).

    chat_template: render each prompt as a user turn through the tokenizer's chat template (what
    a chat model sees at inference). max_prompts: keep that many, drawn with `seed`."""
    prompts = read_prompts(calib_path)
    if max_prompts is not None and max_prompts < len(prompts):
        g = torch.Generator().manual_seed(seed)
        prompts = [prompts[i] for i in torch.randperm(len(prompts), generator=g)[:max_prompts].sort().values.tolist()]
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise AwqnbError("this tokenizer has no chat template; pass chat_template=False to use the prompts as they are.")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in prompts]
        special = False  # the template already holds the special tokens
    else:
        texts, special = prompts, True
    samples = []
    for t in texts:
        ids = tokenizer(t, return_tensors="pt", add_special_tokens=special).input_ids[0][:seqlen].to(torch.long)
        if ids.numel():
            samples.append(ids)
    if not samples:
        raise AwqnbError(f"no prompt of {calib_path} gives any token; check the file.")
    # equal lengths batch together in the pipeline: longest first keeps similar lengths adjacent
    samples.sort(key=lambda s: -s.numel())
    digest = hashlib.sha256(Path(calib_path).expanduser().read_bytes()).hexdigest()
    cal = Calibration("prompts", len(samples), seqlen, seed, str(calib_path), samples)
    cal.extra = {"sha256": digest, "n_prompts": len(prompts), "chat_template": chat_template}
    return cal


def output_name(src: str, method: str, bits: int, group_size: int, skip_lm_head: bool, packed: bool) -> str:
    """`{base}_AWQ_w4_g128_headfp16` (+ `_quantized` for the packed model), as the seed names them."""
    g = "ch" if group_size == -1 else str(group_size)
    head = "headfp16" if skip_lm_head else "headq"
    name = f"{short_name(str(src))}_{method.upper()}_w{bits}_g{g}_{head}"
    return name + ("_quantized" if packed else "")


def quantize_with_awq(src, dst, calib_path, bits: int = 4, group_size: int = 128, seed: int = 13,
                      skip_lm_head: bool = True, backend: str = "awq", *, format: str = "packed",
                      chat_template: bool = False, seqlen: int = 512, max_prompts: int | None = None,
                      device="auto", overwrite: bool = False, symmetric: bool = False,
                      method_params: dict | None = None) -> tuple[Path, dict[str, str]]:
    """Quantize `src` (alias, HF directory, GGUF file or Hub id) on the prompts of `calib_path`
    and save it under the directory `dst`; returns (the model directory, a summary of strings).

    backend: the awqnb method ("awq", "awq_sh", "awq_dh", "awq_js", "awq_gqa", "praq", "rtn", ...).
    format: "packed" (compressed-tensors INT, loads in transformers/vLLM; every quantized layer's
    width must be a multiple of group_size) or "fake" (dequantized weights, checkpoint dtype).
    The directory holds the model, the tokenizer, `quantization_metadata.json` (method, every
    parameter, calibration file and its sha256, per-layer α and losses = the scaling data,
    versions) and the replay record `quant_result.json` + `.safetensors`.
    """
    if format not in export.FORMATS:
        raise AwqnbError(f"format={format!r} is unknown; use one of {export.FORMATS}.")
    cfg = MethodConfig(backend, QuantConfig(bits, group_size, symmetric), params=method_params or {},
                       lm_head="fp16" if skip_lm_head else "quantize", seed=seed)
    method_cls = get_method(cfg.method)
    method_cls(cfg)  # validates the method's parameters
    packed = format == "packed"
    if packed:
        checkpoint.require_compressed_tensors()
    dest = Path(dst).expanduser() / output_name(src, cfg.method, bits, cfg.quant.group_size, skip_lm_head, packed)
    if dest.exists() and not overwrite and (not dest.is_dir() or any(dest.iterdir())):
        raise AwqnbError(f"{dest} already exists; pass overwrite=True or choose another dst.")
    prompts = read_prompts(calib_path)  # a bad file fails before the model is loaded
    saving.check_writable(dest.parent)  # a read-only or full destination: refused before quantizing
    sources.check_source(str(src))  # an unsupported architecture: refused before the weights load
    dev = devices.resolve_device(device)
    model, tok = loading.load_model(str(src), device=dev)
    sources.check_supported(model)
    if packed:
        export.check_packable(model, cfg)
    calib = None
    if method_cls.needs_calibration:
        calib = prompt_calibration(tok, calib_path, seqlen=seqlen, seed=seed, chat_template=chat_template,
                                   max_prompts=max_prompts)
    torch.manual_seed(seed)
    result = pipeline.quantize(model, cfg, calib, device=dev, model_name=str(src), progress=False)
    meta = result.metadata()
    meta["calibration"] = {**(meta.get("calibration") or {}), "prompts_file": str(calib_path),
                           "n_prompts": len(prompts), **(getattr(calib, "extra", None) or {})}
    meta["api"] = {"function": "quantize_with_awq", "backend": backend, "skip_lm_head": skip_lm_head,
                   "seed": seed, "format": format}
    meta["versions"] = dict(meta.get("versions") or {}, **provenance.versions())
    dtype = export.source_dtype(str(src))
    if packed:
        path = export.save_packed(model, tok, dest, cfg, meta, overwrite=overwrite, result=result, dtype=dtype)
    else:
        path = saving.save_quantized(model, tok, dest, meta, overwrite=overwrite, result=result, dtype=dtype)
    info = {"path": str(path), "method": cfg.method, "backend": backend, "bits": str(bits),
            "group_size": str(cfg.quant.group_size), "lm_head": cfg.lm_head, "format": format,
            "calibration": str(calib_path), "n_prompts": str(len(prompts)), "seed": str(seed),
            "seconds": f"{result.timings['total_s']:.2f}"}
    log.info("quantize_with_awq: %s", info)
    return path, info


def detect_quantization(path: str | Path) -> dict:
    """What a model directory holds, from its config.json (`quantization_config`) and awqnb's
    `quantization_metadata.json`.

    Returns {'quantized': bool, 'method': e.g. 'awq' (None when unknown or not quantized),
    'format': 'packed' | 'fake' | None, 'bits', 'group_size' (-1 per channel), 'symmetric',
    'lm_head': 'fp16' | 'quantize' | None, 'quant_method': e.g. 'compressed-tensors',
    'load_with': how to load it, one line (None for another tool's quantization)}.

    'load_with' for a packed (compressed-tensors) directory: its config.json carries no loading
    option, and transformers (5.23, compressed-tensors 0.19) loads an asymmetric (zero-point) one
    only with `quantization_config=CompressedTensorsConfig(dequantize=True)` (a plain load refuses its
    packed zero points); a symmetric one loads plainly too. A mixed-precision one with an 8-bit group
    must not use dequantize=True there (every group would be decoded at group_0's bits); awqnb's
    `load_model` reads every layout right. vLLM: docs/DEPLOY.md.
    """
    p = Path(path).expanduser()
    conf, qc, meta = checkpoint.read_records(p)  # one line for a malformed file
    checkpoint.check_records_agree(p, qc, meta)
    qc, meta = qc or {}, meta or {}
    out = {"quantized": False, "method": None, "format": None, "bits": None, "group_size": None,
           "symmetric": None, "lm_head": None, "quant_method": None, "load_with": None}
    if qc:
        out["quant_method"] = qc.get("quant_method")
    if qc.get("quant_method") == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        w = (groups[0].get("weights") or {}) if groups else {}
        out.update(quantized=bool(w), format="packed" if qc.get("format") == "pack-quantized" else qc.get("format"),
                   bits=w.get("num_bits"), symmetric=w.get("symmetric"),
                   group_size=-1 if w.get("strategy") == "channel" else w.get("group_size"))
        ignore = qc.get("ignore") or []
        out["lm_head"] = "fp16" if any(i == "lm_head" or i.endswith(".lm_head") for i in ignore) else "quantize"
    elif qc:
        out.update(quantized=True, bits=qc.get("bits") or qc.get("w_bit"), group_size=qc.get("group_size")
                   or qc.get("q_group_size"), method=qc.get("quant_method"))
    if meta:
        c = meta.get("config") or {}
        q = c.get("quant") or {}
        out.update(quantized=True, method=meta.get("method"), bits=q.get("bits", out["bits"]),
                   group_size=q.get("group_size", out["group_size"]), symmetric=q.get("symmetric", out["symmetric"]),
                   lm_head=c.get("lm_head", out["lm_head"]),
                   format=(meta.get("export") or {}).get("format") or out["format"] or "fake")
    if qc.get("quant_method") == "compressed-tensors":
        out["load_with"] = export.load_hint(qc)
    elif not qc:  # dense weights (fake-quant or FP): nothing to decode
        out["load_with"] = "transformers: AutoModelForCausalLM.from_pretrained(path); or awqnb's load_model(path)"
    return out
