"""ipywidgets explorers over cached statistics: the α explorer.

`AlphaExplorer(model, calibration)` shows, for one decoder layer and scale group, how the AWQ
scale s(α) = a**α (normalised, awq.py) trades error between channels:

  panel 1  L(α) / L(0) over the α grid (the search loss of awq.py on a token sample, 1 = RTN),
           with the slider's α and the grid minimum α* marked
  panel 2  the distribution of log2 s(α) over the group's channels
  panel 3  each input channel's share of the output error, against its salience rank:
             e_j(α) = E_t[x_tj²] · Σ_{layers of the group} Σ_i (W − W'(α))[i, j]²
           (exact when the input channels are uncorrelated), at the slider's α and at α = 0

Controls (`explorer.widgets`): layer, group, metric (salience 'l1' | 'l2' | 'praq'), group_size,
bits, alpha. Everything a slider move needs is precomputed once per layer: the salience of every
channel (`diagnostics.salience_table`, full calibration set, cached on disk), a token sample of
each group's input (`max_tokens` tokens taken evenly from the first calibration samples that hold
4·max_tokens tokens; whole sequences of the first `n_seq` samples for the attention group, which
needs its sequence structure) and the FP reference output. A move of the α slider then costs one
fake-quantization of the group's weights and one forward of the inspected module on the sample; a
change of layer, group, metric, bits or group size recomputes the α curve (n_grid + 1 such
evaluations, cached per setting).

Protocol: the FP model, each scale group on its own (the block's other groups are not folded,
earlier blocks not quantized); the curve is the one `awq.search_group` computes, on the sample.

Where it runs: the model stays where it was loaded (typically the CPU). The salience pass and the
token sample are block-engine walks (`awqnb.engine.walk`: one block on `device` at a time, the walk
stops at the layer); then the sampled block is copied to `device` (`device_block`, home dtypes) and
kept there with the sample between slider moves, for the last `keep_layers` layers opened, so a
move re-walks nothing. A model already on `device` is used in place (no copy).

Measured on smollm2-135m, layer 28, CPU (2 cores, otherwise idle), max_tokens=512, n_seq=2
(1024 attention tokens), 16 × 512 calibration tokens: an α-slider move takes 8–27 ms with two
threads, 10–43 ms with one (vo fastest, qkv slowest; under heavy contention from other jobs up to
75 ms); a change of group, metric, bits or group size recomputes the 21-point curve in 0.06–0.85 s;
opening a layer costs one forward pass to it for the token sample (3.4 s / 6.3 s) plus the salience
pass the first time (cached on disk afterwards).

Headless use: set `explorer.widgets['alpha'].value = 0.5`; `explorer.figure` (a plotly
FigureWidget when anywidget is installed, else a go.Figure shown through an ipywidgets Output)
holds the new data; `explorer.last_update_s` is the wall time of the last update.
"""
from __future__ import annotations

import copy
import logging
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from awqnb.analysis import diagnostics as D
from awqnb.analysis.salience import METRICS as SALIENCE_METRICS, salience_table
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.engine.walk import BlockEngine
from awqnb.model.arch import attn_shape, blocks, get_module, resolve_spec
from awqnb.quant.methods.awq import (GroupSearch, InspectRunner, kv_space, scaled_fake_quant, scales_for,
                                     search_group)
from awqnb.workbench import plots

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, 256, -1)


@dataclass
class LayerSample:
    """What the explorer keeps for one decoder layer.

    xs[group]: list of `[b, T, c]` inputs of the group's inspected module (one item: the token
    sample `[1, n_tok, c]`, or for attention the first chunk's `[n_seq, T, H]`); kwargs[group]:
    the matching attention kwargs (empty dicts otherwise); salience: the layer's
    `salience_table` rows; n_tok[group]: tokens in the sample.
    """

    layer: int
    xs: dict = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)
    salience: object = None
    n_tok: dict = field(default_factory=dict)
    seconds: float = 0.0
    salience_seconds: float = 0.0  # of `seconds`: the salience pass (or its cache read)


def _on_device(t: torch.Tensor, device: torch.device) -> bool:
    return t.device == device or (device.index is None and t.device.type == device.type)


