"""One walker: every forward walk over the decoder blocks (evaluation, the sensitivity pass and its
plan runs, the deep dive's layer-local quantization and diagnostics, RTN and `apply`) goes through
the block engine with the model left on the CPU, one block onloaded at a time, and gives what the
whole-model path gives on the tiny models.

The guard below is what would fail if a walk ran the model as a whole: every decoder block that
computes must be onloaded by the engine (`onloaded`) at that moment and be the only block onloaded;
no `Module.to` may move a module holding more than one block; and, in a walk with another compute
dtype, every block but the running one must be in its home dtype (the only way to see "off its
home" on a CPU-only machine)."""
import contextlib
import copy
import math

import pytest
import torch
from torch import nn

from awqnb.analysis import diagnostics as D
from awqnb.analysis import layer_error, layer_local, plans
from awqnb.analysis import sensitivity as S
from awqnb.analysis.evaluate import token_perplexity
from awqnb.analysis.scales import effective_weights
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.primitives import fake_quant
from awqnb.engine import walk as W
from awqnb.model.arch import blocks, get_module, resolve_spec
from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig

from conftest import TINY, quantize_each  # noqa: E402

Q = QuantConfig(4, 32)
SEQ, NWIN = 40, 2  # > the tiny Gemma's sliding window of 32


def _cfg(method="awq", **kw):
    return MethodConfig(method, Q, SearchConfig(n_grid=4), calib_batch_size=4, **kw)


def _tokens(n=SEQ * NWIN + 7):
    return torch.randint(0, 2000, (n,), generator=torch.Generator().manual_seed(1))


def _is_block(m: nn.Module) -> bool:
    return hasattr(m, "self_attn") and hasattr(m, "mlp")


class Guard:
    """Watches walks over `model` (see the module docstring); `violations` lists what broke the rule."""

    def __init__(self, model: nn.Module):
        self.blocks = list(blocks(model, resolve_spec(model)))
        self.home = [{n: p.dtype for n, p in b.named_parameters()} for b in self.blocks]
        self.live: list[nn.Module] = []  # blocks onloaded now
        self.onloads = 0  # block onloads seen
        self.forwards = 0  # real block forwards seen
        self.peak = 0
        self.violations: list[str] = []
        self.on = True

    @contextlib.contextmanager
    def paused(self):
        """The test's own whole-model references are not walks under test."""
        self.on = False
        try:
            yield
        finally:
            self.on = True

    def wrap(self, real):
        guard = self

        @contextlib.contextmanager
        def onloaded(module, *args, **kwargs):  # the engine's signature, whatever it grows
            if not _is_block(module):
                with real(module, *args, **kwargs) as m:
                    yield m
                return
            guard.onloads += 1
            if guard.live:
                guard.violations.append("a second block onloaded while one is")
            guard.live.append(module)
            guard.peak = max(guard.peak, len(guard.live))
            try:
                with real(module, *args, **kwargs) as m:
                    yield m
            finally:
                guard.live.remove(module)

        return onloaded

    def pre_hook(self, module, _args):
        if not self.on or not _is_block(module) or "forward" in module.__dict__:  # the engine's capture catcher: no compute
            return
        self.forwards += 1
        if not any(m is module for m in self.live):
            self.violations.append("a block ran without being onloaded")
        off = [j for j, b in enumerate(self.blocks) if b is not module
               and any(p.dtype != self.home[j][n] for n, p in b.named_parameters())]
        if off:
            self.violations.append(f"blocks {off} off their home dtype while another runs")

    def module_to(self, real):
        guard = self

        def to(module, *args, **kwargs):
            if guard.on and sum(_is_block(m) for m in module.modules()) > 1:
                guard.violations.append(f"{type(module).__name__}.to(...) moved more than one block")
            return real(module, *args, **kwargs)

        return to


@pytest.fixture
def guard(monkeypatch):
    """guard(model) → a Guard active until the test ends."""
    made = []

    def make(model):
        g = Guard(model)
        monkeypatch.setattr(W, "onloaded", g.wrap(W.onloaded))
        monkeypatch.setattr(pipeline, "onloaded", g.wrap(pipeline.onloaded))
        monkeypatch.setattr(nn.Module, "to", g.module_to(nn.Module.to))
        made.append(torch.nn.modules.module.register_module_forward_pre_hook(g.pre_hook))
        return g

    yield make
    for h in made:
        h.remove()


