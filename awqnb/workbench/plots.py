"""Plotly figures from the library's tidy DataFrames. Nothing here computes a result: each
function selects, reshapes and draws columns that are already there.

- `perplexity_bar(table)`: `awqnb.analysis.evaluate.comparison_table` output (method, dataset, protocol,
  seqlen, ppl, delta_pct, ci_low, ci_high, verdict; model/bits/group_size when known).
- `alpha_curves(curves)`, `alpha_map(curves)`: `QuantResult.curves()` output (layer, group, alpha,
  loss, best_alpha, loss_rel_rtn), one method at a time; optional constant columns model, method,
  bits, group_size name the run in the title. Which α curves are jagged is measured by
  `awqnb.analysis.scales.curve_jaggedness`; `jagged_caption` turns that into the figure's caption.
- `sensitivity_heatmap`, `sensitivity_bars` (`awqnb.analysis.sensitivity.sensitivity` frames: layer, family,
  mode, kl, ppl, dppl, n_params, mse), `pareto_plot` (`awqnb.analysis.plans.pareto`: strategy, k,
  avg_bits, ppl, kl) and `block_error_profile` (`QuantResult.block_errors()`: where the error
  enters); their titles read the frame's `attrs['provenance']`.

Titles name what the figure is about: model, method, bits and group size (and the evaluation
protocol for perplexity), taken from the frame's columns (when they hold one value) or `meta`.

At 32 layers × 7 linears: layers are a colour scale or an axis, never one legend entry each, and a
value axis with `log='auto'` goes logarithmic when its largest value is over `LOG_RATIO` (20) times
the median (`dominated`), so one loud layer does not flatten the rest.

`offline_notebook()` makes figures in a notebook render as HTML with plotly.js embedded once,
so an executed notebook or its nbconvert HTML shows them without network access.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from awqnb.analysis import scales
from awqnb.core.errors import AwqnbError

CURVE_COLUMNS = ("layer", "group", "alpha", "best_alpha", "loss_rel_rtn")
TABLE_COLUMNS = ("method", "dataset", "ppl")
LAYER_SCALE = "Viridis"  # layer depth → colour, the same in every figure


def offline_notebook(renderer: str = "notebook") -> None:
    """Render figures as `text/html` with plotly.js embedded (no CDN), for notebooks that are
    exported to HTML and read offline.

    Sets `plotly.io.renderers.default` and activates it now, which writes plotly.js once into
    the calling cell's output (what `plotly.offline.init_notebook_mode(connected=False)` does,
    without leaving a second activation pending for the first figure)."""
    import plotly.io as pio

    if renderer not in ("notebook", "plotly_mimetype+notebook"):
        raise AwqnbError(f"renderer {renderer!r} does not embed plotly.js; use 'notebook'.")
    pio.renderers.default = renderer
    pio.renderers._activate_pending_renderers()


# --- titles -------------------------------------------------------------------------------

def _fmt(key: str, v) -> str:
    if key == "bits":
        return f"W{int(v)}"
    if key == "group_size":
        return "per-channel" if int(v) == -1 else f"g{int(v)}"
    if key == "seqlen":
        return f"seqlen {int(v)}"
    if key == "n_windows":
        return f"{int(v)} windows"
    if key == "calibration" and isinstance(v, Mapping):
        return f"calib {v.get('dataset')}"
    return str(v)


def _one(df, key):
    """The column's single non-null value, or None (absent, empty or several values)."""
    if key not in df.columns:
        return None
    vals = df[key].dropna().unique()
    return vals[0] if len(vals) == 1 else None