def device_block(block: nn.Module, device) -> nn.Module:
    """`block` itself when all its tensors already live on `device`; else a copy of it there, each
    tensor copied straight to the device in its home dtype (no host-side copy of the block), the
    model's own block left untouched where it is."""
    device = torch.device(device)
    tensors = list(block.parameters()) + list(block.buffers())
    if all(_on_device(t, device) for t in tensors):
        return block
    memo = {}  # deepcopy takes these for the block's tensors: the rest of the module is copied as usual
    with torch.no_grad():
        for t in tensors:
            if id(t) in memo:
                continue
            d = t.detach().to(device, copy=True)
            memo[id(t)] = nn.Parameter(d, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else d
    return copy.deepcopy(block, memo)


def _has_anywidget() -> bool:
    try:
        import anywidget  # noqa: F401
    except ImportError:
        return False
    return True


class AlphaExplorer:
    """Interactive α explorer for one model and calibration set (module docstring).

    model: the FP model (not modified); calibration: a Calibration (or token-id tensors);
    layer, group, metric, bits, group_size, alpha: the initial control values; n_grid: α grid
    (20 → 21 points; the slider steps by 1/n_grid); max_tokens: token sample of the token-wise
    groups; n_seq: calibration sequences kept for the attention group; max_samples: calibration
    samples used (None: all); symmetric: the grid of QuantConfig; params: praq parameters;
    cache: the diagnostics cache (True: the default one). device: where the sampled block, its
    inputs and every update are computed (default: where the model's first parameter lives); the
    model itself is never moved. keep_layers: how many opened layers keep their block (and the
    runners built on it) on the device; an older one is copied there again when reopened.
    """

    def __init__(self, model: nn.Module, calibration, layer: int = 0, group: str | None = None, metric: str = "l2",
                 bits: int = 4, group_size: int = 128, alpha: float = 0.5, n_grid: int = 20, max_tokens: int = 512,
                 n_seq: int = 2, max_samples: int | None = None, symmetric: bool = False, params: dict | None = None,
                 device=None, model_name: str | None = None, cache=True, widget: bool | None = None,
                 keep_layers: int = 2):
        import ipywidgets as W

        self.model = model
        self.model_name = model_name
        self.spec = resolve_spec(model)
        self.attn = attn_shape(model.config)
        self.blocks = blocks(model, self.spec)
        self.device = D.model_device(model, device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        model.eval()
        self.calib = D.limit_calibration(calibration, max_samples)
        self.n_grid = int(n_grid)
        if self.n_grid < 1:
            raise AwqnbError(f"n_grid={n_grid} must be at least 1.")
        self.max_tokens, self.n_seq = int(max_tokens), int(n_seq)
        self.symmetric = bool(symmetric)
        self.params = params
        self.cache = cache
        self._samples: dict[int, LayerSample] = {}
        self._curves: dict[tuple, GroupSearch] = {}
        self._runners: dict[tuple, tuple] = {}
        self.keep_layers = int(keep_layers)
        if self.keep_layers < 1:
            raise AwqnbError(f"keep_layers={keep_layers} must be at least 1.")
        self._on: OrderedDict[int, nn.Module] = OrderedDict()  # layer → its block on the device
        self.last_update_s = float("nan")
        self.last_curve_s = float("nan")
        self.history: list[dict] = []
        layer = D.check_layer(model, layer, model_name)
        groups = [g.name for g in self.spec.groups]
        group = group or groups[0]
        if group not in groups:
            raise AwqnbError(f"group {group!r} is unknown; this architecture's scale groups are {groups}.")
        if metric not in SALIENCE_METRICS:
            raise AwqnbError(f"metric {metric!r} is unknown; use one of {SALIENCE_METRICS}.")
        if bits not in BITS:
            raise AwqnbError(f"bits={bits} is not supported; use one of {BITS}.")
        n = len(self.blocks)
        step = 1.0 / self.n_grid
        self.widgets = {
            "layer": W.IntSlider(value=layer, min=0, max=n - 1, step=1, description="layer", continuous_update=False),
            "group": W.Dropdown(options=groups, value=group, description="group"),
            "metric": W.Dropdown(options=list(SALIENCE_METRICS), value=metric, description="salience"),
            "group_size": W.Dropdown(options=self._group_sizes(layer, group), description="group size"),
            "bits": W.Dropdown(options=list(BITS), value=bits, description="bits"),
            "alpha": W.FloatSlider(value=round(round(alpha / step) * step, 10), min=0.0, max=1.0, step=step,
                                   description="α", readout_format=".2f", continuous_update=True),
        }
        gs_opts = self.widgets["group_size"].options
        self.widgets["group_size"].value = group_size if group_size in gs_opts else gs_opts[-1]
        self.status = W.HTML()
        self.use_widget = _has_anywidget() if widget is None else bool(widget)
        if self.use_widget and not _has_anywidget():
            raise AwqnbError("widget=True needs anywidget (pip install anywidget) for plotly's FigureWidget.")
        fig = plots.alpha_explorer_figure()
        import plotly.graph_objects as go

        self.figure = go.FigureWidget(fig) if self.use_widget else fig
        self._out = None if self.use_widget else W.Output()
        self._shown = False
        for k in ("layer", "group", "metric", "group_size", "bits"):
            self.widgets[k].observe(self._on_setting, names="value")
        self.widgets["alpha"].observe(self._on_alpha, names="value")
        self._busy = False
        self._refresh(curve=True)

    # -- settings --------------------------------------------------------------------------
    def _group(self, name: str | None = None):
        name = name or self.widgets["group"].value
        return next(g for g in self.spec.groups if g.name == name)

    def _group_sizes(self, layer: int, group: str) -> list[int]:
        ci = min(get_module(self.blocks[layer], n).in_features for n in self._group(group).layers)
        return [g for g in GROUP_SIZES if g == -1 or g <= ci]

    @property
    def setting(self) -> dict:
        """The current control values."""
        return {k: w.value for k, w in self.widgets.items()}

    @property
    def qcfg(self) -> QuantConfig:
        return QuantConfig(bits=self.widgets["bits"].value, group_size=self.widgets["group_size"].value,
                           symmetric=self.symmetric)

    # -- cached statistics -----------------------------------------------------------------
    @torch.no_grad()
    def layer_sample(self, layer: int) -> LayerSample:
        """Capture (once) the token samples of every scale group's input of `layer` and its
        salience table; later calls return the cached sample."""
        if layer in self._samples:
            return self._samples[layer]
        t0 = time.perf_counter()
        spec = self.spec
        sal = salience_table(self.model, self.calib, layers=[layer], device=self.device, params=self.params,
                               cache=self.cache, model_name=self.model_name)
        t_sal = time.perf_counter() - t0
        # the token sample comes from the first samples only: enough for 4·max_tokens tokens
        # (and the n_seq attention sequences), taken evenly with a stride
        samples, total = [], 0
        for smp_ids in self.calib.samples:
            if total >= 4 * self.max_tokens and len(samples) >= self.n_seq:
                break
            samples.append(smp_ids)
            total += int(smp_ids.numel())
        stride = max(1, -(-total // self.max_tokens))
        points = {g.name: g.layers[0] if g.inspect_kind != "attention" else None for g in spec.groups}
        taken: dict[str, list] = {g: [] for g, p in points.items() if p is not None}
        attn_x: dict[str, torch.Tensor] = {}
        state = {"chunk": 0, "offset": 0, "block_kw": None}
        # hook path → scale group (the attention group's path is its inspect module's input)
        group_at = {(g.inspect if g.inspect_kind == "attention" else g.layers[0]): g.name for g in spec.groups}

        def sink(path, x):
            gname = group_at[path]
            if points[gname] is None:  # attention: whole sequences of the first chunk
                if state["chunk"] == 0:
                    attn_x[gname] = x.detach().clone()
                return
            flat = x.detach().reshape(-1, x.shape[-1])
            idx = torch.arange(flat.shape[0], device=flat.device) + state["offset"]
            taken[gname].append(flat[idx % stride == 0].clone())

        engine = BlockEngine(self.model, samples, self.device, None, self.n_seq)
        for step in engine.walk([layer]):
            state["block_kw"] = step.kwargs[0]
            for i, ids in enumerate(engine.chunks):
                state["chunk"] = i
                step.forward(sink, sorted(group_at), chunks=[i], keep_outputs=False)
                state["offset"] += ids.numel()
        smp = LayerSample(layer, salience=sal, salience_seconds=t_sal)
        for g in spec.groups:
            if g.inspect_kind == "attention":
                smp.xs[g.name] = [attn_x[g.name]]
                smp.kwargs[g.name] = [state["block_kw"] or {}]
            else:
                x = torch.cat(taken[g.name], 0)
                smp.xs[g.name] = [x[None]]
                smp.kwargs[g.name] = [{}]
            smp.n_tok[g.name] = int(smp.xs[g.name][0].shape[0] * smp.xs[g.name][0].shape[1])
        smp.seconds = time.perf_counter() - t0
        self._samples[layer] = smp
        log.info("alpha explorer: layer %d sampled in %.2f s (%s tokens)", layer, smp.seconds, smp.n_tok)
        return smp

    def block(self, layer: int) -> nn.Module:
        """Block `layer` on the device, where the curves and slider moves compute: the model's own
        block when the model lives there, else a copy (`device_block`) kept for the last
        `keep_layers` layers used; an evicted layer's runners go with its block."""
        if layer in self._on:
            self._on.move_to_end(layer)
            return self._on[layer]
        b = device_block(self.blocks[layer], self.device)
        self._on[layer] = b
        while len(self._on) > self.keep_layers:
            old, _ = self._on.popitem(last=False)
            for key in [k for k in self._runners if k[0] == old]:
                del self._runners[key]
        return b

    def _runner(self, layer: int, group: str):
        key = (layer, group)
        if key not in self._runners:
            smp = self.layer_sample(layer)
            g = self._group(group)
            runner = InspectRunner(self.block(layer), g, smp.xs[group], smp.kwargs[group])
            self._runners[key] = (runner, runner.outputs())
        return self._runners[key]

    def salience(self, layer: int | None = None, group: str | None = None, metric: str | None = None) -> torch.Tensor:
        """The salience `[ci]` of the group's input channels (the scaled layers' inputs)."""
        s = self.setting
        layer, group, metric = (s["layer"] if layer is None else layer, group or s["group"], metric or s["metric"])
        df = self.layer_sample(layer).salience
        d = df[df["group"] == group].sort_values("channel")
        return torch.tensor(d[metric].to_numpy(), dtype=torch.float32, device=self.device)

    def _ex2(self, layer: int, group: str) -> torch.Tensor:
        df = self.layer_sample(layer).salience
        d = df[df["group"] == group].sort_values("channel")
        return torch.tensor(d["ex2"].to_numpy(), dtype=torch.float64, device=self.device)

    def curve(self, layer: int | None = None, group: str | None = None, metric: str | None = None,
              bits: int | None = None, group_size: int | None = None) -> GroupSearch:
        """The α → loss curve on the sample (awq.search_group), cached per setting."""
        s = self.setting
        layer = s["layer"] if layer is None else layer
        group, metric = group or s["group"], metric or s["metric"]
        q = QuantConfig(bits or s["bits"], group_size or s["group_size"], self.symmetric)
        key = (layer, group, metric, q.bits, q.group_size, q.symmetric)
        if key not in self._curves:
            runner, _ = self._runner(layer, group)
            g = self._group(group)
            self._curves[key] = search_group(self.block(layer), g, self.salience(layer, group, metric), runner, q,
                                             SearchConfig(n_grid=self.n_grid), self.attn)
        return self._curves[key]

    # -- evaluation at one α -------------------------------------------------------------------
    def scales(self, alpha: float, layer: int | None = None, group: str | None = None,
               metric: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s `[c_prev]` in the previous op's output space, s_full `[ci]` on the layers' inputs)."""
        s = self.setting
        layer = s["layer"] if layer is None else layer
        g = self._group(group)
        a = self.salience(layer, g.name, metric)
        a_prev = kv_space(a, self.attn) if g.gqa_fold else a
        sp = scales_for(a_prev, alpha, None)
        return sp, (sp[self.attn.o_index(sp.device)] if g.gqa_fold else sp)

    @torch.no_grad()
    def evaluate(self, alpha: float, **setting) -> dict:
        """At one α: the loss on the sample (the search loss of awq.py), the scales and each input
        channel's error share e_j (module docstring) → {loss, scales, channel_error}."""
        s = {**self.setting, **setting}
        layer, group = s["layer"], s["group"]
        g = self._group(group)
        q = QuantConfig(s["bits"], s["group_size"], self.symmetric)
        runner, ref = self._runner(layer, group)
        sp, s_full = self.scales(alpha, layer, group, s["metric"])
        ws = [get_module(self.block(layer), n).weight.data for n in g.layers]
        wq = [scaled_fake_quant(w, s_full.to(w.device), q) for w in ws]
        loss = runner.loss(wq, ref)
        err = sum((w.double() - v.double()).pow(2).sum(0) for w, v in zip(ws, wq)) * self._ex2(layer, group)
        return {"loss": loss, "scales": sp, "channel_error": err}

    # -- updates -------------------------------------------------------------------------------
    def _on_setting(self, change):
        if self._busy:
            return
        if change["owner"] in (self.widgets["layer"], self.widgets["group"]):
            self._busy = True
            try:
                opts = self._group_sizes(self.widgets["layer"].value, self.widgets["group"].value)
                cur = self.widgets["group_size"].value
                self.widgets["group_size"].options = opts
                self.widgets["group_size"].value = cur if cur in opts else opts[-1]
            finally:
                self._busy = False
        self._refresh(curve=True)

    def _on_alpha(self, _change):
        if not self._busy:
            self._refresh(curve=False)

    def _refresh(self, curve: bool) -> None:
        t0 = time.perf_counter()
        s = self.setting
        gsr = self.curve()
        if curve:
            self.last_curve_s = time.perf_counter() - t0
        alpha = float(s["alpha"])
        ev = self.evaluate(alpha)
        rtn = gsr.rtn_loss if gsr.rtn_loss > 0 else float("nan")
        err0 = self._err0(s)
        sal = self.salience()
        order = torch.argsort(sal, descending=True, stable=True).cpu()
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        fig = self.figure
        title = (f"{D.model_label(self.model, self.model_name)} · layer {s['layer']} · {s['group']} · "
                 f"{s['metric']} · W{s['bits']} · {'per-channel' if s['group_size'] == -1 else 'g%d' % s['group_size']}"
                 f"<br><sub>α = {alpha:.2f}: loss / RTN loss {ev['loss'] / rtn:.4f} · grid minimum α* = "
                 f"{gsr.best_alpha:.2f}</sub>")
        ctx = fig.batch_update() if self.use_widget else _nullctx()
        with ctx:
            fig.data[0].x, fig.data[0].y = list(gsr.alphas), [l / rtn for l in gsr.losses]
            fig.data[1].x, fig.data[1].y = [alpha], [ev["loss"] / rtn]
            fig.data[2].x, fig.data[2].y = [gsr.best_alpha], [gsr.best_loss / rtn]
            fig.data[3].x = ev["scales"].clamp(min=1e-30).log2().cpu().numpy()
            fig.data[4].x, fig.data[4].y = rank.numpy(), ev["channel_error"].cpu().numpy()
            fig.data[5].x, fig.data[5].y = rank.numpy(), err0.cpu().numpy()
            fig.data[4].name = f"α = {alpha:.2f}"
            fig.layout.title.text = title
        self.current = {"alpha": alpha, "loss": ev["loss"], "loss_rel_rtn": ev["loss"] / rtn,
                        "best_alpha": gsr.best_alpha, "rtn_loss": gsr.rtn_loss}
        self.last_update_s = time.perf_counter() - t0
        self.history.append({**s, "curve": curve, "seconds": self.last_update_s})
        self.status.value = (f"<small>{'curve + ' if curve else ''}update {1000 * self.last_update_s:.0f} ms · "
                             f"sample {self.layer_sample(s['layer']).n_tok[s['group']]} tokens</small>")
        if self._shown and self._out is not None:
            from IPython.display import display

            with self._out:
                self._out.clear_output(wait=True)
                display(self.figure)

    def _err0(self, s) -> torch.Tensor:
        key = ("err0", s["layer"], s["group"], s["bits"], s["group_size"])
        if key not in self._curves:
            self._curves[key] = self.evaluate(0.0)["channel_error"]
        return self._curves[key]

    # -- display -------------------------------------------------------------------------------
    @property
    def ui(self):
        """The controls and the figure as one ipywidgets box."""
        import ipywidgets as W

        w = self.widgets
        controls = W.VBox([W.HBox([w["alpha"], self.status]),
                           W.HBox([w["layer"], w["group"], w["metric"]]),
                           W.HBox([w["bits"], w["group_size"]])])
        return W.VBox([controls, self.figure if self.use_widget else self._out])

    def _ipython_display_(self):
        from IPython.display import display

        self._shown = True
        ui = self.ui
        display(ui)
        if self._out is not None:
            with self._out:
                self._out.clear_output(wait=True)
                display(self.figure)

    def snapshot(self):
        """A static go.Figure copy of the current figure (for exported reports)."""
        import plotly.graph_objects as go

        return go.Figure(self.figure)

    def timings(self, alphas=(0.0, 0.25, 0.5, 0.75, 1.0)) -> dict:
        """Move the α slider over `alphas` and report the update times (s): mean, max, per α."""
        w = self.widgets["alpha"]
        times = []
        for a in alphas:
            w.value = a if w.value != a else (a + w.step if a + w.step <= 1 else a - w.step)
            times.append(self.last_update_s)
        return {"mean_s": sum(times) / len(times), "median_s": statistics.median(times), "max_s": max(times),
                "per_alpha_s": times, "curve_s": self.last_curve_s}


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
