"""Figures from small hand-made frames: the expected traces, values and titles."""
import math

import numpy as np
import pandas as pd
import pytest

from awqnb.workbench import plots
from awqnb.core.errors import AwqnbError

ALPHAS = [0.0, 0.5, 1.0]


def _curves(layers=(0, 1), groups=("qkv", "down"), **const):
    rows = []
    for layer in layers:
        for gi, g in enumerate(groups):
            losses = [1.0, 0.6 - 0.1 * layer - 0.05 * gi, 0.9]
            best = ALPHAS[int(np.argmin(losses))]
            for a, loss in zip(ALPHAS, losses):
                rows.append({"layer": layer, "group": g, "alpha": a, "loss": loss * 1e-3, "best_alpha": best,
                             "loss_rel_rtn": loss / losses[0], **const})
    return pd.DataFrame(rows)


def _table():
    return pd.DataFrame([
        {"method": "fp", "dataset": "wikitext2", "protocol": "gptq-token", "seqlen": 2048, "ppl": 20.0,
         "delta_pct": 0.0, "ci_low": 0.0, "ci_high": 0.0, "verdict": "(baseline)", "model": "m", "bits": np.nan,
         "group_size": np.nan},
        {"method": "rtn", "dataset": "wikitext2", "protocol": "gptq-token", "seqlen": 2048, "ppl": 25.0,
         "delta_pct": 25.0, "ci_low": 20.0, "ci_high": 30.0, "verdict": "worse", "model": "m", "bits": 4,
         "group_size": 128},
        {"method": "awq", "dataset": "wikitext2", "protocol": "gptq-token", "seqlen": 2048, "ppl": 22.0,
         "delta_pct": 10.0, "ci_low": 8.0, "ci_high": 12.0, "verdict": "cannot separate seeds", "model": "m", "bits": 4,
         "group_size": 128},
    ])


def test_perplexity_bar_one_trace_per_dataset():
    fig = plots.perplexity_bar(_table())
    assert len(fig.data) == 1
    bar = fig.data[0]
    assert bar.type == "bar"
    assert list(bar.x) == ["fp", "rtn", "awq"]
    assert list(bar.y) == [20.0, 25.0, 22.0]
    assert "+10.0%" in bar.text[2] and "%" not in bar.text[0]
    title = fig.layout.title.text
    for part in ("m", "W4", "g128", "gptq-token", "seqlen 2048"):
        assert part in title
    two = pd.concat([_table(), _table().assign(dataset="c4")])
    assert [t.name.split(" ")[0] for t in plots.perplexity_bar(two).data] == ["wikitext2", "c4"]


def test_alpha_curves_facets_one_line_per_layer_and_a_star_trace_per_group():
    df = _curves(model="tiny", method="awq", bits=4, group_size=128)
    fig = plots.alpha_curves(df)
    assert len(fig.data) == 2 * (2 + 1) + 1  # + the layer colour bar
    lines = [t for t in fig.data if t.mode == "lines"]
    stars = [t for t in fig.data if t.mode == "markers" and t.name.startswith("α*")]
    assert len(lines) == 4 and len(stars) == 2
    assert [t.name for t in lines] == ["layer 0", "layer 1", "layer 0", "layer 1"]
    np.testing.assert_allclose(lines[0].y, [1.0, 0.6, 0.9])  # normalised by the α=0 (RTN) loss
    np.testing.assert_allclose(stars[0].x, [0.5, 0.5])  # α* of each layer
    np.testing.assert_allclose(stars[0].y, [0.6, 0.5])
    assert [a.text for a in fig.layout.annotations][:2] == ["qkv", "down"]  # one panel per group
    for part in ("tiny", "awq", "W4", "g128"):
        assert part in fig.layout.title.text
    # layer colours are the same in every panel
    assert lines[0].line.color == lines[2].line.color != lines[1].line.color


