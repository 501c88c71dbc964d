"""A method is data: a composition of steps (awqnb.quant.methods). Combinations no class existed
for are one registry line; each quantizes a tiny model and `pipeline.apply` replays it bit-exactly."""
import copy

import pytest
import torch

from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.methods import (PRAQ, REGISTRY, Activation, AWQGrid, Clip, DynamicFlip, GPTQ, Nearest, ReFlip,
                                 get_method, register)
from awqnb.quant.methods.base import channel_salience

from conftest import TINY  # noqa: E402

NEW = ["praq_gptq", "awq_gptq_reflip"]


def _cfg(method, params=None):
    return MethodConfig(method, QuantConfig(4, 32), SearchConfig(n_grid=10, clip=True, clip_grid=10),
                        params=params or {}, calib_batch_size=2)


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _run_and_replay(fp, calib, cfg, tmp_path=None):
    q = copy.deepcopy(fp)
    res = pipeline.quantize(q, cfg, calib, progress=False)
    r = copy.deepcopy(fp)
    if tmp_path is not None:  # through the saved record
        res = pipeline.QuantResult.load(res.save(tmp_path / cfg.method))
    pipeline.apply(r, res)
    return q, r, res


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"replay differs from the run: {differ[:5]}"


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", NEW)
def test_new_composition_quantizes_and_replays_bit_exactly(tiny, tmp_path, name, method):
    fp, _, calib = tiny[name]
    before = _weights(fp)
    q, r, res = _run_and_replay(fp, calib, _cfg(method), tmp_path)
    _assert_same(q, r)
    assert all(torch.equal(v, fp.state_dict()[k]) for k, v in before.items()), "the FP model changed"
    qs = q.state_dict()
    assert any(not torch.equal(qs[k], v) for k, v in before.items() if k.endswith("proj.weight"))
    assert all(rec.groups for rec in res.layers)  # the AWQ scaler ran
    assert all("gptq" in rec.evidence for rec in res.layers)  # the GPTQ rounder ran
    if method == "praq_gptq":
        assert all("praq" in rec.evidence for rec in res.layers)
    else:
        assert all("gqa" in rec.evidence for rec in res.layers)
        assert sum(sum(rec.evidence["gqa"]["flips"]) for rec in res.layers) > 0


def test_reflip_changes_gptq_codes_and_only_q_proj(tiny):
    """awq_gptq_reflip is awq_gptq with q_proj's codes moved by ReFlip: in block 0 (the same inputs
    for both) every other weight is the same (later blocks see other quantized inputs)."""
    fp, _, calib = tiny["tiny-random-llama"]
    a, _, _ = _run_and_replay(fp, calib, _cfg("awq_gptq"))
    b, _, _ = _run_and_replay(fp, calib, _cfg("awq_gptq_reflip"))
    sa, sb = a.state_dict(), b.state_dict()
    differ = {k for k in sa if k.startswith("model.layers.0.") and not torch.equal(sa[k], sb[k])}
    assert differ and all(k.endswith("self_attn.q_proj.weight") for k in differ), differ


def test_a_composition_is_one_registry_line(tiny):
    """A combination registered in one line (PRAQ salience, AWQ scaler, the dynamic-heuristic flips)
    derives its parameters and calibration need from its steps, quantizes, and replays."""
    cls = register("test_praq_dh", "praq salience, then the dynamic-heuristic flips (a test composition).",
                   salience=PRAQ(), scaler=AWQGrid(), rounder=DynamicFlip())
    try:
        assert get_method("test_praq_dh") is cls and get_method("full_test_praq_dh") is cls
        assert cls.needs_calibration and cls.searches_scales
        assert set(cls.PARAMS) == set(PRAQ.PARAMS) | set(DynamicFlip.PARAMS)
        with pytest.raises(AwqnbError, match=r"method 'test_praq_dh' has no parameter\(s\) \['outlier_percent'\]"):
            cls(_cfg("test_praq_dh", {"outlier_percent": 5}))
        with pytest.raises(AwqnbError, match="beta"):
            cls(_cfg("test_praq_dh", {"beta": 0}))
        fp, _, calib = tiny["tiny-random-gemma3"]
        q, r, res = _run_and_replay(fp, calib, _cfg("test_praq_dh"))
        _assert_same(q, r)
        assert all("praq" in rec.evidence and "flip" in rec.evidence for rec in res.layers)
    finally:
        REGISTRY.pop("test_praq_dh", None)


def test_registry_derives_flags_from_steps():
    assert not get_method("rtn").needs_calibration and not get_method("rtn").searches_scales
    assert get_method("gptq").needs_calibration and not get_method("gptq").searches_scales
    assert isinstance(get_method("gptq").scaler_step, Clip) and not isinstance(get_method("gptq").scaler_step, AWQGrid)
    assert isinstance(get_method("awq_gqa").refiner_steps[0], ReFlip)
    assert isinstance(get_method("awq").rounder_step, Nearest) and isinstance(get_method("awq_gptq").rounder_step, GPTQ)
    assert get_method("awq_gqa").PARAMS["gqa_rope"] is True and get_method("awq_gqa").PARAMS["outlier_percent"] == 5.0
    with pytest.raises(AwqnbError, match="needs a salience step"):
        register("test_no_salience", "a scale search without salience.", scaler=AWQGrid())
    assert "test_no_salience" not in REGISTRY


def test_one_salience(tiny):
    """The Activation salience step is `channel_salience` of the input point's stats (L1 and L2)."""
    from awqnb.engine.capture import ChannelStats

    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    st = ChannelStats()
    st.update(x)
    assert torch.equal(channel_salience(st, "l1"), st.mean_abs)
    torch.testing.assert_close(channel_salience(st, "l2"), x.reshape(-1, 8).pow(2).mean(0).sqrt())
    for kind in ("l1", "l2"):
        cfg = MethodConfig("awq", search=SearchConfig(salience=kind))
        step = Activation().bind(get_method("awq")(cfg))
        ctx = pipeline.BlockContext(0, None, None, None, {}, {"q": st}, [], {})
        group = type("G", (), {"layers": ["q"]})()
        assert torch.equal(step.salience(ctx, group), channel_salience(st, kind))