def _state(model):
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def _same_state(model, before):
    after = _state(model)
    return after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())


@pytest.fixture(scope="module")
def runs(tiny):
    """Per tiny model: (fp model, calibration, awq-quantized copy, QuantResult)."""
    return quantize_each(tiny, _cfg())


# --- the guard can fail ------------------------------------------------------------------------

def test_the_guard_catches_a_whole_model_walk(tiny, guard):
    model = tiny["tiny-random-llama"][0]
    g = guard(model)
    token_perplexity(model, _tokens(), seqlen=SEQ, progress=False, placement="whole")
    assert g.violations and any("without being onloaded" in v for v in g.violations)
    assert any(".to(...) moved more than one block" in v for v in g.violations)


def test_the_guard_catches_a_second_block_off_home(tiny, guard):
    model = copy.deepcopy(tiny["tiny-random-llama"][0])
    g = guard(model)
    bl = blocks(model, resolve_spec(model))
    with W.onloaded(bl[0], "cpu", torch.bfloat16):
        for p in bl[1].parameters():  # what a walk that left block 1 in the compute dtype would leave
            p.data = p.data.to(torch.bfloat16)
        g.pre_hook(bl[0], ())  # block 0 about to run
    assert not any("without being onloaded" in v for v in g.violations)
    assert any("blocks [1] off their home dtype" in v for v in g.violations)


# --- evaluation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_token_perplexity_streamed_from_the_cpu_equals_the_whole_model(tiny, guard, name):
    model = tiny[name][0]
    tokens = _tokens(SEQ * 3 + 5)
    whole = token_perplexity(copy.deepcopy(model), tokens, seqlen=SEQ, batch_size=2, logit_chunk=16,
                             progress=False, placement="whole")
    before = _state(model)
    g = guard(model)
    streamed = token_perplexity(model, tokens, seqlen=SEQ, batch_size=2, logit_chunk=16, progress=False,
                                device="cpu", placement="stream")
    assert not g.violations and g.peak == 1 and g.forwards == len(g.blocks) * 2  # 3 windows in 2 chunks
    assert streamed.n_tokens == whole.n_tokens
    # the same block forwards in the same dtypes; only the head's slices differ: float rounding
    torch.testing.assert_close(torch.tensor(streamed.nll), torch.tensor(whole.nll), rtol=1e-6, atol=1e-6)
    assert _same_state(model, before)


# --- the sensitivity pass and a plan run ---------------------------------------------------------

def _kl_ppl(logits, ref_logits, ids):
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    lr = torch.log_softmax(ref_logits[:, :-1].double(), -1)
    return float((lr.exp() * (lr - lp)).sum(-1).mean()), math.exp(float(-lp.gather(-1, ids[:, 1:, None]).mean()))