def test_alpha_curves_group_filter_and_dropdown():
    df = _curves()
    fig = plots.alpha_curves(df, groups=["down"], meta={"model": "m", "method": "awq", "bits": 4, "group_size": -1})
    assert len(fig.data) == 3 + 1
    assert "per-channel" in fig.layout.title.text
    dd = plots.alpha_curves(df, mode="dropdown")
    assert len(dd.data) == 7
    buttons = dd.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["qkv", "down"]
    assert buttons[1].args[0]["visible"] == [False] * 3 + [True] * 3 + [True]  # the colour bar stays
    assert [t.visible for t in dd.data] == [True] * 3 + [False] * 3 + [None]
    assert dd.layout.yaxis.type == "log"


def test_alpha_map_layer_by_group():
    fig = plots.alpha_map(_curves(layers=(0, 1, 2)))
    assert len(fig.data) == 1 and fig.data[0].type == "heatmap"
    hm = fig.data[0]
    assert list(hm.x) == ["qkv", "down"] and list(hm.y) == [0, 1, 2]
    assert np.asarray(hm.z).shape == (3, 2)
    np.testing.assert_allclose(np.asarray(hm.z, dtype=float), 0.5)


def test_bad_frames_are_clear_errors():
    with pytest.raises(AwqnbError, match="lacks"):
        plots.alpha_curves(_curves().drop(columns=["loss_rel_rtn"]))
    with pytest.raises(AwqnbError, match="empty"):
        plots.alpha_map(_curves().iloc[:0])
    two = pd.concat([_curves(method="awq"), _curves(method="praq")])
    with pytest.raises(AwqnbError, match="one method"):
        plots.alpha_curves(two)
    with pytest.raises(AwqnbError, match="not in the curves"):
        plots.alpha_curves(_curves(), groups=["vo"])


ALPHAS_FINE = [round(0.1 * i, 1) for i in range(11)]
JAGGED = [1.0, 2.3, 3.7, 0.5, 0.85, 1.2, 2.1, 0.47, 0.5, 0.73, 1.4]  # the α probe's gate_up curve, 11 α


def _real_curves():
    """10 layers × 2 groups of smooth U-shaped curves; gate_up layer 7 climbs to 75× RTN (smooth),
    gate_up layer 3 is jagged."""
    rows = []
    for layer in range(10):
        for g in ("qkv", "gate_up"):
            rel = [1.0 - 0.8 * a + 0.6 * a * a for a in ALPHAS_FINE]
            if g == "gate_up" and layer == 7:
                rel = [1.0 + 74.0 * a ** 3 for a in ALPHAS_FINE]
            if g == "gate_up" and layer == 3:
                rel = JAGGED
            best = ALPHAS_FINE[int(np.argmin(rel))]
            rows += [{"layer": layer, "group": g, "alpha": a, "loss": 3.0 * r, "best_alpha": best,
                      "loss_rel_rtn": r} for a, r in zip(ALPHAS_FINE, rel)]
    return pd.DataFrame(rows)


def test_alpha_curves_log_relative_axis_colour_bar_no_layer_legend():
    df = _real_curves()
    fig = plots.alpha_curves(df)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert "RTN" in fig.layout.yaxis.title.text and "log" in fig.layout.yaxis.title.text
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == 20
    line7 = next(t for t in lines if t.name == "layer 7" and "gate_up" in t.hovertemplate)
    assert max(line7.y) == pytest.approx(75.0)  # y is loss / RTN loss
    for part in ("layer 7", "gate_up", "α", "loss/RTN", "loss %{customdata"):
        assert part in line7.hovertemplate
    assert sum(t.showlegend is not False for t in fig.data) <= 1  # no 10-entry legend
    bars = [t for t in fig.data if t.marker is not None and t.marker.showscale]
    assert len(bars) == 1
    assert bars[0].marker.colorbar.title.text == "layer"
    assert (bars[0].marker.cmin, bars[0].marker.cmax) == (0, 9)
    # colours follow the colour bar: layer 0 and layer 9 are its ends
    assert lines[0].line.color == plots.sample_colorscale(plots.LAYER_SCALE, [0.0])[0]
    assert plots.alpha_curves(df, log=False).layout.yaxis.type == "linear"


