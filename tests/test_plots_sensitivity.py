"""The sensitivity figures draw the columns they are given: traces, axes, values and titles from
small hand-made frames in the schema of `awqnb.analysis.sensitivity` (no model)."""
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from awqnb.workbench import plots
from awqnb.core.errors import AwqnbError

FAMILIES = ["qkv", "vo", "gate_up", "down"]
PROV = {"model": "tiny", "method": "awq", "bits": 4, "group_size": 64, "dataset": "wikitext2", "seqlen": 64,
        "n_windows": 2}


def _kl(layer, fi):
    return 0.001 * (layer + 1) * (fi + 1)  # grows with depth and family index: L2 down is the worst


def _sens(layers=(0, 1, 2), shuffle=True):
    rows = []
    quant_kl, quant_ppl, fp_ppl = 0.5, 30.0, 20.0
    for layer in layers:
        for fi, f in enumerate(FAMILIES):
            k = _kl(layer, fi)
            rows.append({"layer": layer, "family": f, "mode": "only", "kl": k, "ppl": fp_ppl + 100 * k,
                         "dppl": 100 * k, "n_params": 1000 * (fi + 1), "mse": k / 10})
            rows.append({"layer": layer, "family": f, "mode": "except", "kl": quant_kl - 2 * k,
                         "ppl": quant_ppl - 200 * k, "dppl": 200 * k, "n_params": 1000 * (fi + 1), "mse": k / 10})
    df = pd.DataFrame(rows)
    if shuffle:  # the figures order by layer and family themselves
        df = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    df.attrs.update(provenance=dict(PROV), fp_ppl=fp_ppl, quant_ppl=quant_ppl, quant_kl=quant_kl)
    return df


def test_heatmap_layers_by_family_with_values_and_provenance():
    fig = plots.sensitivity_heatmap(_sens())
    assert len(fig.data) == 1 and fig.data[0].type == "heatmap"
    hm = fig.data[0]
    assert list(hm.x) == FAMILIES and list(hm.y) == [0, 1, 2]
    for i in range(3):
        for j in range(4):
            assert hm.z[i][j] == pytest.approx(_kl(i, j))
            assert hm.customdata[i][j][0] == pytest.approx(_kl(i, j))
    # the other columns in the hover: ppl, dppl, n_params of the same cell
    assert hm.customdata[2][3][1:] == pytest.approx([20.0 + 100 * _kl(2, 3), 100 * _kl(2, 3), 4000])
    assert hm.zmid is None and hm.colorscale[0][1] != hm.colorscale[-1][1]
    t = fig.layout.title.text
    assert t.startswith("Sensitivity: KL to FP (nats/token), only this part quantized")
    for part in ("tiny", "awq", "W4", "g64", "wikitext2", "seqlen 64", "2 windows"):
        assert part in t
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.xaxis.title.text == "linear family"


def test_heatmap_except_mode_signed_and_log_values():
    df = _sens()
    exc = plots.sensitivity_heatmap(df, mode="except", value="kl")
    assert exc.data[0].z[1][2] == pytest.approx(0.5 - 2 * _kl(1, 2))
    assert "everything quantized but this part" in exc.layout.title.text
    lg = plots.sensitivity_heatmap(df, value="kl", log=True)
    assert lg.data[0].z[0][0] == pytest.approx(math.log10(_kl(0, 0)))
    assert lg.data[0].colorbar.title.text == "log10 kl"
    signed = df.copy()
    signed.loc[(signed["mode"] == "only") & (signed["layer"] == 0) & (signed["family"] == "qkv"), "dppl"] = -0.3
    s = plots.sensitivity_heatmap(signed, value="dppl")
    assert s.data[0].zmid == 0.0 and s.data[0].z[0][0] == pytest.approx(-0.3)  # a ppl drop is drawn below 0
    assert "Δ perplexity" in s.layout.title.text
    with pytest.raises(AwqnbError, match="no rows of mode 'both'"):
        plots.sensitivity_heatmap(df, mode="both")
    with pytest.raises(AwqnbError, match="lacks"):
        plots.sensitivity_heatmap(df.drop(columns="kl"))


