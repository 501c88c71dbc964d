"""quantize(model, method config, calibration) → QuantResult; apply(model, result).

Block by block: capture each block's linear inputs on the calibration set, search and fold the
scale groups, clip, round, then move on with the hidden states `search.propagate` asks for.
The result keeps every α→loss curve and the chosen scales, so `apply` can redo the
quantization on a fresh copy of the model without calibration data.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from awqnb.core import tensorjson
from awqnb.core.codes import grid_of
from awqnb.core.dtypes import dtype_name, mark_fp32, parse_dtype
from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import check_weight, effective_group_size, fake_quant
from awqnb.core.progress import tqdm  # tqdm.auto, or events a report runner draws (progress.py)
from awqnb.engine.budget import check_quantize
from awqnb.engine.capture import ChannelStats
from awqnb.engine.walk import BlockEngine, BlockStep, model_dtype, onloaded, oom_message
from awqnb.model.arch import ArchSpec, attn_shape, blocks, get_module, resolve_spec
from awqnb.model.provenance import versions
from awqnb.quant import methods as _methods  # noqa: F401  (registers methods)
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.methods.awq import GroupSearch, replay_scales
from awqnb.quant.methods.base import BlockContext, Method, get_method
from awqnb.quant.plan import FP_BITS, linear_bits

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """What quantizing one decoder block found and did."""

    index: int
    groups: dict[str, GroupSearch] = field(default_factory=dict)
    clip: dict[str, torch.Tensor] = field(default_factory=dict)  # linear → max_val [co, n_group]
    replay: dict[str, Any] = field(default_factory=dict)  # linear → method replay data
    evidence: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # capture_s, search_s, clip_s, round_s


@dataclass
class QuantResult:
    """Everything a quantization run decided, serialisable with `save`/`load`."""

    config: MethodConfig
    model_name: str
    model_type: str
    calibration: dict | None
    layers: list[LayerRecord]
    timings: dict
    versions: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.method

    def alphas(self) -> dict[int, dict[str, float]]:
        """Chosen α per block and scale group."""
        return {r.index: {g: s.best_alpha for g, s in r.groups.items()} for r in self.layers}

    def curves(self):
        """Tidy α→loss curves: one row per (layer, group, alpha)."""
        import pandas as pd

        rows = [
            {"layer": r.index, "group": g, "alpha": a, "loss": l, "best_alpha": s.best_alpha,
             "loss_rel_rtn": l / s.rtn_loss if s.rtn_loss > 0 else float("nan")}
            for r in self.layers for g, s in r.groups.items() for a, l in zip(s.alphas, s.losses)
        ]
        return pd.DataFrame(rows, columns=["layer", "group", "alpha", "loss", "best_alpha", "loss_rel_rtn"])

    def block_errors(self):
        """Where the error enters: per block, Σ‖B_q(x) − B(x)‖² / Σ‖B(x)‖² on the calibration inputs
        the block saw (quantized block vs FP block, same inputs; layer_batch_size 1 only)."""
        import pandas as pd

        return pd.DataFrame([{"layer": r.index, "rel_err": r.evidence.get("block_rel_err", float("nan"))}
                             for r in self.layers], columns=["layer", "rel_err"])

    def metadata(self) -> dict:
        """JSON-able provenance: method, every parameter, per-layer α and losses, calibration,
        versions, timings, and each method's evidence."""
        return {
            "method": self.method,
            "config": self.config.to_dict(),
            "model": self.model_name,
            "model_type": self.model_type,
            "calibration": self.calibration,
            "layers": [
                {
                    "index": r.index,
                    "alpha": {g: s.best_alpha for g, s in r.groups.items()},
                    "loss": {g: s.best_loss for g, s in r.groups.items()},
                    "loss_rtn": {g: s.rtn_loss for g, s in r.groups.items()},
                    "clipped": sorted(r.clip),
                    "evidence": r.evidence,
                    "seconds": round(r.seconds, 4),
                }
                for r in self.layers
            ],
            "timings": self.timings,
            "versions": self.versions,
            **({"plan": self.config.plan.to_doc()} if self.config.plan else {}),
        }

    def save(self, path: str | Path) -> Path:
        """Write `<stem>.json` (structure) + `<stem>.safetensors` (tensors), no pickle
        (awqnb.core.tensorjson; a `.pt`/`.json` suffix on `path` is dropped); returns the JSON path."""
        return tensorjson.save({"config": self.config.to_dict(), "model_name": self.model_name,
                                "model_type": self.model_type, "calibration": self.calibration,
                                "layers": [vars(r) | {"groups": {g: vars(s) for g, s in r.groups.items()}}
                                           for r in self.layers],
                                "timings": self.timings, "versions": self.versions}, path)

    @classmethod
    def load(cls, path: str | Path) -> "QuantResult":
        """Read a record written by `save` (the stem, or either file's path)."""
        d = tensorjson.load(path)
        try:
            layers = []
            for r in d["layers"]:
                r = dict(r)
                r["groups"] = {g: GroupSearch(**s) for g, s in r["groups"].items()}
                layers.append(LayerRecord(**r))
            return cls(MethodConfig.from_dict(d["config"]), d["model_name"], d["model_type"],
                       d["calibration"], layers, d["timings"], d["versions"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise AwqnbError(f"{path} is not a complete quantization record ({type(e).__name__}: {e}); "
                             "re-save it with `awqnb quantize`.") from e


def input_keys(spec: ArchSpec) -> dict[str, str]:
    """linear name → the name of the first layer of its scale group (its input point)."""
    keys = {}
    for g in spec.groups:
        for name in g.layers:
            keys[name] = g.layers[0]
    for name in spec.linears:
        keys.setdefault(name, name)
    return keys


def validate(model: nn.Module, cfg: MethodConfig, spec: ArchSpec) -> None:
    """Fail before any work: NaN/Inf weights, a group size that does not fit a layer."""
    for name, p in model.named_parameters():
        check_weight(name, p.data)
    bl = blocks(model, spec)
    for bi, block in enumerate(bl):
        for name in spec.linears:
            effective_group_size(get_module(block, name).in_features, cfg.quant.group_size)
    if cfg.plan:
        cfg.plan.check(len(bl), [g.name for g in spec.groups], f"this {model.config.model_type} model")


@torch.no_grad()
def round_planned(lin: nn.Linear, bits: int, cfg: MethodConfig) -> None:
    """A linear a plan keeps at `bits`: round to nearest on the run's grid at those bits, or
    (16) leave it in floating point. The method's own rounding is not used for it."""
    if bits != FP_BITS:
        lin.weight.data.copy_(fake_quant(lin.weight.data, dataclasses.replace(cfg.quant, bits=bits)))


@torch.no_grad()
def check_on_grid(block: nn.Module, names, j: int, cfg: MethodConfig) -> None:
    """Refuse, as soon as a block is rounded, a linear the packed export could not encode: every
    linear the method rounded must be on its own grid, recoverable from Ŵ alone (codes.grid_of;
    ~1.5 s for all of SmolLM2-135M on one CPU core, vs minutes of calibrated quantization)."""
    for name in names:
        grid_of(get_module(block, name).weight.data, cfg.quant, f"block {j} {name}",
                hint=f"{cfg.method} rounded it off its own grid, an awqnb bug (the packed export would refuse "
                     "this model); please report it with the model and method.")


def _rel_err(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Σ‖out − ref‖² / Σ‖ref‖² over the chunks (fp32 sums on the device, one read-back)."""
    num = sum((o.float() - r.float()).pow(2).sum() for o, r in zip(out, ref))
    den = sum(r.float().pow(2).sum() for r in ref)
    return float(num / den) if float(den) > 0 else float("nan")


def keep_offset_norms_fp32(model: nn.Module, spec: ArchSpec) -> None:
    """Store the norms that scales fold into as float32 when they compute x·(offset + w):
    in bf16, (offset + w)/s − offset loses the gain (at s ≥ 256 every channel's becomes 0)."""
    for block in blocks(model, spec):
        keep_block_norms_fp32(block, spec)


def keep_block_norms_fp32(block: nn.Module, spec: ArchSpec) -> None:
    """`keep_offset_norms_fp32` for one block (a block quantized or replayed on its own copy)."""
    if not spec.norm_offset:
        return
    for g in spec.groups:
        if g.prev_kind == "norm":
            mark_fp32(get_module(block, g.prev_op))


def capture_block(step: BlockStep, keys: dict[str, str], keep: bool = True) -> tuple[dict, dict, list]:
    """Run the block on every chunk, recording its linears' inputs at each input point.

    Returns (inputs: key → list of chunk tensors (empty unless keep), stats: key → ChannelStats,
    FP outputs per chunk)."""
    points = sorted(set(keys.values()))
    inputs = {k: [] for k in points}
    stats = {k: ChannelStats() for k in points}

    def sink(name, x):
        stats[name].update(x)
        if keep:
            inputs[name].append(step.engine.stash(x))

    outs = step.forward(sink, points)
    return inputs, stats, outs


def _sync(block: nn.Module) -> float:
    """perf_counter after the block's device has finished its queued work (phase timings)."""
    dev = next(block.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def quantize_block(method: Method, ctx: BlockContext, rec: LayerRecord) -> None:
    """Quantize one block in place with `method`, step by step: the scaler (scale search and fold
    on the salience, clip), the rounder per linear (a plan's linears: `round_planned`), the
    refiners; each step's evidence into `rec`."""
    cfg = method.cfg
    block, spec = ctx.block, ctx.spec
    t = _sync(block)
    if method.searches_scales:
        method.scaler.scale(ctx, rec, method.salience)
    rec.phases["search_s"], t = _sync(block) - t, _sync(block)
    planned = linear_bits(cfg.plan, spec, ctx.index, cfg.quant.bits)
    if method.scaler is not None:
        method.scaler.clip(ctx, rec, planned)
    rec.phases["clip_s"], t = _sync(block) - t, _sync(block)
    for name in spec.linears:
        if name in planned:  # whole scale groups: methods that round a group jointly never see it
            round_planned(get_module(block, name), planned[name], cfg)
            continue
        replay = method.round_linear(ctx, name, get_module(block, name))
        if replay is not None:
            rec.replay[name] = replay
    method.finish_block(ctx)
    rec.phases["round_s"], t = _sync(block) - t, _sync(block)
    check_on_grid(block, [n for n in spec.linears if n not in planned], ctx.index, cfg)
    rec.phases["grid_check_s"] = _sync(block) - t
    rec.evidence.update(ctx.evidence)


@torch.no_grad()
def _quantize_lm_head(model: nn.Module, cfg: MethodConfig, check: bool = False) -> None:
    """Round lm_head in `lmhead_chunks` row chunks (rows are independent, so this is exact);
    untie it first so the input embeddings stay in full precision. check: each chunk must be on
    its grid (check_on_grid)."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.data.clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    round_head(head.weight.data, cfg, check)


@torch.no_grad()
def round_head(w: torch.Tensor, cfg: MethodConfig, check: bool = False) -> torch.Tensor:
    """Round an lm_head weight `[V, H]` in place, in `cfg.lmhead_chunks` row chunks; returns `w`."""
    for rows in torch.chunk(torch.arange(w.shape[0], device=w.device), cfg.lmhead_chunks):
        w[rows] = fake_quant(w[rows], cfg.quant)
        if check:
            grid_of(w[rows], cfg.quant, "lm_head", hint="an awqnb bug (the packed export would refuse it).")
    return w


@torch.no_grad()
def quantize(model: nn.Module, cfg: MethodConfig, calibration=None, device=None,
             model_name: str = "", progress: bool = True, offload_activations: bool = False) -> QuantResult:
    """Quantize `model` in place with the method `cfg.method`; return the evidence.

    calibration: an `awqnb.model.data.Calibration` (samples of token ids); required by calibrated methods.
    device: where the blocks are computed (default: the model's device). The model stays where it
    is: each block is moved to `device` while it is quantized and back after (see `awqnb.engine.walk`),
    so a model on the CPU needs one block of accelerator memory. offload_activations: keep the
    calibration activations in pinned CPU memory between uses.
    """
    t0 = time.perf_counter()
    spec = resolve_spec(model)
    method = get_method(cfg.method)(cfg)
    validate(model, cfg, spec)
    timings_validate = time.perf_counter() - t0
    attn = attn_shape(model.config)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    check_quantize(model, device, parse_dtype(cfg.dtype) or model_dtype(model),  # a walk that cannot fit: now
                   calibration if method.needs_calibration else None, cfg.calib_batch_size, offload_activations,
                   cfg.layer_batch_size, f"quantizing with {cfg.method}")
    model.eval()
    bl = blocks(model, spec)
    keys = input_keys(spec)
    records: list[LayerRecord] = []
    calib_info = None
    timings: dict[str, float] = {"validate_s": timings_validate}
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # initialises the context: resetting stats before it fails
        torch.cuda.reset_peak_memory_stats(device)
    compute_dtype = parse_dtype(cfg.dtype) or model_dtype(model)
    if method.searches_scales:
        keep_offset_norms_fp32(model, spec)

    if method.needs_calibration:
        if calibration is None or not getattr(calibration, "samples", None):
            raise AwqnbError(
                f"method {cfg.method!r} needs calibration data but the calibration set is empty; "
                "pass one from awqnb.model.data.load_calibration (e.g. --calib-dataset wikitext2 --n-calib 128)."
            )
        calib_info = calibration.to_dict() if hasattr(calibration, "to_dict") else None
        engine = BlockEngine(model, calibration, device, compute_dtype, cfg.calib_batch_size, offload_activations,
                             writes=True)
        n = len(bl)
        lbs = cfg.layer_batch_size
        it = tqdm(total=n, desc=f"{cfg.method} blocks", disable=not progress)
        start, start_kw = None, []
        tc = time.perf_counter()
        try:
            for step in engine.walk():
                j = step.index
                if j == 0:
                    timings["capture_s"] = time.perf_counter() - tc
                if j % lbs == 0:
                    start, start_kw = step.hidden, []
                start_kw.append(step.kwargs)
                tb = _sync(step.block)
                inputs, stats, outs = capture_block(step, keys)
                capture_s = _sync(step.block) - tb
                ctx = BlockContext(j, step.block, spec, attn, inputs, stats, step.kwargs, keys)
                rec = LayerRecord(j)
                rec.phases["capture_s"] = capture_s
                quantize_block(method, ctx, rec)
                del ctx, inputs
                step.next_hidden = outs  # FP output of block j: what the next block of a batch sees
                if lbs == 1:
                    # where the error enters: the quantized block against the FP block, same inputs
                    q_outs = step.forward()
                    rec.evidence["block_rel_err"] = _rel_err(q_outs, outs)
                    if cfg.search.propagate == "quantized":
                        step.next_hidden = q_outs
                elif cfg.search.propagate == "quantized" and (j % lbs == lbs - 1 or j == n - 1):
                    # the next batch starts from the quantized outputs of this whole batch
                    first = j - len(start_kw) + 1
                    step.next_hidden = engine.run_blocks(range(first, j + 1), start, start_kw)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                rec.seconds = time.perf_counter() - tb
                records.append(rec)
                it.update(1)
        except torch.OutOfMemoryError as e:  # during the search: name the block and the way out
            j = len(records)
            raise AwqnbError(oom_message(f"quantizing block {j}", bl[j], device)) from e
        it.close()
        timings.update({f"engine_{k}": v for k, v in engine.times.items()})
    else:
        for j, block in enumerate(tqdm(bl, desc=f"{cfg.method} blocks", disable=not progress)):
            tb = time.perf_counter()
            rec = LayerRecord(j)
            with onloaded(block, device):
                planned = linear_bits(cfg.plan, spec, j, cfg.quant.bits)
                for name in spec.linears:
                    if name in planned:
                        round_planned(get_module(block, name), planned[name], cfg)
                        continue
                    replay = method.round_linear(None, name, get_module(block, name))
                    if replay is not None:
                        rec.replay[name] = replay
                tc = time.perf_counter()
                check_on_grid(block, [n for n in spec.linears if n not in planned], j, cfg)
                rec.phases["grid_check_s"] = time.perf_counter() - tc
            rec.seconds = time.perf_counter() - tb
            records.append(rec)
    if cfg.lm_head == "quantize":
        _quantize_lm_head(model, cfg, check=True)
    timings["total_s"] = time.perf_counter() - t0
    for ph in ("capture_s", "search_s", "clip_s", "round_s", "grid_check_s"):
        timings[f"blocks_{ph}"] = sum(r.phases.get(ph, 0.0) for r in records)
    timings["device"] = str(device)
    timings["compute_dtype"] = dtype_name(compute_dtype)
    timings["offload_activations"] = bool(offload_activations)
    if device.type == "cuda":
        timings["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return QuantResult(cfg, model_name, model.config.model_type, calib_info, records, timings, versions())


@torch.no_grad()
def apply(model: nn.Module, result: QuantResult, device=None) -> nn.Module:
    """Redo a quantization on a fresh copy of the FP model from `result`, without searching:
    fold the recorded scales, clamp the recorded clip ranges, round (replaying recorded flips)."""
    cfg = result.config
    spec = resolve_spec(model)
    if model.config.model_type != result.model_type:
        raise AwqnbError(f"this result was made for a {result.model_type!r} model, not {model.config.model_type!r}.")
    method = get_method(cfg.method)(cfg)
    attn = attn_shape(model.config)
    bl = blocks(model, spec)
    if len(bl) != len(result.layers):
        raise AwqnbError(f"this result has {len(result.layers)} blocks but the model has {len(bl)}.")
    keep_offset_norms_fp32(model, spec)
    for rec in result.layers:
        apply_block(bl[rec.index], rec, result, spec, attn, method, device)
    if cfg.lm_head == "quantize":
        _quantize_lm_head(model, cfg)
    return model


@torch.no_grad()
def apply_block(block: nn.Module, rec: LayerRecord, result: QuantResult, spec: ArchSpec, attn, method: Method,
                device=None) -> nn.Module:
    """`apply` for one block (its norms already kept fp32 where scales fold into them): the block is
    onloaded to `device` (default: where it is) while its scales, clips and rounding are replayed."""
    cfg = result.config
    with onloaded(block, device if device is not None else next(block.parameters()).device):
        replay_scales(block, rec, spec, attn, cfg.quant)
        planned = linear_bits(cfg.plan, spec, rec.index, cfg.quant.bits)
        for name in spec.linears:
            if name in planned:
                round_planned(get_module(block, name), planned[name], cfg)
            else:
                method.replay_linear(name, get_module(block, name), rec.replay.get(name))
    return block