def test_alpha_curves_caption_names_the_jagged_layer_only():
    fig = plots.alpha_curves(_real_curves())
    caps = [a for a in fig.layout.annotations if a.name == "jagged_caption"]
    assert len(caps) == 1
    text = caps[0].text.replace("<br>", " ")
    assert "layer 3 (gate_up)" in text
    assert "layer 7" not in text and "qkv" not in text  # steep but smooth; smooth
    assert "bench/README.md" in text and "alpha_probe.py" in text
    assert caps[0].y == 0 and caps[0].yanchor == "top"  # under the plot
    smooth = _real_curves().query("not (layer == 3 and group == 'gate_up')")
    assert not [a for a in plots.alpha_curves(smooth).layout.annotations if a.name == "jagged_caption"]
    assert not [a for a in plots.alpha_curves(_real_curves(), caption=False).layout.annotations
                if a.name == "jagged_caption"]


def test_curve_jaggedness_counts_reversals_beyond_the_tolerance():
    from awqnb.analysis import scales

    j = scales.curve_jaggedness(_real_curves())
    assert list(j.columns) == ["group", "layer", "n_alpha", "n_reversals", "max_step", "jagged"]
    assert list(j["group"].unique()) == ["qkv", "gate_up"] and len(j) == 20
    row = j[(j.group == "gate_up") & (j.layer == 3)].iloc[0]
    assert bool(row.jagged) and row.n_reversals == 4 and row.max_step == pytest.approx(3.7 / 0.5)
    assert j[~((j.group == "gate_up") & (j.layer == 3))]["n_reversals"].max() <= 1
    assert not j[j.layer == 7]["jagged"].any()
    # a wiggle under the tolerance is no reversal
    wig = pd.DataFrame({"group": "g", "layer": 0, "alpha": ALPHAS_FINE,
                        "loss_rel_rtn": [1.0, 0.9, 0.8, 0.81, 0.8, 0.81, 0.8, 0.9, 1.0, 1.1, 1.2]})
    assert int(scales.curve_jaggedness(wig)["n_reversals"].iloc[0]) == 1
    assert int(scales.curve_jaggedness(wig, tol=0.001)["n_reversals"].iloc[0]) > 1
    with pytest.raises(AwqnbError, match="lacks"):
        scales.curve_jaggedness(wig.drop(columns="loss_rel_rtn"))


def test_every_heatmap_says_what_its_x_axis_is():
    mse = pd.DataFrame([{"method": m, "layer": l, "module": mod, "rel_mse": 1e-3 * (l + 1)}
                        for m in ("rtn", "awq", "gptq") for l in (0, 1) for mod in ("q_proj", "down_proj")])
    agree = pd.DataFrame({"layer": [0, 0, 1, 1], "group": "down", "pair": ["l1~l2", "l1~praq"] * 2,
                          "spearman": [0.9, 0.2, 0.8, -0.1]})
    summ = pd.DataFrame({"layer": [0, 1], "group": "qkv", "metric": "l2", "max_over_median": [10.0, 100.0]})
    sens = pd.DataFrame({"layer": [0, 0], "family": ["qkv", "down"], "mode": "only", "kl": [0.1, 0.2]})
    figs = {"mse_heatmap": plots.mse_heatmap(mse), "spearman_heatmap": plots.spearman_heatmap(agree),
            "alpha_map": plots.alpha_map(_curves()), "salience_overview": plots.salience_overview(summ),
            "sensitivity_heatmap": plots.sensitivity_heatmap(sens)}
    for name, fig in figs.items():
        axes = [k for k in fig.layout.to_plotly_json() if k.startswith("xaxis")]
        assert axes, name
        for k in axes:  # every panel's x axis, the lower-right one of a 3-method facet too
            assert fig.layout[k].title.text, f"{name}: {k} has no title"
    assert plots.mse_heatmap(mse).layout.xaxis.title.text == "linear module"
    assert plots.spearman_heatmap(agree).layout.xaxis.title.text == "scale group · metric pair"