def test_heatmap_title_from_a_method_config_in_the_provenance():
    df = _sens()
    df.attrs["provenance"] = {"model": "smollm2-135m", "config": {"method": "rtn", "quant": {"bits": 3, "group_size": -1}},
                              "eval_dataset": "c4", "eval_seqlen": 512}
    t = plots.sensitivity_heatmap(df).layout.title.text
    assert all(p in t for p in ("smollm2-135m", "rtn", "W3", "per-channel", "c4", "seqlen 512"))
    assert plots.sensitivity_heatmap(df, meta={"model": "other"}).layout.title.text.count("other") == 1


def test_titles_from_the_provenance_awqnb_sensitivity_writes():
    df = _sens()
    df.attrs["provenance"] = {"model": "smollm2-135m", "method": "awq", "bits": 4, "group_size": 128,
                              "calibration": {"dataset": "wikitext2", "n_calib": 16},
                              "eval": {"seqlen": 256, "n_windows": 4, "n_positions": 1020}}
    t = plots.sensitivity_bars(df).layout.title.text
    assert t == "The 12 most sensitive parts — smollm2-135m · awq · W4 · g128 · seqlen 256 · 4 windows"
    t = plots.sensitivity_heatmap(df, meta={"dataset": "wikitext2"}).layout.title.text
    assert t.endswith("smollm2-135m · awq · W4 · g128 · wikitext2 · seqlen 256 · 4 windows")


def test_bars_rank_only_and_show_the_recovery_beside():
    fig = plots.sensitivity_bars(_sens(), top=5)
    assert [t.type for t in fig.data] == ["bar", "bar"] and [t.orientation for t in fig.data] == ["h", "h"]
    only, exc = fig.data
    expect = sorted(((_kl(l, fi), l, f) for l in range(3) for fi, f in enumerate(FAMILIES)), reverse=True)[:5]
    assert list(only.y) == [f"L{l} {f}" for _, l, f in expect]
    assert list(only.x) == pytest.approx([k for k, _, _ in expect])
    assert list(exc.y) == list(only.y)
    # 'except' KL is quant_kl − 2·kl, so the recovery quant_kl − kl is 2·kl
    assert list(exc.x) == pytest.approx([2 * k for k, _, _ in expect])
    assert only.xaxis == "x" and exc.xaxis == "x2"  # side by side
    assert fig.layout.yaxis.autorange == "reversed"  # the most sensitive on top
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["only this part quantized: KL to FP (nats/token)", "recovery: KL(all quantized) − KL"]
    assert fig.layout.title.text.startswith("The 5 most sensitive parts — tiny · awq · W4 · g64")


def test_bars_by_dppl_without_except_rows_and_more_top_than_rows():
    df = _sens(layers=(0, 1))
    d = plots.sensitivity_bars(df, top=3, by="dppl")
    assert list(d.data[1].x) == pytest.approx(list(
        df[df["mode"] == "except"].set_index(["layer", "family"]).loc[[(1, "down"), (1, "gate_up"), (0, "down")], "dppl"]))
    assert d.layout.annotations[1].text == "recovery: full-quant ppl − ppl"
    one = plots.sensitivity_bars(df[df["mode"] == "only"], top=50)
    assert len(one.data) == 1 and len(one.data[0].y) == 8  # all 2 × 4 parts, no second panel
    no_attrs = df.copy()
    no_attrs.attrs = {}
    raw = plots.sensitivity_bars(no_attrs, top=2)
    assert raw.layout.annotations[1].text == "kl (everything else quantized)"
    assert list(raw.data[1].x) == pytest.approx([0.5 - 2 * _kl(1, 3), 0.5 - 2 * _kl(1, 2)])
    with pytest.raises(AwqnbError, match="no 'only' rows|has none"):
        plots.sensitivity_bars(df[df["mode"] == "except"])
    with pytest.raises(AwqnbError, match="at least 1"):
        plots.sensitivity_bars(df, top=0)


def _pareto():
    rows = []
    for s, slope in (("sensitivity", 2.0), ("mse", 1.0), ("random", 0.2)):
        for k in (4, 0, 1, 2):  # unsorted
            rows.append({"strategy": s, "k": k, "avg_bits": 4.0 + 0.05 * k, "ppl": 30.0 - slope * k, "kl": 0.5 - 0.02 * k,
                         "plan": f"{s} top {k}"})
    df = pd.DataFrame(rows)
    df.attrs.update(provenance=dict(PROV), fp_ppl=20.0, quant_ppl=30.0)
    return df


