"""The α explorer, headless: moving the slider changes the figure, and what it shows equals a
direct computation (the MLP run with Q(W·diag(s))·diag(s)^-1 on the explorer's token sample)."""
import copy

import pytest
import torch

from awqnb.analysis.statcache import DiagnosticsCache
from awqnb.model.arch import blocks, resolve_spec
from awqnb.core.errors import AwqnbError
from awqnb.core.config import QuantConfig
from awqnb.quant.importance import importance_vectors
from awqnb.model.loading import load_model
from awqnb.core.primitives import fake_quant
from awqnb.workbench.widgets import AlphaExplorer


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model("tiny-random-llama")
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    return model, calib


def _direct_loss(model, layer, x, a, alpha, q):
    """mean((mlp_q(x) − mlp(x))²) with s = a**α / sqrt(max·min), gate/up ← Q(W·s)/s."""
    mlp = blocks(model, resolve_spec(model))[layer].mlp
    s = a.double().clamp(min=1e-30).pow(alpha).float().clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    qmlp = copy.deepcopy(mlp)
    with torch.no_grad():
        for lin in (qmlp.gate_proj, qmlp.up_proj):
            lin.weight.copy_(fake_quant(lin.weight * s, q) / s)
        return (qmlp(x) - mlp(x)).double().pow(2).mean().item()


@pytest.mark.parametrize("widget", [False, True], ids=["figure+output", "figurewidget"])
def test_slider_updates_the_figure_with_the_direct_loss(tiny, tmp_path, widget):
    if widget:
        pytest.importorskip("anywidget")  # plotly's FigureWidget needs it
    model, calib = tiny
    ex = AlphaExplorer(model, calib, layer=1, group="gate_up", metric="l2", bits=4, group_size=32, alpha=0.25,
                       n_grid=4, max_tokens=64, cache=DiagnosticsCache(root=tmp_path), widget=widget)
    assert set(ex.widgets) == {"layer", "group", "metric", "group_size", "bits", "alpha"}
    fig = ex.figure
    before = (list(fig.data[1].x), list(fig.data[1].y), list(fig.data[4].y))
    ex.widgets["alpha"].value = 0.5
    after = (list(fig.data[1].x), list(fig.data[1].y), list(fig.data[4].y))
    assert after != before and after[0] == [0.5]
    assert ex.last_update_s > 0  # an update was timed (its latency: bench/widgets_latency.py)

    q = QuantConfig(4, 32)
    x = ex.layer_sample(1).xs["gate_up"][0]  # [1, n_tok, H]: the sample the explorer uses
    assert x.shape[1] == 64  # 4 × 32 tokens, every 2nd
    a = torch.tensor(importance_vectors(model, calib, 1).query("group == 'gate_up'")["l2"].to_numpy())
    rtn = _direct_loss(model, 1, x, a, 0.0, q)
    assert ex.current["loss"] == pytest.approx(_direct_loss(model, 1, x, a, 0.5, q), rel=1e-4)
    assert fig.data[1].y[0] == pytest.approx(ex.current["loss"] / rtn, rel=1e-4)
    curve = dict(zip(fig.data[0].x, fig.data[0].y))  # the α grid {0, .25, .5, .75, 1}
    assert curve[0.5] == pytest.approx(fig.data[1].y[0], rel=1e-6) and curve[0.0] == pytest.approx(1.0)
    assert curve[1.0] == pytest.approx(_direct_loss(model, 1, x, a, 1.0, q) / rtn, rel=1e-4)
    # panel 2: the scales s(α); panel 3: per-channel error share, E[x²]·Σ ΔW²
    assert len(fig.data[3].x) == model.config.hidden_size
    assert len(fig.data[4].y) == model.config.hidden_size and min(fig.data[4].y) >= 0

    # another group, metric and group size: curve recomputed from the cached sample
    n_sampled = len(ex._samples)
    ex.widgets["group"].value = "qkv"
    ex.widgets["metric"].value = "praq"
    ex.widgets["group_size"].value = -1
    assert len(ex._samples) == n_sampled  # same layer: no new capture
    assert ex.setting["group"] == "qkv" and "qkv" in fig.layout.title.text and "per-channel" in fig.layout.title.text
    t = ex.timings((0.0, 1.0))  # the slider still drives the figure after the switches
    assert len(t["per_alpha_s"]) == 2 and all(s > 0 for s in t["per_alpha_s"]) and fig.data[1].x[0] == 1.0


def test_explorer_rejects_bad_settings(tiny, tmp_path):
    model, calib = tiny
    with pytest.raises(AwqnbError, match="layer 5 is out of range: tiny-random-llama has 2 decoder layers"):
        AlphaExplorer(model, calib, layer=5, model_name="tiny-random-llama", cache=False)
    with pytest.raises(AwqnbError, match="scale groups are"):
        AlphaExplorer(model, calib, group="attn", cache=False)