@pytest.mark.parametrize("n_max, dtick", [(2, 1), (0, 1), (250, None)])
def test_risk_chart_counts_have_integer_ticks(n_max, dtick):
    risk = pd.DataFrame({"layer": [0, 1], "n_dead": [n_max, n_max // 2], "n_dead_risky": [n_max // 2, 0],
                         "n_critical": [0, 0]})
    y = plots.risk_overview(risk).layout.yaxis
    assert y.title.text == "channels"
    assert y.tickformat == "d" and y.rangemode == "tozero" and y.dtick == dtick  # no 0, 0.2, 0.4 …


# --- an 8B-shaped report: 32 layers × 7 linears ---------------------------------------------------

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS32 = ("qkv", "o", "gate_up", "down")


def _legend_entries(fig) -> int:
    """Entries the legend shows: traces not hidden from it (heatmaps have a colour bar instead),
    one per legend group."""
    if fig.layout.showlegend is False:
        return 0
    return len({t.legendgroup or t.name for t in fig.data if t.type != "heatmap" and t.showlegend is not False})


def _frames32(loud_layer=1, loud=300.0):
    """Synthetic frames of a 32-layer, 7-linear model in every figure's schema; `loud_layer` is
    `loud` times the others (as layer 1's down_proj of a Llama-3-8B is), or no layer is when loud=1."""
    rng = np.random.default_rng(0)
    f = lambda l: (loud if l == loud_layer else 1.0) * (1 + 0.2 * rng.random())  # noqa: E731
    methods = ("rtn", "awq", "awq_gptq")
    mse = pd.DataFrame([{"method": m, "layer": l, "module": mod, "rel_mse": 1e-3 * f(l)}
                        for m in methods for l in range(32) for mod in LINEARS])
    q = lambda v: {f"abs_q{k:02d}": v * s for k, s in ((5, 0.1), (25, 0.5), (50, 1.0), (75, 1.5), (95, 3.0))}  # noqa: E731
    rounding = pd.DataFrame([{"layer": l, "module": mod, "method": m, **q(1e-3 * f(l)),
                              "e_before_mean": 1e-2 * f(l), "e_after_mean": 5e-3 * f(l)}
                             for m in methods for l in range(32) for mod in LINEARS])
    curves = _curves(layers=range(32), groups=GROUPS32, model="8b", method="awq", bits=4, group_size=128)
    sens = pd.DataFrame([{"layer": l, "family": fam, "mode": mode, "kl": 1e-3 * f(l), "ppl": 10.0, "dppl": 0.1,
                          "n_params": 1000} for l in range(32) for fam in plots.SENS_FAMILIES for mode in ("only", "except")])
    sens.attrs.update(quant_kl=0.0)  # recovery = −KL: a signed panel stays linear
    risk = pd.DataFrame({"layer": range(32), "n_dead": [int(10 * f(l)) for l in range(32)],
                         "n_dead_risky": [5] * 32, "n_critical": [1] * 32})
    blocks = pd.DataFrame([{"layer": l, "rel_err": 1e-3 * f(l), "method": m} for m in methods for l in range(32)])
    summ = pd.DataFrame([{"layer": l, "group": g, "metric": "l2", "max_over_median": 10 * f(l)}
                         for l in range(32) for g in GROUPS32])
    agree = pd.DataFrame([{"layer": l, "group": g, "pair": p, "spearman": 0.5} for l in range(32) for g in GROUPS32
                          for p in ("l1~l2", "l1~praq", "l2~praq")])
    scaling = pd.DataFrame([{"layer": l, "group": g, "s_ratio": 10 * f(l), "alpha": 0.5} for l in range(32)
                            for g in GROUPS32])
    return dict(mse=mse, rounding=rounding, curves=curves, sens=sens, risk=risk, blocks=blocks, summ=summ,
                agree=agree, scaling=scaling)


def test_figures_stay_readable_at_32_layers_by_7_linears():
    d = _frames32()
    figs = {
        "mse_heatmap": plots.mse_heatmap(d["mse"]),
        "rounding_error_dist": plots.rounding_error_dist(d["rounding"]),
        "flip_errors": plots.flip_errors(d["rounding"][d["rounding"]["method"] == "awq"]),
        "alpha_curves": plots.alpha_curves(d["curves"]),
        "alpha_curves_dropdown": plots.alpha_curves(d["curves"], mode="dropdown"),
        "alpha_map": plots.alpha_map(d["curves"]),
        "sensitivity_heatmap": plots.sensitivity_heatmap(d["sens"]),
        "sensitivity_bars": plots.sensitivity_bars(d["sens"]),
        "risk_overview": plots.risk_overview(d["risk"]),
        "block_error_profile": plots.block_error_profile(d["blocks"]),
        "salience_overview": plots.salience_overview(d["summ"]),
        "spearman_heatmap": plots.spearman_heatmap(d["agree"]),
        "scale_spread": plots.scale_spread(d["scaling"]),
        "mse_layer_bars": plots.mse_layer_bars(d["mse"], 5),
    }
    for name, fig in figs.items():
        assert _legend_entries(fig) <= 10, f"{name}: {_legend_entries(fig)} legend entries"
    # one box trace per method, each box named by its layer and linear
    rb = figs["rounding_error_dist"]
    assert [t.name for t in rb.data] == ["rtn", "awq", "awq_gptq"]
    assert len(rb.data[0].x) == 32 * 7 and rb.data[0].x[7] == "L1 q_proj" and rb.data[0].x[-1] == "L31 down_proj"
    # 32 per-layer lines, no legend: a layer colour bar, and the hover names layer and group
    ac = figs["alpha_curves"]
    lines = [t for t in ac.data if t.mode == "lines"]
    assert len(lines) == 32 * 4 and all(t.showlegend is False for t in lines)
    assert "layer 31 · down" in lines[-1].hovertemplate
    assert any(getattr(t.marker, "showscale", False) for t in ac.data)
    assert "layer %{y} · %{x}" in figs["sensitivity_heatmap"].data[0].hovertemplate


def test_log_axis_when_one_layer_dominates():
    loud, calm = _frames32(loud=300.0), _frames32(loud=1.0)
    # the heatmap's colour: log10 of KL when layer 1 is 300× the rest; the text keeps the raw value
    hm = plots.sensitivity_heatmap(loud["sens"]).data[0]
    assert hm.colorbar.title.text == "log10 kl"
    assert hm.z[1][0] == pytest.approx(math.log10(hm.text[1][0]))
    assert plots.sensitivity_heatmap(calm["sens"]).data[0].colorbar.title.text == "kl"
    assert plots.sensitivity_heatmap(loud["sens"], log=False).data[0].colorbar.title.text == "kl"
    # the ranked bars: the 'only' panel's axis is log; the signed recovery panel stays linear
    bars = plots.sensitivity_bars(loud["sens"])
    assert bars.layout.xaxis.type == "log" and bars.layout.xaxis2.type != "log"
    assert plots.sensitivity_bars(calm["sens"]).layout.xaxis.type != "log"
    assert plots.risk_overview(loud["risk"]).layout.yaxis.type == "log"
    assert plots.risk_overview(calm["risk"]).layout.yaxis.type != "log"
    table = _table()
    assert plots.perplexity_bar(table).layout.yaxis.type == "linear"
    table.loc[1, "ppl"] = 25_000.0  # one method blew up
    assert plots.perplexity_bar(table).layout.yaxis.type == "log"
    assert plots.scale_spread(loud["scaling"].rename(columns={"s_ratio": "spread"}), value="spread").layout.yaxis.type == "log"
    assert plots.scale_spread(calm["scaling"].rename(columns={"s_ratio": "spread"}), value="spread").layout.yaxis.type == "linear"


def test_the_dominance_rule():
    assert plots.dominated([1, 1, 1, 21]) and not plots.dominated([1, 1, 1, 19])
    assert not plots.dominated([-1, 1, 100])  # a signed axis stays linear
    assert not plots.dominated([0, 0, 0, 5])  # one positive value: nothing to compare with
    assert plots.dominated([0, 1, 1, 1, 50, float("nan")])
    with pytest.raises(AwqnbError, match="log="):
        plots.sensitivity_heatmap(_frames32()["sens"], log="yes")