def context(df=None, meta: Mapping | None = None,
            keys: Iterable[str] = ("model", "method", "bits", "group_size")) -> str:
    """'smollm2-135m · awq · W4 · g128' from `meta` first, then single-valued columns of `df`."""
    meta = meta or {}
    parts = []
    for k in keys:
        v = meta.get(k)
        if v is None and df is not None:
            v = _one(df, k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        parts.append(_fmt(k, v))
    return " · ".join(parts)


def _title(what: str, df, meta, keys) -> str:
    ctx = context(df, meta, keys)
    return f"{what} — {ctx}" if ctx else what


def _require(df, cols, what):
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise AwqnbError(f"{what} needs the columns {list(cols)}; this frame lacks {missing}.")
    if df.empty:
        raise AwqnbError(f"{what}: the frame is empty (a method without a scale search has no α curves).")


def _single_method(df, what):
    if "method" in df.columns and df["method"].nunique() > 1:
        raise AwqnbError(f"{what} draws one method at a time; filter the frame, e.g. df[df.method == 'awq'].")


def _layer_colors(layers) -> dict:
    """Layer → colour of LAYER_SCALE by the layer's value (what `_layer_colorbar` shows)."""
    layers = sorted(layers)
    lo, hi = layers[0], layers[-1]
    if hi == lo:
        return {lo: sample_colorscale(LAYER_SCALE, [0.0])[0]}
    return dict(zip(layers, sample_colorscale(LAYER_SCALE, [(v - lo) / (hi - lo) for v in layers])))


# A value axis turns logarithmic when its largest value is more than LOG_RATIO times the median
# (of the positive values): at 32 layers one layer 100× the rest would flatten every other bar.
LOG_RATIO = 20.0


def dominated(values, ratio: float = LOG_RATIO) -> bool:
    """True when the largest positive finite value exceeds `ratio` × their median (False for
    fewer than two positive values, or when any value is negative: a signed axis stays linear)."""
    vals = [float(v) for v in values if v is not None and v == v and math.isfinite(float(v))]
    if any(v < 0 for v in vals):
        return False
    pos = sorted(v for v in vals if v > 0)
    if len(pos) < 2:
        return False
    n = len(pos)
    median = pos[n // 2] if n % 2 else (pos[n // 2 - 1] + pos[n // 2]) / 2
    return pos[-1] > ratio * median


def _use_log(log, values) -> bool:
    """log=True/False as given; 'auto' by `dominated`."""
    if log == "auto":
        return dominated(values)
    if not isinstance(log, bool):
        raise AwqnbError(f"log={log!r}: use True, False or 'auto' (log when max > {LOG_RATIO:g} × median).")
    return log


# --- figures ------------------------------------------------------------------------------

def perplexity_bar(table, meta: Mapping | None = None, title: str | None = None, log="auto") -> go.Figure:
    """Perplexity per method, one bar trace per evaluation set; each bar labelled with its
    delta % against the baseline and the bootstrap 95% interval (hover). log: 'auto' draws a log
    axis when one method's perplexity dominates (`dominated`)."""
    _require(table, TABLE_COLUMNS, "perplexity_bar")
    fig = go.Figure()
    has_ci = {"delta_pct", "ci_low", "ci_high"} <= set(table.columns)
    for ds, sub in table.groupby("dataset", sort=False):
        text, hover = [], []
        for _, r in sub.iterrows():
            label = f"{r['ppl']:.2f}"
            extra = ""
            if has_ci and r.get("verdict") != "(baseline)":
                label += f" ({r['delta_pct']:+.1f}%)"
                extra = f"<br>Δ {r['delta_pct']:+.2f}% [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
            if "verdict" in sub.columns and r["verdict"]:
                extra += f"<br>verdict: {r['verdict']}"
            text.append(label)
            hover.append(f"{r['method']}<br>ppl {r['ppl']:.4f}{extra}")
        protocol = _one(sub, "protocol")
        seqlen = _one(sub, "seqlen")
        name = str(ds) + (f" ({protocol}, seqlen {int(seqlen)})" if protocol is not None and seqlen is not None else "")
        fig.add_trace(go.Bar(x=sub["method"].astype(str), y=sub["ppl"], name=name, text=text,
                             textposition="outside", hovertext=hover, hoverinfo="text"))
    fig.update_layout(
        title=title or _title("Perplexity (lower is better)", table, meta,
                              ("model", "bits", "group_size", "protocol", "seqlen")),
        barmode="group", xaxis_title="method", yaxis_title="perplexity", legend_title="evaluation set",
        yaxis_type="log" if _use_log(log, table["ppl"]) else "linear",
    )
    return fig


def jagged_caption(jag, max_layers: int = 8) -> str | None:
    """The sentence under the α → loss figure naming the jagged curves of
    `scales.curve_jaggedness` (None when none is jagged): which layers of which group, how large
    their jumps between neighbouring α are, and what the α probe found about why."""
    j = jag[jag["jagged"]]
    if j.empty:
        return None
    parts = []
    for g in dict.fromkeys(j["group"]):
        layers = [int(v) for v in j[j["group"] == g]["layer"]]
        shown = ", ".join(str(v) for v in layers[:max_layers])
        more = f" and {len(layers) - max_layers} more" if len(layers) > max_layers else ""
        parts.append(f"layer{'s' if len(layers) > 1 else ''} {shown}{more} ({g})")
    n = len(j)
    return (f"Jagged curve{'s' if n > 1 else ''} (loss/RTN reverses direction ≥ 2 times between neighbouring α): "
            f"{'; '.join(parts)}; jumps up to {float(j['max_step'].max()):.1f}× between neighbouring α. "
            "Where the α probe ran (bench/README.md, Probes: SmolLM2-135M layer 28 gate_up) such jumps were real, "
            "not noise: one intermediate channel (678), whose gate/up rows round differently at each α, carried "
            "most of the loss where the curve jumped up. For other layers the channel is not measured: "
            "bench/probes/alpha_probe.py --layer N finds it.")


def _wrap(text: str, width: int = 120) -> str:
    import textwrap

    return "<br>".join(textwrap.wrap(text, width))


def _layer_colorbar(lo, hi, **where) -> go.Scatter:
    """An invisible marker trace whose only job is the layer colour bar (no legend entry)."""
    hi = hi if hi > lo else lo + 1
    return go.Scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip", name="layer",
                      marker=dict(color=[lo, hi], cmin=lo, cmax=hi, colorscale=LAYER_SCALE, showscale=True,
                                  colorbar=dict(title="layer", tickformat="d", dtick=1 if hi - lo <= 10 else None)))


def alpha_curves(curves, groups: Iterable[str] | None = None, meta: Mapping | None = None,
                 mode: str = "facet", cols: int = 2, title: str | None = None, log: bool = True,
                 caption: bool = True) -> go.Figure:
    """α → search loss per layer, one line per layer, normalised by the layer's RTN loss (α=0)
    so layers are comparable (1 = plain RTN), on a log axis (`log`) so one layer at 75× RTN does
    not flatten the rest; a star marks each layer's chosen α*. The layer is a colour (one colour
    bar, no legend); hover names layer, group, α and loss. With `caption`, a sentence under the
    figure names the jagged curves (`scales.curve_jaggedness`) and what the α probe found.

    mode: 'facet' (one panel per scale group, `cols` per row) or 'dropdown' (one panel, a menu
    picks the scale group)."""
    _require(curves, CURVE_COLUMNS, "alpha_curves")
    _single_method(curves, "alpha_curves")
    if mode not in ("facet", "dropdown"):
        raise AwqnbError(f"mode={mode!r} is unknown; use 'facet' or 'dropdown'.")
    present = list(dict.fromkeys(curves["group"]))
    groups = present if groups is None else list(groups)
    unknown = [g for g in groups if g not in present]
    if unknown:
        raise AwqnbError(f"scale groups {unknown} are not in the curves; they have {present}.")
    curves = curves[curves["group"].isin(groups)]
    colors = _layer_colors(curves["layer"].unique())
    name = _title("α search: loss / RTN loss per layer (★ chosen α*)", curves, meta,
                  ("model", "method", "bits", "group_size"))
    ytitle = "loss / RTN loss (log)" if log else "loss / RTN loss"
    has_loss = "loss" in curves.columns

    if mode == "facet":
        ncols = max(1, min(cols, len(groups)))
        nrows = math.ceil(len(groups) / ncols)
        fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=groups, shared_xaxes=True,
                            horizontal_spacing=0.08, vertical_spacing=0.12 if nrows > 1 else 0.0)
        where = {g: dict(row=i // ncols + 1, col=i % ncols + 1) for i, g in enumerate(groups)}
    else:
        fig = go.Figure()
        where = {g: {} for g in groups}

    spans = {}
    for gi, g in enumerate(groups):
        sub = curves[curves["group"] == g]
        start = len(fig.data)
        visible = True if mode == "facet" or gi == 0 else False
        for layer, lc in sub.groupby("layer", sort=True):
            lc = lc.sort_values("alpha")
            fig.add_trace(go.Scatter(
                x=lc["alpha"], y=lc["loss_rel_rtn"], mode="lines", name=f"layer {layer}",
                legendgroup=f"layer {layer}", showlegend=False,
                line=dict(color=colors[layer], width=1.5), visible=visible,
                customdata=lc["loss"] if has_loss else None,
                hovertemplate=f"layer {layer} · {g}<br>α %{{x:.2f}}<br>loss/RTN %{{y:.4f}}"
                              + ("<br>loss %{customdata:.4g}" if has_loss else "") + "<extra></extra>",
            ), **where[g])
        best = sub[(sub["alpha"] - sub["best_alpha"]).abs() < 1e-9].drop_duplicates("layer")
        fig.add_trace(go.Scatter(
            x=best["alpha"], y=best["loss_rel_rtn"], mode="markers", name=f"α* ({g})",
            marker=dict(symbol="star", size=11, color=[colors[v] for v in best["layer"]],
                        line=dict(color="black", width=1)),
            customdata=best[["layer", "loss"]].to_numpy() if has_loss else best[["layer"]].to_numpy(),
            showlegend=False, visible=visible,
            hovertemplate=f"layer %{{customdata[0]}} · {g}<br>α* %{{x:.2f}}<br>loss/RTN %{{y:.4f}}"
                          + ("<br>loss %{customdata[1]:.4g}" if has_loss else "") + "<extra></extra>",
        ), **where[g])
        spans[g] = range(start, len(fig.data))
    layers = list(curves["layer"].unique())
    fig.add_trace(_layer_colorbar(min(layers), max(layers)), **(dict(row=1, col=1) if mode == "facet" else {}))

    if mode == "facet":
        fig.add_hline(y=1.0, line=dict(color="grey", dash="dot", width=1), row="all", col="all")
        fig.update_xaxes(title_text="α", row=nrows)
        fig.update_yaxes(title_text=ytitle, col=1)
        fig.update_yaxes(type="log" if log else "linear")
        height = max(420, 320 * nrows)
    else:
        fig.add_hline(y=1.0, line=dict(color="grey", dash="dot", width=1))
        buttons = []
        for g in groups:
            vis = [i in spans[g] or i == len(fig.data) - 1 for i in range(len(fig.data))]
            buttons.append(dict(label=g, method="update",
                                args=[{"visible": vis}, {"title.text": f"{name} — {g}"}]))
        fig.update_layout(updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right",
                                            y=1.15, yanchor="top")],
                          xaxis_title="α", yaxis_title=ytitle, yaxis_type="log" if log else "linear")
        name = f"{name} — {groups[0]}"
        height = 450
    text = jagged_caption(scales.curve_jaggedness(curves)) if caption else None
    bottom = 80
    if text:
        text = _wrap(text)
        n_lines = text.count("<br>") + 1
        fig.add_annotation(text=text, name="jagged_caption", xref="paper", yref="paper", x=0.0, y=0.0,
                           xanchor="left", yanchor="top", yshift=-50, align="left", showarrow=False,
                           font=dict(size=11))
        bottom += 16 * n_lines
        height += 16 * n_lines
    fig.update_layout(title=title or name, showlegend=False, height=height, margin=dict(b=bottom))
    return fig


