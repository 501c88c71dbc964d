"""Figures from small hand-made frames: the expected traces, values and titles."""
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
    assert len(fig.data) == 2 * (2 + 1)
    lines = [t for t in fig.data if t.mode == "lines"]
    stars = [t for t in fig.data if t.mode == "markers"]
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
    assert len(fig.data) == 3
    assert "per-channel" in fig.layout.title.text
    dd = plots.alpha_curves(df, mode="dropdown")
    assert len(dd.data) == 6
    buttons = dd.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["qkv", "down"]
    assert buttons[1].args[0]["visible"] == [False] * 3 + [True] * 3
    assert [t.visible for t in dd.data] == [True] * 3 + [False] * 3


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