@pytest.mark.parametrize("name", TINY)
def test_sensitivity_and_pareto_on_the_engine_equal_the_whole_model(runs, guard, name):
    """A QuantResult is replayed block by block on one-block copies (no second model): W_eff equals
    `apply` on a deep copy bit for bit, the frame equals the one from the (quantized model, result)
    pair exactly, and rows / plan runs equal full forwards of the same hybrid models."""
    fp, calib, _q, res = runs[name]
    before = _state(fp)
    q = pipeline.apply(copy.deepcopy(fp), res)  # the old path: `apply` on a deep copy of the whole model
    old = S.reference(fp, None, result=(q, res))
    g = guard(fp)
    new = S.reference(fp, None, result=res)
    assert not g.violations and g.onloads == len(g.blocks) and g.peak == 1
    for j in old.weff:
        for n, w in old.weff[j].items():
            assert torch.equal(new.weff[j][n], w), (j, n)
    kw = dict(seqlen=SEQ, n_windows=NWIN, progress=False, cache=False)
    df = S.sensitivity(fp, None, calib, _tokens(), result=res, device="cpu", **kw)
    assert not g.violations and g.peak == 1
    pair = S.sensitivity(fp, None, calib, _tokens(), result=(q, res), **kw)
    cols = ["kl", "ppl", "dppl", "mse"]
    assert df[cols].equals(pair[cols]) and df.attrs["fp_ppl"] == pair.attrs["fp_ppl"]
    ids = _tokens()[: SEQ * NWIN].view(NWIN, SEQ)
    ref = S.reference(fp, None, result=(q, res))
    fams = list(S.family_linears(resolve_spec(fp)))
    with torch.no_grad(), g.paused():
        fp_logits = fp(ids).logits
        qkl, qppl = _kl_ppl(q(ids).logits, fp_logits, ids)
        for layer, fam, mode in [(1, "down", "only"), (0, "vo", "except")]:
            which = [(layer, fam)] if mode == "only" else [(l, f) for l in (0, 1) for f in fams if (l, f) != (layer, fam)]
            kl, ppl = _kl_ppl(S.swap_effective(copy.deepcopy(fp), ref.weff, which)(ids).logits, fp_logits, ids)
            row = df[(df.layer == layer) & (df.family == fam) & (df["mode"] == mode)].iloc[0]
            # chunked float32 logits with a float64 KL sum against one float64 log_softmax: rounding only
            assert row.kl == pytest.approx(kl, rel=1e-4, abs=1e-9) and row.ppl == pytest.approx(ppl, rel=1e-5)
    assert df.attrs["quant_ppl"] == pytest.approx(qppl, rel=1e-5)
    assert df.attrs["quant_kl"] == pytest.approx(qkl, rel=1e-4, abs=1e-9)

    front = plans.pareto(fp, None, calib, _tokens(), df, ks=(0, 1), strategies=("sensitivity",), result=res,
                         device="cpu", progress=False)
    assert not g.violations and g.peak == 1
    k0 = front[front["k"] == 0].iloc[0]
    assert k0.ppl == pytest.approx(qppl, rel=1e-5) and k0.kl == pytest.approx(qkl, rel=1e-4, abs=1e-9)
    plan = plans.plan_from_sensitivity(df, k=1)
    (l, f, _), = plan.entries
    keep = plans.keep_weights(fp, res, 8, [l])
    hybrid = S.swap_effective(copy.deepcopy(fp), ref.weff)  # the fully quantized model in the FP basis
    for n in S.family_linears(resolve_spec(fp))[f]:
        get_module(blocks(hybrid, resolve_spec(fp))[l], n).weight.data.copy_(keep[l][n])
    if res.config.lm_head == "quantize":
        hybrid.get_output_embeddings().weight.data.copy_(ref.head)
    with torch.no_grad(), g.paused():
        kl1, ppl1 = _kl_ppl(hybrid(ids).logits, fp_logits, ids)
    k1 = front[front["k"] == 1].iloc[0]
    assert k1.ppl == pytest.approx(ppl1, rel=1e-5) and k1.kl == pytest.approx(kl1, rel=1e-4, abs=1e-9)
    assert _same_state(fp, before)


def test_sensitivity_in_another_dtype_holds_one_block_off_home(runs, guard):
    """bf16 compute on the float32 model: only the running block is ever in bf16."""
    fp, calib, q, res = runs["tiny-random-llama"]
    before = _state(fp)
    g = guard(fp)
    S.sensitivity(fp, None, calib, _tokens(), result=res, dtype="bfloat16", seqlen=SEQ, n_windows=NWIN,
                  progress=False, cache=False)
    assert not g.violations and g.peak == 1 and g.forwards > len(g.blocks)
    assert _same_state(fp, before)


