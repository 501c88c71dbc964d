"""One decoder layer quantized on its own (the layer-local protocol of a deep dive): the FP
inputs to the layer captured once, then the pipeline's per-block steps on that layer alone.
"""
from __future__ import annotations

import torch
from torch import nn

from awqnb.analysis.diagnostics import check_layer, limit_calibration, model_device, model_label, with_own_block
from awqnb.core.errors import AwqnbError
from awqnb.engine.walk import BlockEngine, BlockStep
from awqnb.model.arch import attn_shape, blocks, resolve_spec
from awqnb.model.provenance import versions
from awqnb.quant import pipeline as P
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.methods import get_method


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, calibration, layer: int, device=None, batch_size: int = 16,
                         model_name: str | None = None, dtype=None) -> tuple[list[torch.Tensor], list[dict]]:
    """The FP hidden states entering block `layer` and the keyword arguments it receives, per
    calibration chunk of at most `batch_size` samples: (hidden `[b, T, H]` list, kwargs list),
    from the block engine's walk, which stops when block `layer` is reached."""
    layer = check_layer(model, layer, model_name)
    model.eval()
    engine = BlockEngine(model, limit_calibration(calibration, None), model_device(model, device), dtype, batch_size)
    for step in engine.walk([layer]):
        return step.hidden, step.kwargs
    raise AwqnbError(f"layer {layer} was not reached")  # unreachable: walk yields the layer


@torch.no_grad()
def quantize_layer(model: nn.Module, calibration, cfg: MethodConfig, layer: int, device=None, inputs=None,
                   model_name: str | None = None):
    """Quantize block `layer` alone, on the FP model's inputs to it (the layer-local protocol of a
    deep dive: no earlier block is quantized), with exactly the pipeline's per-block steps
    (capture, scale search and fold, clip, rounding, method refinement).

    Returns (qmodel, result): `model` with block `layer` quantized (`diagnostics.with_own_block`:
    that block is a copy, every other module is the FP model's own, shared, so an 8B or 70B model
    costs one block more, not a second model) and a QuantResult holding that one LayerRecord
    (`result.layers[0].index == layer`). The FP model is left as it was; change nothing of qmodel
    but block `layer`. inputs: `capture_layer_inputs(...)` output, to share one capture between methods.
    """
    import time

    layer = check_layer(model, layer, model_name)
    spec = resolve_spec(model)
    method = get_method(cfg.method)(cfg)
    P.validate(model, cfg, spec)
    calib = limit_calibration(calibration, None)
    dev = model_device(model, device)
    if inputs is None:
        inputs = capture_layer_inputs(model, calib, layer, dev, cfg.calib_batch_size, model_name, cfg.dtype)
    hidden, kw = inputs
    qmodel = with_own_block(model, layer)
    block = blocks(qmodel, spec)[layer]
    if method.searches_scales:
        P.keep_block_norms_fp32(block, spec)  # this block only: the others are the FP model's
    engine = BlockEngine(qmodel, calib, dev, cfg.dtype, cfg.calib_batch_size, writes=True)
    attn = attn_shape(qmodel.config)
    keys = P.input_keys(spec)
    t0 = time.perf_counter()
    with engine.onload(block):
        step = BlockStep(engine, layer, block, hidden, kw)
        ins, stats, _outs = P.capture_block(step, keys)
        ctx = P.BlockContext(layer, block, spec, attn, ins, stats, kw, keys)
        rec = P.LayerRecord(layer)
        P.quantize_block(method, ctx, rec)
    rec.seconds = time.perf_counter() - t0
    res = P.QuantResult(cfg, model_label(model, model_name), qmodel.config.model_type, calib.to_dict(), [rec],
                        {"total_s": rec.seconds, "protocol": f"layer {layer} alone, FP inputs"}, versions())
    return qmodel, res
