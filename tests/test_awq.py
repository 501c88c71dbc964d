"""AWQ search, exact folding, the block pipeline, apply/replay and bad input."""
import copy

import pytest
import torch
from torch import nn

from awqnb.quant import pipeline
from awqnb.model.arch import ArchSpec, AttnShape, ScaleGroup, attn_shape, blocks, get_module, resolve_spec
from awqnb.engine.capture import StopForward, capture_inputs
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.quant.methods.awq import InspectRunner, fold_scales, search_group
from awqnb.core.primitives import fake_quant

from conftest import TINY  # noqa: E402


# `tiny` (each tiny model, tokenizer, 4 × 64 calibration): tests/conftest.py


def _fresh(tiny, name):
    model, tok, calib = tiny[name]
    return copy.deepcopy(model), tok, calib


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", TINY)
def test_folding_random_scales_is_exact(tiny, name):
    model, tok, calib = _fresh(tiny, name)
    ids = torch.stack(calib.samples[:2])
    ref = _logits(model, ids)
    spec, attn = resolve_spec(model), attn_shape(model.config)
    assert attn.n_kv < attn.n_heads  # both tiny models use GQA, so the v→o fold is exercised
    g = torch.Generator().manual_seed(0)
    for block in blocks(model, spec):
        for group in spec.groups:
            c = get_module(block, group.prev_op).weight.shape[0]
            fold_scales(block, group, torch.rand(c, generator=g) * 4 + 0.1, spec, attn)
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=1e-5)


def test_wrong_gqa_mapping_would_break_exactness(tiny):
    """The v→o fold must repeat each kv head's scale over its own n_rep query heads: the
    interleaved mapping h % n_kv (a plausible bug) changes the outputs."""
    model, tok, calib = _fresh(tiny, "tiny-random-llama")
    ids = torch.stack(calib.samples[:1])
    ref = _logits(model, ids)
    spec, attn = resolve_spec(model), attn_shape(model.config)
    vo = next(g for g in spec.groups if g.gqa_fold)
    block = blocks(model, spec)[0]
    s = torch.rand(attn.n_kv * attn.head_dim) * 4 + 0.1
    h = torch.arange(attn.n_heads).repeat_interleave(attn.head_dim)
    d = torch.arange(attn.head_dim).repeat(attn.n_heads)
    wrong = (h % attn.n_kv) * attn.head_dim + d
    assert not torch.equal(wrong, attn.o_index())
    with torch.no_grad():
        get_module(block, "self_attn.v_proj").weight.div_(s[:, None])
        get_module(block, "self_attn.o_proj").weight.mul_(s[wrong][None, :])
    assert (_logits(model, ids) - ref).abs().max() > 1e-3


class _Toy(nn.Module):
    """norm → linear, with a few input channels carrying large activations."""

    def __init__(self, ci=256, co=128):
        super().__init__()
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(ci))
        self.fc = nn.Linear(ci, co, bias=False)


def _toy_spec():
    group = ScaleGroup("g", "norm", "norm", ("fc",), "fc", "linear")
    return group, ArchSpec("toy", ("toy",), "", 0.0, (group,), ("fc",), "hidden_act")


def test_awq_beats_rtn_on_outlier_channels():
    torch.manual_seed(0)
    toy = _Toy()
    torch.nn.init.normal_(toy.fc.weight, std=0.05)
    x = torch.randn(8, 32, 256)
    x[..., :6] *= 40.0  # outlier input channels
    group, spec = _toy_spec()
    qcfg = QuantConfig(4, 64)
    ref = toy.fc(x)
    rtn_err = (nn.functional.linear(x, fake_quant(toy.fc.weight.data, qcfg)) - ref).pow(2).mean()

    a = x.reshape(-1, 256).pow(2).mean(0).sqrt()
    runner = InspectRunner(toy, group, [x], [{}])
    gs = search_group(toy, group, a, runner, qcfg, SearchConfig(n_grid=10), AttnShape(1, 1, 1))
    assert gs.best_alpha > 0
    assert gs.best_loss < gs.rtn_loss
    assert gs.losses[0] == pytest.approx(rtn_err.item(), rel=1e-4)  # α = 0 is plain RTN
    fold_scales(toy, group, gs.scales, spec, AttnShape(1, 1, 1))
    xs = x / gs.scales  # what the folded norm now emits
    awq_err = (nn.functional.linear(xs, fake_quant(toy.fc.weight.data, qcfg)) - ref).pow(2).mean()
    assert awq_err.item() == pytest.approx(gs.best_loss, rel=1e-3)
    assert awq_err < 0.7 * rtn_err


