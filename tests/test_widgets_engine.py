"""The α explorer on the block engine: the model stays where it was loaded, the layer sample comes
from engine walks, the sampled block is computed on a device copy kept between slider moves (no
re-walk per move), and what it shows equals the old path (the model's own block on the device).

The guard: every `Module._apply` (what `.to`, `.cuda`, `.half`, … run) on a module holding more
than one decoder block is recorded, and every parameter and buffer of the model must keep its
storage, device and dtype; `BlockEngine.walk` calls are counted. On a CPU-only machine the copy
path is forced by treating no tensor as on the device; a CUDA-only test runs the real case."""
import pytest
import torch
from torch import nn

from awqnb.engine import walk as W
from awqnb.model.arch import blocks, resolve_spec
from awqnb.workbench import widgets
from awqnb.workbench.widgets import AlphaExplorer

from conftest import TINY  # noqa: E402

KW = dict(bits=4, group_size=32, alpha=0.25, n_grid=4, max_tokens=64, n_seq=2, cache=False, widget=False)


def _is_block(m: nn.Module) -> bool:
    return hasattr(m, "self_attn") and hasattr(m, "mlp")


def _state(model):
    return {n: (t.data_ptr(), t.device, t.dtype) for n, t in list(model.named_parameters()) + list(model.named_buffers())}


@pytest.fixture
def guard(monkeypatch):
    """→ (moves, walks): whole-model `_apply` calls seen, `BlockEngine.walk` calls seen."""
    moves, walks = [], []
    real_apply, real_walk = nn.Module._apply, W.BlockEngine.walk

    def _apply(self, fn, *a, **k):
        if sum(_is_block(m) for m in self.modules()) > 1:
            moves.append(type(self).__name__)
        return real_apply(self, fn, *a, **k)

    def walk(self, layers=None):
        walks.append(None if layers is None else list(layers))
        yield from real_walk(self, layers)

    monkeypatch.setattr(nn.Module, "_apply", _apply)
    monkeypatch.setattr(W.BlockEngine, "walk", walk)
    return moves, walks


def _values(ex, layer):
    """Every curve and the values at three α of every group of `layer` (CPU copies)."""
    out = {}
    for g in [grp.name for grp in ex.spec.groups]:
        for m in ("l2", "praq"):
            c = ex.curve(layer=layer, group=g, metric=m)
            out[(g, m, "curve")] = (c.alphas, c.losses, c.best_alpha)
        for a in (0.0, 0.35, 1.0):
            ev = ex.evaluate(a, layer=layer, group=g)
            out[(g, a)] = (ev["loss"], ev["scales"].cpu(), ev["channel_error"].cpu())
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(a[k], b[k]):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), k
            else:
                assert x == y, k


def test_the_guard_catches_a_whole_model_move(tiny, guard):
    model = tiny["tiny-random-llama"][0]
    moves, _ = guard
    model.to("cpu")  # what the explorer used to do, a no-op on the CPU but a move all the same
    assert moves


@pytest.mark.parametrize("name", TINY)
def test_explorer_leaves_the_model_in_place_and_slider_moves_walk_nothing(tiny, guard, monkeypatch, name):
    model, _, calib = tiny[name]
    moves, walks = guard
    monkeypatch.setattr(widgets, "_on_device", lambda t, d: False)  # as if the model lived off the device
    before = _state(model)
    ex = AlphaExplorer(model, calib, layer=1, group="gate_up", keep_layers=1, **KW)
    assert len(walks) == 2 and all(w == [1] for w in walks)  # the salience pass and the token sample
    own = blocks(model, resolve_spec(model))
    dev_block = ex.block(1)
    assert dev_block is not own[1] and list(ex._on) == [1]
    own_ptrs = {t.data_ptr() for t in own[1].parameters()}
    assert not own_ptrs & {t.data_ptr() for t in dev_block.parameters()}  # a real copy, nothing shared
    n = len(walks)
    for a in (0.5, 0.75, 1.0):  # slider moves
        ex.widgets["alpha"].value = a
    for g in ("down", "qkv", "vo"):  # group changes: curves from the cached sample
        ex.widgets["group"].value = g
    assert len(walks) == n and ex.block(1) is dev_block
    first = _values(ex, 1)
    ex.widgets["layer"].value = 0  # a new layer: its own walks, its own block; layer 1's is let go
    assert len(walks) == n + 2 and list(ex._on) == [0] and all(k[0] == 0 for k in ex._runners)
    ex.widgets["layer"].value = 1  # back: the sample is cached, only the block is copied again
    assert len(walks) == n + 2 and ex.block(1) is not dev_block
    ex._curves.clear()
    _same(_values(ex, 1), first)
    assert not moves, moves
    assert _state(model) == before  # every tensor of the model: same storage, device and dtype