def alpha_map(curves, meta: Mapping | None = None, title: str | None = None) -> go.Figure:
    """Heatmap of the chosen α* per layer (rows) and scale group (columns)."""
    _require(curves, ("layer", "group", "best_alpha"), "alpha_map")
    _single_method(curves, "alpha_map")
    groups = list(dict.fromkeys(curves["group"]))
    grid = (curves.drop_duplicates(["layer", "group"])
            .pivot(index="layer", columns="group", values="best_alpha")
            .reindex(columns=groups).sort_index())
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=list(grid.columns), y=list(grid.index), zmin=0.0, zmax=1.0,
        colorscale="Cividis", colorbar=dict(title="α*"),
        text=grid.to_numpy(), texttemplate="%{text:.2f}",
        hovertemplate="layer %{y} · %{x}<br>α* %{z:.2f}<extra></extra>",
    ))
    fig.update_layout(
        title=title or _title("Chosen α* per layer and scale group", curves, meta,
                              ("model", "method", "bits", "group_size")),
        xaxis_title="scale group", yaxis_title="layer", height=max(300, 22 * len(grid) + 150),
    )
    fig.update_yaxes(autorange="reversed", dtick=1 if len(grid) <= 40 else None)
    return fig


# --- diagnostics figures (awqnb.analysis.diagnostics frames) ------------------------------------------

def _facets(n: int, cols: int):
    ncols = max(1, min(cols, n))
    return ncols, math.ceil(n / ncols)


def _log10(v):
    """Display transform for values spanning decades (non-positive → None: not drawn)."""
    return [math.log10(x) if x is not None and x == x and x > 0 else None for x in v]


def alpha_explorer_figure(title: str | None = None) -> go.Figure:
    """The empty three-panel figure that `awqnb.workbench.widgets.AlphaExplorer` fills: (1) α → loss / RTN
    loss with the slider's α and α* marked, (2) histogram of log2 s(α), (3) per-channel error
    share against salience rank, at α and at α = 0. Traces, in order: curve, current α, α*,
    log2 s histogram, channel error at α, channel error at α = 0."""
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=("search loss / RTN loss", "scales: log2 s(α)",
                                        "channel error e_j by salience rank"))
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name="L(α)/L(0)", line=dict(color="#1f77b4"),
                             hovertemplate="α %{x:.2f}<br>loss/RTN %{y:.4f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="slider α",
                             marker=dict(size=13, color="#d62728", symbol="circle-open", line=dict(width=3))),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="α* (grid)",
                             marker=dict(size=13, color="gold", symbol="star", line=dict(color="black", width=1))),
                  row=1, col=1)
    fig.add_trace(go.Histogram(x=[], nbinsx=40, name="log2 s", marker_color="#7f7f7f", showlegend=False), row=1, col=2)
    fig.add_trace(go.Scattergl(x=[], y=[], mode="markers", name="α", marker=dict(size=4, color="#d62728"),
                               hovertemplate="salience rank %{x}<br>e_j %{y:.3g}<extra></extra>"), row=1, col=3)
    fig.add_trace(go.Scattergl(x=[], y=[], mode="markers", name="α = 0 (RTN)",
                               marker=dict(size=4, color="#1f77b4", opacity=0.5),
                               hovertemplate="salience rank %{x}<br>e_j %{y:.3g}<extra></extra>"), row=1, col=3)
    fig.update_xaxes(title_text="α", range=[-0.03, 1.03], row=1, col=1)
    fig.update_yaxes(title_text="loss / RTN loss", row=1, col=1)
    fig.update_xaxes(title_text="log2 s", row=1, col=2)
    fig.update_yaxes(title_text="channels", row=1, col=2)
    fig.update_xaxes(title_text="salience rank (0 = most salient)", row=1, col=3)
    fig.update_yaxes(title_text="E[x_j²]·Σ_i ΔW_ij²", type="log", row=1, col=3)
    fig.update_layout(title=title or "α explorer", height=460, width=1150, margin=dict(t=110),
                      legend=dict(orientation="h", y=-0.22))
    return fig


