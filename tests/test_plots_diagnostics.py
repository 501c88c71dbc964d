"""The diagnostics figures draw the columns they are given: traces, values and titles from
small hand-made frames (no model)."""
import numpy as np
import pandas as pd
import pytest

from awqnb.workbench import plots
from awqnb.core.errors import AwqnbError

MODULES = ["q_proj", "o_proj", "down_proj"]


def _mse():
    rows = []
    for m, f in (("rtn", 1.0), ("awq", 0.5)):
        for layer in (0, 1, 2):
            for i, mod in enumerate(MODULES):
                v = f * 10.0 ** (-3 + layer) * (i + 1)
                rows.append({"method": m, "layer": layer, "module": mod, "rel_mse": v, "vs_rtn": f, "model": "tiny"})
    return pd.DataFrame(rows)


def test_mse_heatmap_one_panel_per_method_with_log_values():
    fig = plots.mse_heatmap(_mse())
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    assert list(fig.data[0].x) == MODULES and list(fig.data[0].y) == [0, 1, 2]
    assert fig.data[1].z[2][1] == pytest.approx(np.log10(0.5 * 10.0 ** -1 * 2))
    assert fig.data[0].zmin == fig.data[1].zmin  # one colour scale for every method
    assert "tiny" in fig.layout.title.text
    ratio = plots.mse_heatmap(_mse().query("method == 'awq'"), value="vs_rtn", zmid=0.0)
    assert ratio.data[0].zmin == pytest.approx(-ratio.data[0].zmax)  # centred on zmid
    with pytest.raises(AwqnbError, match="lacks"):
        plots.mse_heatmap(_mse().drop(columns="rel_mse"))


def test_salience_risk_and_spearman_figures():
    ch = pd.DataFrame({"layer": 3, "group": ["qkv"] * 4 + ["down"] * 4, "channel": list(range(4)) * 2,
                       "l2": [1.0, 10.0, 2.0, 3.0, 0.1, 0.2, 5.0, 0.3]})
    fig = plots.salience_hist(ch, 3, metric="l2", top=2)
    assert len(fig.data) == 4  # histogram + top-k markers per group
    assert list(fig.data[1].text) == ["1", "3"] and list(fig.data[3].text) == ["2", "3"]
    with pytest.raises(AwqnbError, match="layer 5"):
        plots.salience_hist(ch, 5)
    summ = pd.DataFrame({"layer": [0, 1, 0, 1], "group": ["qkv", "qkv", "down", "down"], "metric": "l2",
                         "max_over_median": [10.0, 100.0, 1.0, 2.0]})
    hm = plots.salience_overview(summ)
    assert list(hm.data[0].y) == ["qkv", "down"] and hm.data[0].z[0][1] == pytest.approx(2.0)
    risk = pd.DataFrame({"layer": [0, 1], "n_dead": [5, 9], "n_dead_risky": [3, 4], "n_critical": [1, 2]})
    ro = plots.risk_overview(risk)
    assert [list(t.y) for t in ro.data] == [[5, 9], [3, 4], [1, 2]]
    agree = pd.DataFrame({"layer": [0, 0, 1, 1], "group": "down", "pair": ["l1~l2", "l1~praq"] * 2,
                          "spearman": [0.9, 0.2, 0.8, -0.1]})
    sp = plots.spearman_heatmap(agree)
    assert list(sp.data[0].x) == ["down · l1~l2", "down · l1~praq"] and sp.data[0].z[1][1] == -0.1
    assert len(plots.spearman_bars(agree, 1).data) == 2


def test_rounding_and_explorer_figures():
    q = {f"abs_q{k:02d}": [v, v * 2] for k, v in ((5, 0.1), (25, 0.2), (50, 0.3), (75, 0.4), (95, 0.5))}
    re = pd.DataFrame({"layer": [0, 0], "module": ["q_proj", "q_proj"], "method": ["rtn", "awq"], **q,
                       "e_before_mean": [None, 1.0], "e_after_mean": [None, 0.1]})
    fig = plots.rounding_error_dist(re)
    assert len(fig.data) == 2 and list(fig.data[1].median) == [0.6]
    fl = plots.flip_errors(re)
    assert list(fl.data[0].y) == [1.0] and list(fl.data[1].y) == [0.1]
    with pytest.raises(AwqnbError, match="no flip evidence"):
        plots.flip_errors(re.drop(columns=["e_before_mean"]))
    ex = plots.alpha_explorer_figure()
    assert len(ex.data) == 6 and all(len(t.x or ()) == 0 for t in ex.data)