@pytest.mark.parametrize("name", TINY)
def test_device_copy_path_equals_the_model_on_the_device(tiny, monkeypatch, name):
    """The old path had the whole model on the device and ran its own block; on the CPU that is the
    explorer without a copy. The copy path (forced) gives the same curves and values, bit for bit."""
    model, _, calib = tiny[name]
    old = AlphaExplorer(model, calib, layer=-1, group="gate_up", **KW)
    assert old.block(old.widgets["layer"].value) is blocks(model, resolve_spec(model))[-1]
    ref = _values(old, old.widgets["layer"].value)
    fig_ref = [list(d.y) if d.y is not None else list(d.x) for d in old.figure.data]
    with monkeypatch.context() as mp:
        mp.setattr(widgets, "_on_device", lambda t, d: False)
        new = AlphaExplorer(model, calib, layer=-1, group="gate_up", **KW)
        assert new.block(new.widgets["layer"].value) is not blocks(model, resolve_spec(model))[-1]
        _same(_values(new, new.widgets["layer"].value), ref)
        assert [list(d.y) if d.y is not None else list(d.x) for d in new.figure.data] == fig_ref
        old.widgets["alpha"].value = new.widgets["alpha"].value = 0.75
        assert new.current == old.current


def test_device_block_copies_to_the_device_in_home_dtypes(tiny):
    model = tiny["tiny-random-gemma3"][0]
    b = blocks(model, resolve_spec(model))[0]
    assert widgets.device_block(b, "cpu") is b  # already there: used in place
    w = b.mlp.down_proj.weight
    w.data = w.data.to(torch.bfloat16)  # a mixed-dtype block: each tensor keeps its own dtype
    try:
        c = widgets.device_block(b, "meta")  # another device, on a CPU-only machine
        assert c is not b
        assert all(t.device.type == "meta" for t in list(c.parameters()) + list(c.buffers()))
        assert c.mlp.down_proj.weight.dtype == torch.bfloat16 and c.mlp.up_proj.weight.dtype == torch.float32
        assert isinstance(c.mlp.down_proj.weight, nn.Parameter)
        assert all(t.device.type == "cpu" for t in b.parameters()) and w.dtype == torch.bfloat16  # untouched
    finally:
        w.data = w.data.float()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: model on the CPU, explorer on the GPU")
def test_cuda_model_on_the_cpu_equals_model_on_the_gpu(tiny):
    import copy

    model, _, calib = tiny["tiny-random-llama"]
    home = {n: (t.device, t.dtype) for n, t in model.state_dict().items()}
    values = {n: t.clone() for n, t in model.state_dict().items()}
    ex = AlphaExplorer(model, calib, layer=1, device="cuda:0", **KW)
    # an onloaded block comes home as equal copies (new storage): devices, dtypes and values are what count
    assert {n: (t.device, t.dtype) for n, t in model.state_dict().items()} == home
    assert all(torch.equal(t, values[n]) for n, t in model.state_dict().items())
    assert all(t.device.type == "cuda" for t in ex.block(1).parameters())
    whole = copy.deepcopy(model).to("cuda:0")  # the old path: the whole model on the device
    old = AlphaExplorer(whole, calib, layer=1, device="cuda:0", **KW)
    a, b = _values(ex, 1), _values(old, 1)
    for k in a:
        for x, y in zip(a[k], b[k]):
            if isinstance(x, torch.Tensor):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=0)
            elif isinstance(x, list):
                assert x == pytest.approx(y, rel=1e-5)
            else:
                assert x == pytest.approx(y, rel=1e-5)


def test_widgets_latency_bench_runs_on_the_cpu(tmp_path):
    """bench/widgets_latency.py as a script on a tiny model: its JSON holds the build time, every
    slider move (≥ 3) and their median, and says the model stayed where it was loaded."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "bench" / "widgets_latency.py"), "--model", "tiny-random-llama",
                        "--layer", "1", "--device", "cpu", "--n-calib", "2", "--calib-seqlen", "64",
                        "--max-tokens", "32", "--n-grid", "4", "--groups", "gate_up,down", "--alphas", "0,0.5,1",
                        "--out", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((tmp_path / "widgets_latency.json").read_text())
    assert rec["build_s"] > 0 and rec["model_left_in_place"] is True and list(rec["groups"]) == ["gate_up", "down"]
    for r in rec["groups"].values():
        assert len(r["move_s"]) == 3 and r["move_median_s"] == sorted(r["move_s"])[1]
    assert (tmp_path / "command.txt").is_file() and "median" in p.stdout