def salience_hist(channels, layer: int, metric: str = "l2", groups: Iterable[str] | None = None,
                  top: int = 8, meta: Mapping | None = None, title: str | None = None, cols: int = 2) -> go.Figure:
    """Distribution of one salience metric over the input channels of each scale group of one
    layer (`diagnostics.salience_table` frame), log10 axis; the `top` most salient channels are
    marked with their channel ids."""
    _require(channels, ("layer", "group", "channel", metric), "salience_hist")
    d = channels[channels["layer"] == layer]
    if d.empty:
        raise AwqnbError(f"salience_hist: layer {layer} is not in the frame (it has {sorted(channels['layer'].unique())}).")
    present = list(dict.fromkeys(d["group"]))
    groups = present if groups is None else list(groups)
    ncols, nrows = _facets(len(groups), cols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=groups, vertical_spacing=0.22)
    for i, g in enumerate(groups):
        sub = d[d["group"] == g]
        where = dict(row=i // ncols + 1, col=i % ncols + 1)
        fig.add_trace(go.Histogram(x=_log10(sub[metric]), nbinsx=50, name=g, showlegend=False,
                                   marker_color="#4c78a8"), **where)
        tops = sub.nlargest(top, metric)
        fig.add_trace(go.Scatter(x=_log10(tops[metric]), y=[0] * len(tops), mode="markers+text",
                                 text=[str(c) for c in tops["channel"]], textposition="top center",
                                 marker=dict(color="#d62728", symbol="triangle-up", size=9), showlegend=False,
                                 hovertemplate="channel %{text}<br>log10 " + metric + " %{x:.3f}<extra></extra>"),
                      **where)
        fig.update_xaxes(title_text=f"log10 {metric}", **where)
    fig.update_layout(title=title or _title(f"Salience ({metric}) per input channel, layer {layer}", channels, meta,
                                            ("model", "calibration")),
                      height=max(350, 300 * nrows), bargap=0.02)
    return fig


def salience_channels(channels, layer: int, group: str, metrics: Iterable[str] = ("l1", "l2", "praq"),
                      meta: Mapping | None = None, title: str | None = None) -> go.Figure:
    """Channel by channel: each metric of one (layer, group) divided by its mean over channels
    (column `<metric>_rel` if present, else the raw metric), one line per metric."""
    d = channels[(channels["layer"] == layer) & (channels["group"] == group)]
    if d.empty:
        raise AwqnbError(f"salience_channels: no rows for layer {layer}, group {group!r}.")
    fig = go.Figure()
    for m in metrics:
        col = f"{m}_rel" if f"{m}_rel" in d.columns else m
        if col not in d.columns or d[col].isna().all():
            continue
        fig.add_trace(go.Scatter(x=d["channel"], y=d[col], mode="lines", name=m,
                                 hovertemplate=f"{m}<br>channel %{{x}}<br>%{{y:.4g}}<extra></extra>"))
    fig.update_layout(title=title or _title(f"Salience per channel — layer {layer}, {group}", d, meta, ("model",)),
                      xaxis_title="input channel", yaxis_title="salience (÷ mean over channels)", yaxis_type="log")
    return fig


def salience_overview(summary, metric: str = "l2", value: str = "max_over_median", meta: Mapping | None = None,
                      title: str | None = None) -> go.Figure:
    """Heatmap over (scale group, layer) of one column of `diagnostics.salience_summary` for one
    metric (default: max / median, the strength of the outlier channels), log10 colour."""
    _require(summary, ("layer", "group", "metric", value), "salience_overview")
    d = summary[summary["metric"] == metric]
    groups = list(dict.fromkeys(d["group"]))
    grid = d.pivot(index="group", columns="layer", values=value).reindex(index=groups)
    fig = go.Figure(go.Heatmap(z=[_log10(r) for r in grid.to_numpy()], x=list(grid.columns), y=groups,
                               customdata=grid.to_numpy(), colorscale="Magma",
                               colorbar=dict(title=f"log10<br>{value}"),
                               hovertemplate="layer %{x} · %{y}<br>" + value + " %{customdata:.3g}<extra></extra>"))
    fig.update_layout(title=title or _title(f"Salience outliers ({metric}: {value}) per layer and group", summary,
                                            meta, ("model",)),
                      xaxis_title="layer", yaxis_title="scale group", height=320)
    fig.update_yaxes(autorange="reversed")  # groups top to bottom in block order
    return fig


def _count_axis(title: str, values) -> dict:
    """A y axis for counts: integer ticks (step 1 up to 10, else plotly's own, whole-number) from 0."""
    top = max([float(v) for v in values if v == v] or [0.0])
    return dict(title=title, tickformat="d", rangemode="tozero", dtick=1 if top <= 10 else None)


def risk_overview(summary, meta: Mapping | None = None, title: str | None = None, log="auto") -> go.Figure:
    """Per layer (`diagnostics.risk_summary`): MLP channels that are dead, dead & risky, and
    critical (dead & risky & high-weight), overlaid bars (each set contains the next); a log
    count axis when one layer's dead count dominates ('auto', `dominated`)."""
    _require(summary, ("layer", "n_dead", "n_dead_risky", "n_critical"), "risk_overview")
    fig = go.Figure()
    for col, name, color in (("n_dead", "dead (rarely live)", "#c7c7c7"),
                             ("n_dead_risky", "dead & risky (can cross the knee)", "#ff9f40"),
                             ("n_critical", "critical (dead & risky & high weight)", "#d62728")):
        fig.add_trace(go.Bar(x=summary["layer"], y=summary[col], name=name, marker_color=color,
                             hovertemplate="layer %{x}<br>" + name + ": %{y}<extra></extra>"))
    fig.update_layout(barmode="overlay", title=title or _title("MLP pre-activation risk per layer", summary, meta,
                                                               ("model",)),
                      xaxis_title="layer", yaxis=_count_axis("channels", summary["n_dead"]),
                      legend=dict(orientation="h", y=-0.2))
    if _use_log(log, summary["n_dead"]):
        fig.update_yaxes(type="log", dtick=None, rangemode=None)
    return fig


def risk_scatter(channels, layer: int, dead_frac: float = 0.05, meta: Mapping | None = None,
                 title: str | None = None) -> go.Figure:
    """One layer's MLP channels (`diagnostics.preactivation_risk`): fraction of tokens on the live
    side of the knee (x, log) against ‖W_down[:, i]‖ (y), colour p_live; critical channels ringed
    in red. The dashed line is the `dead_frac` threshold used for the frame."""
    d = channels[channels["layer"] == layer]
    if d.empty:
        raise AwqnbError(f"risk_scatter: layer {layer} is not in the frame.")
    x = [max(v, 1e-4) for v in d["active_frac"]]
    fig = go.Figure(go.Scattergl(
        x=x, y=d["w_down_norm"], mode="markers", name="channels",
        marker=dict(size=5, color=d["p_live"], colorscale="Viridis", cmin=0, cmax=1, colorbar=dict(title="p_live")),
        customdata=d[["channel", "z_max", "near_knee_frac"]].to_numpy(),
        hovertemplate="channel %{customdata[0]}<br>active %{x:.4f}<br>‖W_down[:, i]‖ %{y:.4f}"
                      "<br>max ẑ %{customdata[1]:.2f}<br>near knee %{customdata[2]:.4f}<extra></extra>"))
    crit = d[d["critical"]]
    fig.add_trace(go.Scatter(x=[max(v, 1e-4) for v in crit["active_frac"]], y=crit["w_down_norm"], mode="markers",
                             name="critical", marker=dict(size=11, color="rgba(0,0,0,0)",
                                                          line=dict(color="#d62728", width=2)),
                             text=[str(c) for c in crit["channel"]],
                             hovertemplate="critical channel %{text}<extra></extra>"))
    fig.add_vline(x=dead_frac, line=dict(color="grey", dash="dash"))
    fig.update_layout(title=title or _title(f"MLP channels of layer {layer}: how often live vs output weight", d,
                                            meta, ("model",)),
                      xaxis_title="fraction of tokens with ẑ > τ (log)", xaxis_type="log", xaxis_range=[-4.1, 0.1],
                      yaxis_title="‖W_down[:, i]‖₂", legend=dict(orientation="h", y=-0.2))
    return fig


def preactivation_hist(hist, tau: float | None = -3.0, meta: Mapping | None = None, title: str | None = None) -> go.Figure:
    """Histogram(s) of the knee-relative pre-activation ẑ (`diagnostics.preactivation_hist`), one
    line per channel (-1: all channels), the knee threshold τ dashed."""
    _require(hist, ("channel", "bin_lo", "bin_hi", "frac"), "preactivation_hist")
    fig = go.Figure()
    for c, d in hist.groupby("channel", sort=False):
        d = d[(d["bin_lo"] > -math.inf) & (d["bin_hi"] < math.inf)]
        fig.add_trace(go.Scatter(x=(d["bin_lo"] + d["bin_hi"]) / 2, y=d["frac"], mode="lines", line_shape="hvh",
                                 name="all channels" if c == -1 else f"channel {c}"))
    if tau is not None:
        fig.add_vline(x=tau, line=dict(color="#d62728", dash="dash"), annotation_text="τ")
    layer = _one(hist, "layer")
    fig.update_layout(title=title or _title(f"Pre-activation ẑ (SiLU units){'' if layer is None else f', layer {layer}'}",
                                            hist, meta, ("model",)),
                      xaxis_title="ẑ = z / c", yaxis_title="fraction of tokens", yaxis_type="log")
    return fig


def rounding_error_dist(table, modules: Iterable[str] | None = None, meta: Mapping | None = None,
                        title: str | None = None) -> go.Figure:
    """|W − Q(W)| per layer and module from `diagnostics.rounding_error` (level 'module'): boxes
    drawn from the recorded quantiles (whiskers q05–q95, box q25–q75, line median), one trace
    (colour, legend entry) per method; x is the module for one layer, else 'L<layer> <module>', so
    32 layers × 7 linears keep one legend entry per method and the hover names layer and module."""
    _require(table, ("layer", "module", "method", "abs_q05", "abs_q25", "abs_q50", "abs_q75", "abs_q95"),
             "rounding_error_dist")
    mods = list(dict.fromkeys(table["module"])) if modules is None else list(modules)
    t = table[table["module"].isin(mods)]
    one_layer = t["layer"].nunique() <= 1
    fig = go.Figure()
    for meth, d in t.groupby("method", sort=False):
        d = d.assign(_m=d["module"].map({m: i for i, m in enumerate(mods)})).sort_values(["layer", "_m"])
        # flat "L3 q_proj" labels: plotly draws precomputed boxes wrongly on a two-level (multicategory) axis
        x = list(d["module"]) if one_layer else [f"L{l} {m}" for l, m in zip(d["layer"], d["module"])]
        fig.add_trace(go.Box(x=x, q1=d["abs_q25"], median=d["abs_q50"], q3=d["abs_q75"], lowerfence=d["abs_q05"],
                             upperfence=d["abs_q95"], name=str(meth), boxpoints=False))
    layer = _one(t, "layer")
    what = "Weight rounding error |W − Q(W)| (q05–q95)" + (f", layer {layer}" if one_layer and layer is not None else "")
    fig.update_layout(boxmode="group", title=title or _title(what, table, meta, ("model", "bits", "group_size")),
                      xaxis_title="module" if one_layer else "layer · module", yaxis_title="|r|", yaxis_type="log",
                      legend_title="method")
    return fig


def flip_errors(table, meta: Mapping | None = None, title: str | None = None) -> go.Figure:
    """Expected per-row output error mean |e_i| before and after the heuristic flips, per (layer,
    module), from the evidence columns of `diagnostics.rounding_error` (methods that flip)."""
    _require(table, ("layer", "module", "method"), "flip_errors")
    if "e_before_mean" not in table.columns or table["e_before_mean"].isna().all():
        raise AwqnbError("flip_errors: the frame has no flip evidence (e_before_mean); pass result= and quantized= "
                         "of a method that flips (awq_sh, awq_dh, awq_js, awq_gqa) to rounding_error.")
    d = table.dropna(subset=["e_before_mean"])
    x = [f"L{l} {m}" for l, m in zip(d["layer"], d["module"])]
    fig = go.Figure([go.Bar(x=x, y=d["e_before_mean"], name="before flips (RTN codes)", marker_color="#c7c7c7"),
                     go.Bar(x=x, y=d["e_after_mean"], name="after flips", marker_color="#2ca02c")])
    fig.update_layout(barmode="group", title=title or _title("Mean |expected row error| before/after flips", d, meta,
                                                             ("model", "method")),
                      yaxis_title="mean_i |Σ_j μ_j r_ij|", yaxis_type="log")
    return fig


def mse_heatmap(mse, value: str = "rel_mse", log: bool = True, meta: Mapping | None = None, cols: int = 2,
                title: str | None = None, zmid: float | None = None) -> go.Figure:
    """Output MSE of each linear (`diagnostics.layer_mse`): one heatmap per method, layers as
    rows, modules as columns, a shared colour scale (log10 of `value` when `log`). For a ratio
    column (e.g. `vs_rtn` from `diagnostics.relative_mse`) use log=True and zmid=0: below 0 means
    lower error than the baseline."""
    _require(mse, ("method", "layer", "module", value), "mse_heatmap")
    methods = list(dict.fromkeys(mse["method"]))
    modules = list(dict.fromkeys(mse["module"]))
    ncols, nrows = _facets(len(methods), cols)
    n_layers = mse["layer"].nunique()
    row_h = 18 * n_layers + 140
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=methods, shared_yaxes=True,
                        horizontal_spacing=0.05, vertical_spacing=min(0.3, 90 / (nrows * row_h)) if nrows > 1 else 0.1)
    vals = _log10(mse[value]) if log else list(mse[value])
    finite = [v for v in vals if v is not None and v == v]
    zmin, zmax = (min(finite), max(finite)) if finite else (0, 1)
    if zmid is not None and finite:  # symmetric around zmid: its colour is the scale's centre
        half = max(abs(zmax - zmid), abs(zmid - zmin)) or 1.0
        zmin, zmax = zmid - half, zmid + half
    for i, m in enumerate(methods):
        g = mse[mse["method"] == m].pivot(index="layer", columns="module", values=value).reindex(columns=modules)
        z = [_log10(r) for r in g.to_numpy()] if log else g.to_numpy()
        fig.add_trace(go.Heatmap(z=z, x=modules, y=list(g.index), customdata=g.to_numpy(), zmin=zmin, zmax=zmax,
                                 zmid=zmid, colorscale="RdBu_r" if zmid is not None else "Viridis",
                                 coloraxis=None, showscale=(i == 0),
                                 colorbar=dict(title=("log10 " if log else "") + value),
                                 hovertemplate=f"{m}<br>layer %{{y}} · %{{x}}<br>{value} %{{customdata:.4g}}<extra></extra>"),
                      row=i // ncols + 1, col=i % ncols + 1)
    fig.update_yaxes(autorange="reversed", dtick=1 if n_layers <= 40 else None)
    fig.update_yaxes(title_text="layer", col=1)
    fig.update_xaxes(title_text="linear module")
    fig.update_layout(title=title or _title(f"Output {value} per linear layer (FP inputs)", mse, meta,
                                            ("model", "bits", "group_size")),
                      height=max(350, nrows * row_h))
    return fig


def mse_layer_bars(mse, layer: int, value: str = "rel_mse", meta: Mapping | None = None,
                   title: str | None = None) -> go.Figure:
    """One layer's output error per module, one bar trace per method (log axis)."""
    d = mse[mse["layer"] == layer]
    if d.empty:
        raise AwqnbError(f"mse_layer_bars: layer {layer} is not in the frame.")
    fig = go.Figure([go.Bar(x=s["module"], y=s[value], name=str(m),
                            hovertemplate=f"{m}<br>%{{x}}<br>{value} %{{y:.4g}}<extra></extra>")
                     for m, s in d.groupby("method", sort=False)])
    fig.update_layout(barmode="group", title=title or _title(f"Output {value} of layer {layer}", d, meta, ("model",)),
                      xaxis_title="module", yaxis_title=value, yaxis_type="log")
    return fig


def scale_distribution(values, layer: int | None = None, meta: Mapping | None = None, cols: int = 2,
                       title: str | None = None) -> go.Figure:
    """Histogram of log2 s per scale group (`diagnostics.scale_values`) for one layer (or the
    frame's only layer)."""
    _require(values, ("layer", "group", "log2_scale"), "scale_distribution")
    layer = layer if layer is not None else _one(values, "layer")
    if layer is None:
        raise AwqnbError("scale_distribution draws one layer; pass layer=.")
    d = values[values["layer"] == layer]
    groups = list(dict.fromkeys(d["group"]))
    ncols, nrows = _facets(len(groups), cols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=groups, vertical_spacing=0.22)
    for i, g in enumerate(groups):
        fig.add_trace(go.Histogram(x=d[d["group"] == g]["log2_scale"], nbinsx=40, name=g, showlegend=False),
                      row=i // ncols + 1, col=i % ncols + 1)
    fig.update_xaxes(title_text="log2 s")
    fig.update_layout(title=title or _title(f"Chosen scales, layer {layer}", d, meta, ("model", "method")),
                      height=max(350, 280 * nrows))
    return fig


def scale_spread(table, value: str = "s_ratio", meta: Mapping | None = None, title: str | None = None,
                 log="auto") -> go.Figure:
    """A column of `diagnostics.scaling_table` per layer (default s_max / s_min), one line per
    scale group; log axis for the scale columns (s_*), else when one layer dominates ('auto')."""
    _require(table, ("layer", "group", value), "scale_spread")
    _single_method(table, "scale_spread")
    fig = go.Figure([go.Scatter(x=d["layer"], y=d[value], mode="lines+markers", name=g,
                                hovertemplate=f"layer %{{x}} · {g}<br>{value} %{{y:.4g}}<extra></extra>")
                     for g, d in table.groupby("group", sort=False)])
    use_log = value.startswith("s_") or dominated(table[value]) if log == "auto" else _use_log(log, table[value])
    fig.update_layout(title=title or _title(f"Scale spread ({value}) per layer", table, meta, ("model", "method")),
                      xaxis_title="layer", yaxis_title=value, yaxis_type="log" if use_log else "linear")
    return fig


def spearman_heatmap(agreement, meta: Mapping | None = None, title: str | None = None) -> go.Figure:
    """Spearman ρ between importance metrics (`diagnostics.importance_agreement`): rows = layer,
    columns = 'group · pair', colour from −1 to 1."""
    _require(agreement, ("layer", "group", "pair", "spearman"), "spearman_heatmap")
    d = agreement.assign(col=agreement["group"] + " · " + agreement["pair"])
    order = list(dict.fromkeys(d["col"]))
    g = d.pivot(index="layer", columns="col", values="spearman").reindex(columns=order)
    fig = go.Figure(go.Heatmap(z=g.to_numpy(), x=order, y=list(g.index), zmin=-1, zmax=1, zmid=0,
                               colorscale="RdBu", colorbar=dict(title="ρ"), texttemplate="%{z:.2f}",
                               hovertemplate="layer %{y}<br>%{x}<br>ρ %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title_text="layer")
    fig.update_xaxes(title_text="scale group · metric pair")
    fig.update_layout(title=title or _title("Spearman ρ between importance metrics", agreement, meta, ("model",)),
                      height=max(300, 22 * len(g) + 200))
    return fig


def spearman_bars(agreement, layer: int, meta: Mapping | None = None, title: str | None = None) -> go.Figure:
    """One layer's Spearman ρ per scale group, one bar trace per metric pair."""
    d = agreement[agreement["layer"] == layer]
    if d.empty:
        raise AwqnbError(f"spearman_bars: layer {layer} is not in the frame.")
    fig = go.Figure([go.Bar(x=s["group"], y=s["spearman"], name=p) for p, s in d.groupby("pair", sort=False)])
    fig.update_layout(barmode="group", title=title or _title(f"Spearman ρ between importance metrics, layer {layer}",
                                                             d, meta, ("model",)),
                      yaxis=dict(range=[-1, 1], title="ρ"), xaxis_title="scale group")
    return fig


def claims_intervals(claims, meta: Mapping | None = None, title: str | None = None) -> go.Figure:
    """Perplexity claims of `diagnostics.seed_claims`: delta % of a against b with its 95%
    interval, one marker per (claim, dataset); left of 0 = a is better."""
    _require(claims, ("claim", "dataset", "value", "ci_low", "ci_high", "unit"), "claims_intervals")
    d = claims[(claims["unit"] == "delta %") & claims["value"].notna()]
    fig = go.Figure()
    for ds, s in d.groupby("dataset", sort=False):
        fig.add_trace(go.Scatter(
            x=s["value"], y=[f"{c} ({a} vs {b})" for c, a, b in zip(s["claim"], s["a"], s["b"])], mode="markers",
            name=str(ds), error_x=dict(type="data", symmetric=False, array=s["ci_high"] - s["value"],
                                       arrayminus=s["value"] - s["ci_low"]),
            hovertemplate="%{y}<br>Δ %{x:+.2f}%<extra>" + str(ds) + "</extra>"))
    fig.add_vline(x=0, line=dict(color="grey", dash="dot"))
    fig.update_layout(title=title or _title("Seed claims: delta % of perplexity (a vs b), 95% CI", claims, meta,
                                            ("model",)),
                      xaxis_title="delta % (negative: a is better)", height=max(300, 60 * d["claim"].nunique() + 150))
    return fig


def channel_error_scatter(frame, layer: int, module: str, meta: Mapping | None = None,
                          title: str | None = None) -> go.Figure:
    """Channel by channel (`diagnostics.channel_error`): input energy E[x_j²] (x) against the
    weight error Σ_i r_ij² of the column (y), one marker trace per method; the product is the
    channel's share of the output error (hover), so points far up and right hurt most."""
    d = frame[(frame["layer"] == layer) & (frame["module"] == module)]
    if d.empty:
        raise AwqnbError(f"channel_error_scatter: no rows for layer {layer}, module {module!r}.")
    fig = go.Figure()
    for m, s in d.groupby("method", sort=False):
        fig.add_trace(go.Scattergl(
            x=s["ex2"], y=s["sq_sum"], mode="markers", name=str(m), marker=dict(size=5, opacity=0.7),
            customdata=s[["channel", "err_share", "l2_rank"]].to_numpy(),
            hovertemplate=f"{m}<br>channel %{{customdata[0]}} (l2 rank %{{customdata[2]}})<br>E[x²] %{{x:.3g}}"
                          "<br>Σ r² %{y:.3g}<br>share of output error %{customdata[1]:.2%}<extra></extra>"))
    fig.update_layout(title=title or _title(f"Where the output error comes from: layer {layer}, {module}", d, meta,
                                            ("model", "bits", "group_size")),
                      xaxis_title="E[x_j²] (input energy)", yaxis_title="Σ_i r_ij² (weight error of column j)",
                      xaxis_type="log", yaxis_type="log")
    return fig


# --- sensitivity figures (awqnb.analysis.sensitivity frames, QuantResult.block_errors) ----------------

SENS_FAMILIES = ("qkv", "vo", "gate_up", "down")  # block order; vo is the o_proj family
SENS_LABELS = {"kl": "KL to FP (nats/token)", "dppl": "Δ perplexity", "ppl": "perplexity", "mse": "output MSE",
               "rel_err": "block output error vs FP"}
SENS_KEYS = ("model", "method", "bits", "group_size", "dataset", "seqlen", "n_windows")
STRATEGY_COLORS = {"sensitivity": "#d62728", "recovery": "#ff7f0e", "density": "#9467bd", "mse": "#1f77b4",
                   "random": "#7f7f7f"}


def _provenance(df, meta: Mapping | None = None) -> dict:
    """Title context from the frame's `attrs['provenance']` (model, method, bits, group_size; a
    MethodConfig dict under 'config' or 'quant' also gives them; the evaluation slice from 'eval'
    {seqlen, n_windows} or 'eval_dataset' / 'eval_seqlen'), then `meta` on top."""
    prov = dict((getattr(df, "attrs", None) or {}).get("provenance") or {})
    cfg = prov.get("config")
    if isinstance(cfg, Mapping):
        prov.setdefault("method", cfg.get("method"))
        prov.setdefault("quant", cfg.get("quant"))
    q = prov.get("quant")
    if isinstance(q, Mapping):
        prov.setdefault("bits", q.get("bits"))
        prov.setdefault("group_size", q.get("group_size"))
    ev = prov.get("eval")  # awqnb.analysis.sensitivity: {"seqlen", "n_windows", ...} of the evaluation slice
    if isinstance(ev, Mapping):
        for k in ("dataset", "seqlen", "n_windows"):
            prov.setdefault(k, ev.get(k))
    for k in ("dataset", "seqlen"):
        if prov.get(k) is None and prov.get(f"eval_{k}") is not None:
            prov[k] = prov[f"eval_{k}"]
    for k in ("model", "method", "dataset"):  # a nested value (e.g. a data-file record) is no title
        if k in prov and not isinstance(prov[k], (str, int, float)):
            prov.pop(k)
    return {**{k: v for k, v in prov.items() if v is not None}, **(meta or {})}


def _families(frame) -> list:
    present = list(dict.fromkeys(frame["family"]))
    return [f for f in SENS_FAMILIES if f in present] + [f for f in present if f not in SENS_FAMILIES]


def _attr(df, key):
    v = (getattr(df, "attrs", None) or {}).get(key)
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def sensitivity_heatmap(frame, mode: str = "only", value: str = "kl", log="auto", meta: Mapping | None = None,
                        title: str | None = None) -> go.Figure:
    """End-to-end sensitivity (`awqnb.analysis.sensitivity.sensitivity`) of every (layer, linear family):
    layers as rows, families (qkv, vo, gate_up, down) as columns, colour = `value` of the rows of
    `mode` ('only': just this part quantized, the rest FP; 'except': everything quantized but this
    part). A signed column (dppl) is centred on 0; log draws log10 of a positive column ('auto':
when one cell dominates, `dominated`; the cells' text and hover keep the raw values)."""
    _require(frame, ("layer", "family", "mode", value), "sensitivity_heatmap")
    d = frame[frame["mode"] == mode]
    if d.empty:
        raise AwqnbError(f"sensitivity_heatmap: no rows of mode {mode!r}; the frame has "
                         f"{sorted(frame['mode'].unique())}.")
    log = _use_log(log, d[value])
    fams = _families(d)
    grid = d.pivot_table(index="layer", columns="family", values=value, aggfunc="first").reindex(columns=fams)
    grid = grid.sort_index()
    raw = grid.to_numpy()
    z = [_log10(r) for r in raw] if log else raw
    signed = not log and bool((d[value] < 0).any())
    extra = [c for c in ("ppl", "dppl", "n_params") if c in d.columns and c != value]
    cols = [raw] + [d.pivot_table(index="layer", columns="family", values=c, aggfunc="first")
                    .reindex(index=grid.index, columns=fams).to_numpy() for c in extra]
    custom = [[[c[i][j] for c in cols] for j in range(len(fams))] for i in range(len(grid.index))]
    hover = f"layer %{{y}} · %{{x}}<br>{value} %{{customdata[0]:.4g}}" + "".join(
        f"<br>{c} %{{customdata[{k + 1}]:{',d' if c == 'n_params' else '.4g'}}}" for k, c in enumerate(extra))
    label = SENS_LABELS.get(value, value)
    fig = go.Figure(go.Heatmap(
        z=z, x=fams, y=list(grid.index), customdata=custom, zmid=0.0 if signed else None,
        colorscale="RdBu_r" if signed else "Reds", colorbar=dict(title=("log10 " if log else "") + value),
        text=raw, texttemplate="%{text:.3g}", hovertemplate=hover + "<extra></extra>"))
    what = {"only": "only this part quantized", "except": "everything quantized but this part"}.get(mode, mode)
    fig.update_layout(title=title or _title(f"Sensitivity: {label}, {what}", d, _provenance(frame, meta), SENS_KEYS),
                      xaxis_title="linear family", yaxis_title="layer", height=max(320, 20 * len(grid) + 170))
    fig.update_yaxes(autorange="reversed", dtick=1 if len(grid) <= 40 else None)
    return fig


def sensitivity_bars(frame, top: int = 15, by: str = "kl", meta: Mapping | None = None,
                     title: str | None = None, log="auto") -> go.Figure:
    """The `top` most sensitive (layer, family) parts ranked by `by` of the 'only' rows (most
    sensitive on top), beside the same parts in 'except' mode: how much of the fully quantized
    model's damage keeping just that part in FP takes back (`quant_kl − kl` for KL, from the
    frame's attrs; `dppl`, already a recovery there; else the raw column). log: each panel's
    value axis on a log scale ('auto': when its largest bar dominates, `dominated`)."""
    _require(frame, ("layer", "family", "mode", by), "sensitivity_bars")
    only = frame[frame["mode"] == "only"]
    if only.empty:
        raise AwqnbError("sensitivity_bars ranks the 'only' rows; this frame has none.")
    if top < 1:
        raise AwqnbError(f"sensitivity_bars: top={top} must be at least 1.")
    ranked = only.sort_values(by, ascending=False, kind="stable").head(top)
    labels = [f"L{l} {f}" for l, f in zip(ranked["layer"], ranked["family"])]
    exc = frame[frame["mode"] == "except"].set_index(["layer", "family"])
    label = SENS_LABELS.get(by, by)
    panels = 2 if not exc.empty else 1
    quant_kl = _attr(frame, "quant_kl")
    if by == "dppl":
        rec_title, rec = "recovery: full-quant ppl − ppl", lambda v: v
    elif by == "kl" and quant_kl is not None:
        rec_title, rec = "recovery: KL(all quantized) − KL", lambda v: quant_kl - v
    else:
        rec_title, rec = f"{by} (everything else quantized)", lambda v: v
    fig = make_subplots(rows=1, cols=panels, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=(f"only this part quantized: {label}",) + ((rec_title,) if panels == 2 else ()))
    fig.add_trace(go.Bar(y=labels, x=ranked[by], orientation="h", name="only", marker_color="#d62728",
                         hovertemplate="%{y}<br>" + by + " %{x:.4g}<extra>only</extra>"), row=1, col=1)
    if _use_log(log, ranked[by]):
        fig.update_xaxes(type="log", row=1, col=1)
    if panels == 2:
        vals = [rec(float(exc.loc[(l, f), by])) if (l, f) in exc.index else None
                for l, f in zip(ranked["layer"], ranked["family"])]
        fig.add_trace(go.Bar(y=labels, x=vals, orientation="h", name="except", marker_color="#2ca02c",
                             hovertemplate="%{y}<br>%{x:.4g}<extra>except</extra>"), row=1, col=2)
        if _use_log(log, vals):
            fig.update_xaxes(type="log", row=1, col=2)
    fig.update_yaxes(autorange="reversed", title_text="layer · family", col=1)
    fig.update_layout(title=title or _title(f"The {len(ranked)} most sensitive parts", frame,
                                            _provenance(frame, meta), SENS_KEYS),
                      showlegend=False, height=max(320, 24 * len(ranked) + 170))
    return fig


def pareto_plot(pareto_frame, fp_ppl: float | None = None, quant_ppl: float | None = None,
                meta: Mapping | None = None, title: str | None = None) -> go.Figure:
    """Mixed precision (`awqnb.analysis.plans.pareto`): perplexity against average weight bits, one
    line per strategy choosing which linears to keep at higher precision (each point labelled with
    k, the number kept); the FP and fully quantized perplexities (arguments, else the frame's
    attrs `fp_ppl` / `quant_ppl`) as dashed reference lines."""
    _require(pareto_frame, ("strategy", "k", "avg_bits", "ppl"), "pareto_plot")
    fig = go.Figure()
    for s, d in pareto_frame.groupby("strategy", sort=False):
        d = d.sort_values(["avg_bits", "k"])
        kl = d["kl"] if "kl" in d.columns else [float("nan")] * len(d)
        plan = d["plan"].astype(str) if "plan" in d.columns else [""] * len(d)
        fig.add_trace(go.Scatter(
            x=d["avg_bits"], y=d["ppl"], mode="lines+markers+text", name=str(s), text=[f"k={k}" for k in d["k"]],
            textposition="top center", line=dict(color=STRATEGY_COLORS.get(str(s))),
            customdata=list(zip(d["k"], kl, plan)),
            hovertemplate=f"{s}<br>k %{{customdata[0]}}<br>avg bits %{{x:.4f}}<br>ppl %{{y:.4f}}"
                          "<br>KL %{customdata[1]:.4g}<br>%{customdata[2]}<extra></extra>"))
    fp_ppl = fp_ppl if fp_ppl is not None else _attr(pareto_frame, "fp_ppl")
    quant_ppl = quant_ppl if quant_ppl is not None else _attr(pareto_frame, "quant_ppl")
    for v, name, color in ((fp_ppl, "FP", "#2ca02c"), (quant_ppl, "fully quantized", "#7f7f7f")):
        if v is not None:
            fig.add_hline(y=v, line=dict(color=color, dash="dash", width=1), annotation_text=f"{name} {v:.3f}",
                          annotation_position="top left", name=name)
    fig.update_layout(title=title or _title("Mixed precision: perplexity vs average bits", pareto_frame,
                                            _provenance(pareto_frame, meta), SENS_KEYS),
                      xaxis_title="average weight bits", yaxis_title="perplexity", legend_title="linears kept by")
    return fig


def _block_error_frame(obj):
    """(frame with label, layer, rel_err; meta) from a QuantResult, a QuantResult metadata dict, a
    {label: either} mapping, or a frame (layer, rel_err, optional method/label)."""
    import pandas as pd

    def one(label, r):
        if hasattr(r, "block_errors"):
            q = r.config.quant
            m = {"model": r.model_name, "method": r.method, "bits": q.bits, "group_size": q.group_size}
            return r.block_errors().assign(label=label or r.method), m
        if isinstance(r, Mapping) and isinstance(r.get("layers"), list):  # QuantResult.metadata()
            q = (r.get("config") or {}).get("quant") or {}
            m = {"model": r.get("model"), "method": r.get("method"), "bits": q.get("bits"),
                 "group_size": q.get("group_size")}
            rows = [{"layer": L["index"], "rel_err": (L.get("evidence") or {}).get("block_rel_err", float("nan"))}
                    for L in r["layers"]]
            return pd.DataFrame(rows, columns=["layer", "rel_err"]).assign(label=label or r.get("method")), m
        raise AwqnbError(f"block_error_profile takes a QuantResult, its metadata(), a mapping of label to those, "
                         f"or a frame with layer and rel_err; not {type(r).__name__}.")

    if hasattr(obj, "columns"):
        _require(obj, ("layer", "rel_err"), "block_error_profile")
        lab = "label" if "label" in obj.columns else "method" if "method" in obj.columns else None
        d = obj.assign(label=obj[lab].astype(str) if lab else "")
        return d, {}
    if isinstance(obj, Mapping) and not isinstance(obj.get("layers"), list):
        parts = [one(str(k), v) for k, v in obj.items()]
        if not parts:
            raise AwqnbError("block_error_profile: nothing to draw (an empty mapping).")
        metas = [m for _, m in parts]
        common = {k: v for k, v in metas[0].items() if all(m.get(k) == v for m in metas)}
        if len(parts) > 1:
            common.pop("method", None)
        return pd.concat([f for f, _ in parts], ignore_index=True), common
    return one(None, obj)


def block_error_profile(result_or_frame, log: bool = True, meta: Mapping | None = None,
                        title: str | None = None) -> go.Figure:
    """Where the error enters while quantizing: each block's output error relative to the FP
    block on the same inputs (`block_rel_err`, recorded by `pipeline.quantize` with
    layer_batch_size 1), one line per method. Takes a QuantResult, its `metadata()`, a mapping
    {label: QuantResult or metadata}, or a frame (layer, rel_err, optional method/label column)."""
    d, m = _block_error_frame(result_or_frame)
    d = d.dropna(subset=["rel_err"])
    if d.empty:
        raise AwqnbError("block_error_profile: no block_rel_err recorded (it is measured only with "
                         "layer_batch_size 1, and only by runs since it was added).")
    fig = go.Figure()
    for lab, s in d.groupby("label", sort=False):
        s = s.sort_values("layer")
        fig.add_trace(go.Scatter(x=s["layer"], y=s["rel_err"], mode="lines+markers", name=str(lab) or "rel_err",
                                 hovertemplate=f"{lab}<br>block %{{x}}<br>rel err %{{y:.4g}}<extra></extra>"))
    fig.update_layout(title=title or _title("Where the error enters: block output error vs FP", d, {**m, **(meta or {})},
                                            ("model", "method", "bits", "group_size")),
                      xaxis_title="decoder block", yaxis_title="Σ‖B_q(x) − B(x)‖² / Σ‖B(x)‖²",
                      yaxis_type="log" if log else "linear", legend_title="method", showlegend=d["label"].nunique() > 1)
    return fig