def test_pareto_one_line_per_strategy_with_reference_lines():
    fig = plots.pareto_plot(_pareto())
    assert [t.name for t in fig.data] == ["sensitivity", "mse", "random"]
    sens = fig.data[0]
    assert list(sens.x) == pytest.approx([4.0, 4.05, 4.1, 4.2])  # sorted by average bits
    assert list(sens.y) == pytest.approx([30.0, 28.0, 26.0, 22.0])
    assert list(sens.text) == ["k=0", "k=1", "k=2", "k=4"]
    assert sens.customdata[3][1] == pytest.approx(0.5 - 0.08) and sens.customdata[3][2] == "sensitivity top 4"
    assert sens.line.color == plots.STRATEGY_COLORS["sensitivity"]
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert sorted(s.y0 for s in lines) == [20.0, 30.0] and all(s.y0 == s.y1 for s in lines)
    assert {a.text for a in fig.layout.annotations} == {"FP 20.000", "fully quantized 30.000"}
    assert fig.layout.xaxis.title.text == "average weight bits" and fig.layout.yaxis.title.text == "perplexity"
    assert "Mixed precision" in fig.layout.title.text and "tiny" in fig.layout.title.text
    # arguments win over attrs; no attrs and no arguments: no reference lines
    assert {s.y0 for s in plots.pareto_plot(_pareto(), fp_ppl=19.0).layout.shapes} == {19.0, 30.0}
    bare = _pareto()
    bare.attrs = {}
    assert not plots.pareto_plot(bare).layout.shapes
    with pytest.raises(AwqnbError, match="lacks"):
        plots.pareto_plot(bare.drop(columns="avg_bits"))


def _result(method, errs, bits=4, gs=64):
    layers = [SimpleNamespace(index=i, evidence={"block_rel_err": e}) for i, e in enumerate(errs)]
    cfg = SimpleNamespace(method=method, quant=SimpleNamespace(bits=bits, group_size=gs))

    def block_errors():
        return pd.DataFrame([{"layer": r.index, "rel_err": r.evidence.get("block_rel_err", float("nan"))}
                             for r in layers], columns=["layer", "rel_err"])

    return SimpleNamespace(model_name="tiny", method=method, config=cfg, block_errors=block_errors,
                           metadata=lambda: {"method": method, "model": "tiny", "config": {"method": method,
                                             "quant": {"bits": bits, "group_size": gs}},
                                             "layers": [{"index": r.index, "evidence": r.evidence} for r in layers]})


def test_block_error_profile_from_results_metadata_and_frames():
    rtn, awq = _result("rtn", [0.01, 0.02, 0.04]), _result("awq", [0.005, 0.01, 0.03])
    one = plots.block_error_profile(rtn)
    assert len(one.data) == 1 and list(one.data[0].x) == [0, 1, 2]
    assert list(one.data[0].y) == pytest.approx([0.01, 0.02, 0.04])
    assert one.layout.yaxis.type == "log" and one.layout.xaxis.title.text == "decoder block"
    assert one.layout.title.text == "Where the error enters: block output error vs FP — tiny · rtn · W4 · g64"
    both = plots.block_error_profile({"rtn": rtn, "awq": awq.metadata()})
    assert [t.name for t in both.data] == ["rtn", "awq"]
    assert list(both.data[1].y) == pytest.approx([0.005, 0.01, 0.03])
    assert both.layout.title.text.endswith("tiny · W4 · g64") and "rtn" not in both.layout.title.text
    frame = pd.DataFrame({"method": ["a", "a", "b", "b"], "layer": [1, 0, 0, 1], "rel_err": [0.2, 0.1, 0.3, np.nan]})
    f = plots.block_error_profile(frame, log=False)
    assert [list(t.x) for t in f.data] == [[0, 1], [0]] and list(f.data[0].y) == pytest.approx([0.1, 0.2])
    assert f.layout.yaxis.type == "linear"


def test_block_error_profile_without_evidence_is_a_clear_error():
    none = _result("awq", [float("nan")] * 3)
    with pytest.raises(AwqnbError, match="layer_batch_size 1"):
        plots.block_error_profile(none)
    with pytest.raises(AwqnbError, match="not int"):
        plots.block_error_profile(3)
    with pytest.raises(AwqnbError, match="empty mapping"):
        plots.block_error_profile({})