# --- the deep dive -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("layer", [1])
def test_quantize_layer_copies_one_block_and_equals_the_deep_copy_path(tiny, guard, monkeypatch, name, layer):
    fp, _tok, calib = tiny[name]
    cfg = _cfg("awq", dtype="bfloat16")  # a cast walk: the guard sees any other block off home
    spec = resolve_spec(fp)
    before = _state(fp)
    g = guard(fp)
    inputs = layer_local.capture_layer_inputs(fp, calib, layer, dtype=cfg.dtype)
    torch.manual_seed(0)
    qm, res = layer_local.quantize_layer(fp, calib, cfg, layer, inputs=inputs)
    assert not g.violations and g.peak == 1 and g.forwards > 0
    assert _same_state(fp, before)  # the FP model is untouched
    fb, qb = blocks(fp, spec), blocks(qm, spec)
    assert all(qb[j] is fb[j] for j in range(len(fb)) if j != layer) and qb[layer] is not fb[layer]
    shared = {id(p) for p in fp.parameters()}
    own = [p for p in qm.parameters() if id(p) not in shared]
    assert sum(p.numel() for p in own) == sum(p.numel() for p in fb[layer].parameters())  # one block's worth

    monkeypatch.setattr(layer_local, "with_own_block", lambda m, _l: copy.deepcopy(m))  # the old path
    torch.manual_seed(0)
    old_qm, old_res = layer_local.quantize_layer(fp, calib, cfg, layer, inputs=inputs)
    assert old_res.alphas() == res.alphas()
    for n, p in blocks(old_qm, spec)[layer].named_parameters():
        assert torch.equal(dict(qb[layer].named_parameters())[n], p), n
    for n, w in effective_weights(old_qm, old_res, layer).items():
        assert torch.equal(effective_weights(qm, res, layer)[n], w), n
    # the diagnostics on it: identical frames
    a = layer_error.layer_mse(fp, calib, {"awq": (qm, res)}, layers=[layer], cache=False)
    b = layer_error.layer_mse(fp, calib, {"awq": (old_qm, old_res)}, layers=[layer], cache=False)
    assert a.equals(b) and (a["rel_mse"] > 0).all()
    ra = layer_error.rounding_error(fp, cfg, layers=[layer], result=res, quantized=qm)
    rb = layer_error.rounding_error(fp, cfg, layers=[layer], result=old_res, quantized=old_qm)
    assert ra.equals(rb)


# --- RTN and apply ---------------------------------------------------------------------------------

def test_rtn_and_apply_one_block_at_a_time_equal_the_whole_model(runs, guard):
    fp, calib, q, res = runs["tiny-random-llama"]
    spec = resolve_spec(fp)
    rtn = copy.deepcopy(fp)
    g = guard(rtn)
    pipeline.quantize(rtn, _cfg("rtn"), progress=False, device="cpu")
    assert not g.violations and g.onloads == len(g.blocks) and g.peak == 1
    for fb, rb in zip(blocks(fp, spec), blocks(rtn, spec)):  # whole-model RTN: every linear rounded
        for n in spec.linears:
            assert torch.equal(get_module(rb, n).weight, fake_quant(get_module(fb, n).weight.data, Q)), n
    replayed = copy.deepcopy(fp)
    g = guard(replayed)
    pipeline.apply(replayed, res, device="cpu")
    assert not g.violations and g.onloads == len(g.blocks) and g.peak == 1
    for (n, a), (_, b) in zip(q.named_parameters(), replayed.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=n)  # as tests/test_awq.py's replay


def test_with_own_block_shares_everything_else(tiny):
    fp = tiny["tiny-random-gemma3"][0]
    spec = resolve_spec(fp)
    own = D.with_own_block(fp, -1 % len(blocks(fp, spec)))
    assert own.get_input_embeddings() is fp.get_input_embeddings()
    assert own.get_output_embeddings() is fp.get_output_embeddings() and own.config is fp.config
    ids = _tokens(SEQ)[None]
    with torch.no_grad():
        assert torch.equal(own(ids).logits, fp(ids).logits)  # a faithful model until its block changes


def test_deep_dive_statistics_walk_one_block_at_a_time(tiny, guard):
    """salience_table and preactivation_risk (the deep dive's first sections) under the guard; the
    salience equals moments of inputs captured in a whole-model forward."""
    from awqnb.analysis import preactivation, salience

    fp, _tok, calib = tiny["tiny-random-gemma3"]
    spec = resolve_spec(fp)
    g = guard(fp)
    sal = salience.salience_table(fp, calib, layers=[1], cache=False)
    risk = preactivation.preactivation_risk(fp, calib, layers=[1], cache=False)
    assert not g.violations and g.peak == 1 and g.forwards > 0 and len(risk) > 0
    xs = []
    h = get_module(blocks(fp, spec)[1], "mlp.gate_proj").register_forward_pre_hook(
        lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad(), g.paused():
            fp(input_ids=torch.stack(list(calib.samples)), use_cache=False)
    finally:
        h.remove()
    x = torch.cat(xs).double()
    d = sal[(sal["layer"] == 1) & (sal["group"] == "gate_up")]
    # the same inputs; chunked float32 statistics against one float64 mean: rounding only
    torch.testing.assert_close(torch.tensor(d["l2"].to_numpy()), x.pow(2).mean(0).sqrt(), rtol=1e-5, atol=1e-7,
                               check_dtype=False)