def test_gram_loss_equals_direct_output_error():
    """Linear groups score α with ΔW·XᵀX·ΔWᵀ; it must equal the output MSE computed directly."""
    torch.manual_seed(1)
    toy = _Toy(ci=96, co=24)
    group, _ = _toy_spec()
    xs = [torch.randn(2, 16, 96) * 3, torch.randn(1, 16, 96)]
    runner = InspectRunner(toy, group, xs, [{}, {}])
    assert runner.gram is not None and runner.outputs() == []
    w_new = toy.fc.weight.data + 0.01 * torch.randn(24, 96)
    direct = InspectRunner(toy, group, xs, [{}, {}])
    direct.gram = None
    assert runner.loss([w_new], []) == pytest.approx(direct.loss([w_new], direct.outputs()), rel=1e-4)


def test_ties_choose_the_smallest_alpha():
    toy = _Toy(ci=64, co=8)
    group, _ = _toy_spec()
    x = torch.zeros(1, 4, 64)  # zero input: every α has loss 0
    runner = InspectRunner(toy, group, [x], [{}])
    gs = search_group(toy, group, torch.ones(64), runner, QuantConfig(4, 32), SearchConfig(n_grid=4),
                      AttnShape(1, 1, 1))
    assert gs.best_alpha == 0.0 and len(gs.losses) == 5


