"""Where and why quantization hurts: the shared plumbing of the diagnostics frames.

This module checks layer indices, picks the device, trims a calibration set and runs the
streaming pass (`forward_pass`): the FP model walked over the calibration chunks with the block
engine, each requested linear's input and output handed to a sink (nothing but the current
chunk's activations is held). The frames built on it live one job per module, each a tidy
DataFrame, one row per (layer, module) or per channel, cached per (model, calibration,
parameters) in memory and on disk (`awqnb.analysis.statcache`):

  awqnb.analysis.salience     salience_table, salience_summary, relative_salience,
                              importance_agreement: per-channel importance of each scale group's inputs
  awqnb.analysis.preactivation preactivation_risk, preactivation_hist, risk_summary: MLP channels at risk
  awqnb.analysis.scales       effective_weights (a quantized layer back in the FP basis), scaling_table,
                              scale_values, alpha_curves: what a QuantResult's scale search chose
  awqnb.analysis.layer_local  capture_layer_inputs, quantize_layer: one layer quantized on its own
  awqnb.analysis.layer_error  rounding_error, channel_error, layer_mse, relative_mse, worst_layers:
                              weight residuals and per-linear output MSE

Notation (one decoder block; tokens t of the calibration set, `n_tok` of them):
  x_t `[ci]`      the input of a linear `W: [co, ci]` (FP model, FP inputs), y_t = W x_t `[co]`
  Q(W)            round-to-nearest on the group grid (`awqnb.core.primitives`), r = W − Q(W) `[co, ci]`
  Δ[i, g]         the grid step (scale) of row i, group g; `Δ[i, j]` its per-column expansion
  z_ti, ẑ_ti      MLP pre-activation x_t·W_gate[i] and its knee-relative value z / c (praq's
                  units: τ and β mean the same for SiLU and gelu-tanh; awqnb/quant/methods/praq.py)
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Callable, Iterable

import torch
from torch import nn

from awqnb.core.errors import AwqnbError
from awqnb.engine.walk import BlockEngine
from awqnb.model.arch import blocks, get_module, resolve_spec
from awqnb.model.data import Calibration, calibration_samples
from awqnb.model.devices import resolve_device


# --- layers ---------------------------------------------------------------------------------
from awqnb.model.sources import short_name

def model_label(model: nn.Module, model_name: str | None = None) -> str:
    """A name for messages: `model_name`, else the model's path/name, else its model_type."""
    if model_name:
        return short_name(str(model_name))
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    return str(name) if name else str(getattr(model.config, "model_type", "the model"))


def n_layers(model: nn.Module) -> int:
    return len(blocks(model, resolve_spec(model)))


def check_layer(model: nn.Module, layer: int, model_name: str | None = None) -> int:
    """`layer` as an index into the decoder blocks (negative counts from the end), or AwqnbError
    naming the valid range: 'layer 28 is out of range: gemma3-270m has 18 decoder layers (0–17)'."""
    n = n_layers(model)
    try:
        if isinstance(layer, bool):
            raise TypeError
        layer = operator.index(layer)
    except TypeError:
        raise AwqnbError(f"layer {layer!r} is not an integer; give a decoder layer index 0–{n - 1}.") from None
    if not -n <= layer < n:
        raise AwqnbError(f"layer {layer} is out of range: {model_label(model, model_name)} has {n} decoder "
                         f"layers (0–{n - 1}).")
    return layer % n


def check_layers(model: nn.Module, layers=None, model_name: str | None = None) -> list[int]:
    """None → every layer; an int or an iterable of ints → sorted unique checked indices."""
    if layers is None:
        return list(range(n_layers(model)))
    if not isinstance(layers, (list, tuple, range, set)) and not hasattr(layers, "tolist"):
        layers = [layers]
    elif hasattr(layers, "tolist"):
        layers = layers.tolist()
        layers = layers if isinstance(layers, list) else [layers]
    out = sorted({check_layer(model, l, model_name) for l in layers})
    if not out:
        raise AwqnbError("no layers given; pass layers=None for every layer or a list of indices.")
    return out


def with_own_block(model: nn.Module, layer: int) -> nn.Module:
    """A model that is `model` except for block `layer`, a deep copy (on the block's device):
    every other module, parameter and buffer is shared, not copied, so quantizing that one block
    costs one block of memory, not a second model (an 8B model's deep copy is 16 GB; a 70B
    model's does not fit). Change only block `layer` of it: the rest is the FP model's own."""
    spec = resolve_spec(model)
    path = spec.blocks_path.split(".")
    root = copy.copy(model)  # shallow: same modules, then a fresh child dict down the blocks' path
    root._modules = dict(model._modules)
    parent, orig = root, model
    for name in path:
        orig = get_module(orig, name)
        own = copy.copy(orig)
        own._modules = dict(orig._modules)
        parent._modules[name] = own
        parent = own
    key = list(parent._modules)[layer]
    parent._modules[key] = copy.deepcopy(orig._modules[key])
    return root


def model_device(model: nn.Module, device) -> torch.device:
    """The device to compute on: `device` resolved, or where the model's first parameter lives when None."""
    if device is None:
        return next(model.parameters()).device
    return resolve_device(device)


def limit_calibration(calibration, max_samples: int | None):
    """A `Calibration` holding the first `max_samples` calibration samples (all when None).
    Accepts a Calibration, a list of 1-D token-id tensors or a `[n, T]` tensor."""
    samples = calibration_samples(calibration, "diagnostics")
    if max_samples is not None:
        if max_samples < 1:
            raise AwqnbError(f"max_samples={max_samples} must be at least 1 (or None for all).")
        samples = samples[:max_samples]
    if isinstance(calibration, Calibration):
        if len(samples) == len(calibration.samples):
            return calibration
        return dataclasses.replace(calibration, samples=samples, n_calib=len(samples))
    return Calibration("custom", len(samples), int(samples[0].numel()), 0, "tensors", samples)


# --- the streaming pass ---------------------------------------------------------------------

@torch.no_grad()
def forward_pass(model: nn.Module, calibration, layers: list[int], points: Iterable[tuple[int, str]],
                 sink: Callable[[int, str, torch.Tensor, torch.Tensor], None], device=None,
                 batch_size: int = 8, on_block: Callable[[int, nn.Module], None] | None = None) -> int:
    """Walk the FP model over the calibration chunks with the block engine (`awqnb.engine.walk`),
    calling `sink(layer, linear, x, y)` with each requested linear's input `x: [b, T, ci]` and
    output `y: [b, T, co]`, and `on_block(layer, block)` once a requested block is done (still on
    the device); the walk stops after block `max(layers)`. Returns the chunk count."""
    engine = BlockEngine(model, calibration, model_device(model, device), None, batch_size)
    model.eval()
    by_layer: dict[int, list[str]] = {}
    for l, n in points:
        by_layer.setdefault(l, []).append(n)
    for step in engine.walk(layers):
        l = step.index
        step.next_hidden = step.forward(lambda name, x, y: sink(l, name, x, y), by_layer.get(l, []),
                                        with_output=True)
        if on_block is not None:
            on_block(l, step.block)
    return len(engine.chunks)
