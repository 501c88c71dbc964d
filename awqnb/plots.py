"""Plotly figures from the library's tidy DataFrames. Nothing here computes a result: each
function selects, reshapes and draws columns that are already there.

- `perplexity_bar(table)`: `awqnb.evaluate.comparison_table` output (method, dataset, protocol,
  seqlen, ppl, delta_pct, ci_low, ci_high, winner; model/bits/group_size when known).
- `alpha_curves(curves)`, `alpha_map(curves)`: `QuantResult.curves()` output (layer, group, alpha,
  loss, best_alpha, loss_rel_rtn), one method at a time; optional constant columns model, method,
  bits, group_size name the run in the title.

Titles name what the figure is about: model, method, bits and group size (and the evaluation
protocol for perplexity), taken from the frame's columns (when they hold one value) or `meta`.

`offline_notebook()` makes figures in a notebook render as HTML with plotly.js embedded once,
so an executed notebook or its nbconvert HTML shows them without network access.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from .errors import AwqnbError

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
    layers = sorted(layers)
    if len(layers) == 1:
        return {layers[0]: sample_colorscale(LAYER_SCALE, [0.0])[0]}
    pos = [i / (len(layers) - 1) for i in range(len(layers))]
    return dict(zip(layers, sample_colorscale(LAYER_SCALE, pos)))


# --- figures ------------------------------------------------------------------------------

def perplexity_bar(table, meta: Mapping | None = None, title: str | None = None) -> go.Figure:
    """Perplexity per method, one bar trace per evaluation set; each bar labelled with its
    delta % against the baseline and the bootstrap 95% interval (hover)."""
    _require(table, TABLE_COLUMNS, "perplexity_bar")
    fig = go.Figure()
    has_ci = {"delta_pct", "ci_low", "ci_high"} <= set(table.columns)
    for ds, sub in table.groupby("dataset", sort=False):
        text, hover = [], []
        for _, r in sub.iterrows():
            label = f"{r['ppl']:.2f}"
            extra = ""
            if has_ci and r.get("winner") != "(baseline)":
                label += f" ({r['delta_pct']:+.1f}%)"
                extra = f"<br>Δ {r['delta_pct']:+.2f}% [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
            if "winner" in sub.columns and r["winner"]:
                extra += f"<br>winner: {r['winner']}"
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
    )
    return fig


def alpha_curves(curves, groups: Iterable[str] | None = None, meta: Mapping | None = None,
                 mode: str = "facet", cols: int = 2, title: str | None = None) -> go.Figure:
    """α → search loss per layer, one line per layer, normalised by the layer's RTN loss (α=0)
    so layers are comparable (1 = plain RTN); a star marks each layer's chosen α*.

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
    colors = _layer_colors(curves["layer"].unique())
    name = _title("α search: loss / RTN loss per layer", curves, meta, ("model", "method", "bits", "group_size"))

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
                legendgroup=f"layer {layer}", showlegend=(gi == 0 or mode == "dropdown"),
                line=dict(color=colors[layer], width=1.5), visible=visible,
                hovertemplate=f"{g} · layer {layer}<br>α %{{x:.2f}}<br>loss/RTN %{{y:.4f}}<extra></extra>",
            ), **where[g])
        best = sub[(sub["alpha"] - sub["best_alpha"]).abs() < 1e-9].drop_duplicates("layer")
        fig.add_trace(go.Scatter(
            x=best["alpha"], y=best["loss_rel_rtn"], mode="markers", name=f"α* ({g})",
            marker=dict(symbol="star", size=11, color=[colors[v] for v in best["layer"]],
                        line=dict(color="black", width=1)),
            customdata=best["layer"], showlegend=False, visible=visible,
            hovertemplate=f"{g} · layer %{{customdata}}<br>α* %{{x:.2f}}<br>loss/RTN %{{y:.4f}}<extra></extra>",
        ), **where[g])
        spans[g] = range(start, len(fig.data))

    if mode == "facet":
        fig.add_hline(y=1.0, line=dict(color="grey", dash="dot", width=1), row="all", col="all")
        fig.update_xaxes(title_text="α", row=nrows)
        fig.update_yaxes(title_text="loss / RTN loss", col=1)
        fig.update_layout(height=max(350, 300 * nrows))
    else:
        fig.add_hline(y=1.0, line=dict(color="grey", dash="dot", width=1))
        buttons = []
        for g in groups:
            vis = [i in spans[g] for i in range(len(fig.data))]
            buttons.append(dict(label=g, method="update",
                                args=[{"visible": vis}, {"title.text": f"{name} — {g}"}]))
        fig.update_layout(updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right",
                                            y=1.15, yanchor="top")],
                          xaxis_title="α", yaxis_title="loss / RTN loss")
        name = f"{name} — {groups[0]}"
    fig.update_layout(title=title or name, legend_title="layer")
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