def test_hooks_removed_when_forward_raises():
    lin = nn.Linear(4, 4)

    def boom(*_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        with capture_inputs({"lin": lin}, boom):
            lin(torch.randn(2, 4))
    assert len(lin._forward_pre_hooks) == 0


def test_block_capture_restores_blocks_and_stops_early(tiny):
    from awqnb.engine.walk import BlockEngine

    model, tok, calib = _fresh(tiny, "tiny-random-llama")
    bl = blocks(model, resolve_spec(model))
    hidden, kwargs = BlockEngine(model, calib.samples[:2], batch_size=2).capture()
    assert hidden[0].shape[:2] == (2, 64)
    assert all(kw is not None for kw in kwargs[0])
    assert all(len(b._forward_pre_hooks) == 0 and "forward" not in b.__dict__ for b in bl)
    assert issubclass(StopForward, Exception)


def _err(model, ref_model, ids):
    return (_logits(model, ids) - _logits(ref_model, ids)).pow(2).mean().item()


@pytest.mark.parametrize("name", TINY)
def test_awq_pipeline_beats_rtn_and_apply_replays(tiny, name):
    fp, tok, calib = _fresh(tiny, name)
    ids = torch.stack(calib.samples[:2])
    cfg = MethodConfig("awq", QuantConfig(4, 32), SearchConfig(n_grid=10), calib_batch_size=2)
    awq_model = copy.deepcopy(fp)
    res = pipeline.quantize(awq_model, cfg, calib, progress=False)
    rtn_model = copy.deepcopy(fp)
    pipeline.quantize(rtn_model, MethodConfig("rtn", QuantConfig(4, 32)), progress=False)
    assert _err(awq_model, fp, ids) < _err(rtn_model, fp, ids)

    n_layers = len(blocks(fp, resolve_spec(fp)))
    assert sorted(res.alphas()) == list(range(n_layers))
    assert set(res.alphas()[0]) == {"qkv", "vo", "gate_up", "down"}
    curves = res.curves()
    assert len(curves) == n_layers * 4 * 11
    meta = res.metadata()
    assert meta["method"] == "awq" and meta["config"]["quant"]["group_size"] == 32

    replayed = pipeline.apply(copy.deepcopy(fp), res)
    for (n1, p1), (n2, p2) in zip(awq_model.named_parameters(), replayed.named_parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6, msg=n1)


def test_result_save_load_roundtrip(tiny, tmp_path):
    fp, tok, calib = _fresh(tiny, "tiny-random-llama")
    cfg = MethodConfig("awq", QuantConfig(4, 32), SearchConfig(n_grid=4, clip=True), calib_batch_size=4)
    q = copy.deepcopy(fp)
    res = pipeline.quantize(q, cfg, calib, progress=False)
    assert res.layers[0].clip and "self_attn.q_proj" not in res.layers[0].clip
    res.save(tmp_path / "r")
    back = pipeline.QuantResult.load(tmp_path / "r.json")
    assert back.alphas() == res.alphas()
    replayed = pipeline.apply(copy.deepcopy(fp), back)
    for p1, p2 in zip(q.parameters(), replayed.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6)


def test_propagation_modes_decide_what_the_next_block_sees(tiny):
    """propagate='fp': every block is searched on FP inputs, so batching blocks changes nothing;
    'quantized': block 1 is searched on block 0's quantized output (layer_batch_size 1), or on its
    FP output when both blocks are in one batch (layer_batch_size 2: the batch starts from FP)."""
    fp, tok, calib = _fresh(tiny, "tiny-random-gemma3")
    spec = resolve_spec(fp)
    assert len(blocks(fp, spec)) == 2

    def run(propagate, lbs):
        q = copy.deepcopy(fp)
        cfg = MethodConfig("awq", QuantConfig(4, 64), SearchConfig(n_grid=2, propagate=propagate, salience="l1",
                                                                   duo_scaling=True), layer_batch_size=lbs)
        pipeline.quantize(q, cfg, calib, progress=False)
        return [dict(b.named_parameters()) for b in blocks(q, spec)]

    def same(a, b):
        return all(torch.equal(a[n], b[n]) for n in a)

    ref = run("fp", 1)
    assert not same(ref[0], dict(blocks(fp, spec)[0].named_parameters()))  # it did quantize
    for other in (run("fp", 2), run("quantized", 2)):
        assert same(ref[0], other[0]) and same(ref[1], other[1])
    chained = run("quantized", 1)
    assert same(ref[0], chained[0])  # block 0: the same FP inputs in every mode
    assert not same(ref[1], chained[1])  # block 1: searched on block 0's quantized output


def test_lm_head_quantized_in_chunks_leaves_tied_embeddings(tiny):
    fp, tok, calib = _fresh(tiny, "tiny-random-llama")
    emb = fp.get_input_embeddings().weight.detach().clone()
    cfg = MethodConfig("rtn", QuantConfig(4, 32), lm_head="quantize", lmhead_chunks=3)
    pipeline.quantize(fp, cfg, progress=False)
    torch.testing.assert_close(fp.get_input_embeddings().weight, emb)
    head = fp.get_output_embeddings().weight
    torch.testing.assert_close(head, fake_quant(emb, QuantConfig(4, 32)))


def test_bad_input_errors(tiny):
    fp, tok, calib = _fresh(tiny, "tiny-random-llama")
    with pytest.raises(AwqnbError, match="calibration"):
        pipeline.quantize(copy.deepcopy(fp), MethodConfig("awq"), None, progress=False)
    with pytest.raises(AwqnbError, match="larger than"):
        pipeline.quantize(copy.deepcopy(fp), MethodConfig("rtn", QuantConfig(4, 4096)), progress=False)
    with pytest.raises(AwqnbError, match="unknown method"):
        pipeline.quantize(copy.deepcopy(fp), MethodConfig("nope"), progress=False)
    bad = copy.deepcopy(fp)
    with torch.no_grad():
        blocks(bad, resolve_spec(bad))[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(AwqnbError, match="NaN"):
        pipeline.quantize(bad, MethodConfig("rtn"), progress=False)

    class Odd(nn.Module):
        config = type("C", (), {"model_type": "bert"})()

    with pytest.raises(AwqnbError, match="not supported"):
        resolve_spec(Odd())


# --- alpha_select (issue 15): a broad minimum against a one-point dip ---------------------------

# a broad minimum around α = 0.6 and, at α = 0.15, a one-point dip flanked by spikes: what one
# intermediate row's lucky rounding does to SmolLM2's gate_up curves (bench/README.md, issue 15)
JAGGED = [1.0, 2.0, 2.2, 0.45, 2.1, 1.2, 0.9, 0.8, 0.7, 0.6, 0.52, 0.49, 0.47, 0.48, 0.5, 0.56, 0.65, 0.75,
          0.85, 0.95, 1.0]


class _CurveRunner:
    """Stands in for InspectRunner: returns a given loss per α, in grid order."""

    def __init__(self, losses):
        self.losses = iter(losses)

    def outputs(self):
        return []

    def loss_tensor(self, weights, ref):
        return torch.tensor(next(self.losses), dtype=torch.float32)


def _curve_search(losses, **search):
    toy = _Toy(ci=64, co=8)
    group, _ = _toy_spec()
    return search_group(toy, group, torch.rand(64) + 0.5, _CurveRunner(losses), QuantConfig(4, 32),
                        SearchConfig(n_grid=len(losses) - 1, **search), AttnShape(1, 1, 1))


def test_alpha_select_smooth_picks_the_broad_minimum():
    from awqnb.quant.methods.awq import select_alpha, selection_curve

    assert select_alpha(JAGGED) == 3 and select_alpha(JAGGED, "smooth") == 12
    gs = _curve_search(JAGGED, alpha_select="smooth")
    assert gs.best_alpha == pytest.approx(0.6)
    assert gs.best_loss == pytest.approx(0.47)  # the loss at the chosen α, not the smoothed value
    assert gs.extra["argmin_alpha"] == pytest.approx(0.15) and gs.extra["argmin_loss"] == pytest.approx(0.45)
    sm = selection_curve(JAGGED, "smooth")
    assert sm[0] == pytest.approx(1.5) and sm[12] == pytest.approx((0.49 + 0.47 + 0.48) / 3)
    # NaN never wins, and poisons the averages that touch it; all NaN → None (the caller falls back to RTN)
    nan = float("nan")
    assert select_alpha([1.0, nan, 0.5, 0.6, 0.7], "smooth") == 3
    assert select_alpha([nan, nan, nan], "smooth") is None and select_alpha([nan, nan]) is None
    assert _curve_search([nan] * 5, alpha_select="smooth").best_alpha == 0.0


def test_alpha_select_default_is_the_plain_argmin():
    assert SearchConfig().alpha_select == "argmin"
    assert "alpha_select" not in SearchConfig().to_dict()  # configs of earlier runs keep their hash
    assert SearchConfig(alpha_select="smooth").to_dict()["alpha_select"] == "smooth"
    gs = _curve_search(JAGGED)
    assert gs.best_alpha == pytest.approx(0.15) and gs.best_loss == pytest.approx(0.45) and gs.extra == {}
    assert _curve_search([1.0, 0.5, 0.5, 0.7]).best_alpha == pytest.approx(1 / 3)  # ties: the smaller α
    with pytest.raises(AwqnbError, match="alpha_select"):
        SearchConfig(alpha_select="median")
    cfg = MethodConfig("awq", search=SearchConfig(alpha_select="smooth"))
    assert MethodConfig.from_dict(cfg.to_dict()).search.alpha_select == "smooth"


def test_alpha_select_reaches_the_cli_and_a_run(tiny):
    from awqnb import cli

    args = cli.build_parser().parse_args(["quantize", "--alpha-select", "smooth"])
    assert cli.method_config(args).search.alpha_select == "smooth"
    assert cli.method_config(cli.build_parser().parse_args(["quantize"])).search.alpha_select == "argmin"
    # and a whole run records it (bench/quality.py's `awq@<search field>=…` specs: tests/test_runner.py runs the script)
    fp, tok, calib = _fresh(tiny, "tiny-random-llama")
    cfg = MethodConfig("awq", QuantConfig(4, 32), SearchConfig(n_grid=6, alpha_select="smooth"), calib_batch_size=4)
    res = pipeline.quantize(fp, cfg, calib, progress=False)
    assert res.metadata()["config"]["search"]["alpha_select"] == "smooth"
    assert all("argmin_alpha" in gs.extra for r in res.layers for gs in r.groups.values())
