"""Perplexity streamed on the block engine: the model left on the CPU, one block at a time, the
head on slices of positions; the same numbers as the whole-model path, masks and rotary
embeddings right per layer type (Gemma 3's sliding and global layers)."""
import copy

import pytest
import torch

from awqnb.analysis import evaluate
from awqnb.analysis.evaluate import eval_placement, model_bytes, sample_perplexity, token_perplexity
from awqnb.engine import walk as W
from awqnb.engine.walk import BlockEngine
from awqnb.model.arch import blocks, resolve_spec

from conftest import TINY  # noqa: E402

TEXTS = ["The cat sat on the mat.", "A", "Perplexity is the exponential of the mean negative log-likelihood " * 3,
         "Quantization rounds each weight to one of sixteen levels per group, scaled by salient channels. " * 2,
         "Short text here.", "Another sentence, of middling length, about nothing in particular at all."]


def _tiny_qwen3(tok):
    """A tiny random Qwen3 (q/k norms; the Llama spec) with the tiny models' tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models(tiny):
    out = {name: (m, tok) for name, (m, tok, _) in tiny.items()}
    tok = out["tiny-random-llama"][1]
    out["tiny-random-qwen3"] = (_tiny_qwen3(tok), tok)
    return out


def _state(model):
    return {n: (t.device, t.dtype, t.detach().clone()) for n, t in
            list(model.named_parameters()) + list(model.named_buffers())}


@pytest.fixture
def one_block_at_a_time(monkeypatch):
    """Counts how many decoder blocks the engine holds onloaded at once (at most: `peak[0]`)."""
    real = W.onloaded
    live, peak = [0], [0]

    def counting(module, device, dtype=None, writes=False, prefetch=None):
        is_block = hasattr(module, "self_attn")
        cm = real(module, device, dtype, writes, prefetch)

        class Ctx:
            def __enter__(self):
                if is_block:
                    live[0] += 1
                    peak[0] = max(peak[0], live[0])
                return cm.__enter__()

            def __exit__(self, *exc):
                if is_block:
                    live[0] -= 1
                return cm.__exit__(*exc)

        return Ctx()

    monkeypatch.setattr(W, "onloaded", counting)
    return peak


@pytest.mark.parametrize("name", TINY + ["tiny-random-qwen3"])
def test_streamed_token_perplexity_equals_the_whole_model(models, name, one_block_at_a_time):
    model, _ = models[name]
    tokens = torch.randint(0, model.config.vocab_size, (64 * 5 + 7,), generator=torch.Generator().manual_seed(1))
    whole = token_perplexity(copy.deepcopy(model), tokens, seqlen=64, batch_size=2, logit_chunk=16, progress=False,
                             placement="whole")
    streamed_model = copy.deepcopy(model)
    before = _state(streamed_model)
    # 130 tokens a walk: batches of 2 × 64 windows → three walks (2 + 2 + 1 windows)
    streamed = token_perplexity(streamed_model, tokens, seqlen=64, batch_size=2, logit_chunk=16, progress=False,
                                placement="stream", stream_tokens=130)
    assert streamed.meta["placement"] == "stream" and whole.meta["placement"] == "whole"
    assert streamed.n_tokens == whole.n_tokens and streamed.n_units == 5
    torch.testing.assert_close(torch.tensor(streamed.nll), torch.tensor(whole.nll), rtol=1e-6, atol=1e-6)
    assert streamed.ppl == pytest.approx(whole.ppl, rel=1e-6)
    assert one_block_at_a_time[0] == 1
    after = _state(streamed_model)  # left where it was, as it was
    assert after.keys() == before.keys()
    for n, (dev, dt, t) in before.items():
        assert after[n][0] == dev and after[n][1] == dt and torch.equal(after[n][2], t), n


@pytest.mark.parametrize("name", TINY + ["tiny-random-qwen3"])
def test_streamed_sample_perplexity_equals_the_whole_model(models, name):
    """Padded batches of texts of many lengths: padded positions are not scored. (Right padding
    under a causal mask changes no scored position; the next test checks the masks themselves.)"""
    model, tok = models[name]
    kw = dict(max_length=64, batch_size=3, logit_chunk=8, progress=False)
    whole = sample_perplexity(copy.deepcopy(model), tok, TEXTS, placement="whole", **kw)
    streamed = sample_perplexity(copy.deepcopy(model), tok, TEXTS, placement="stream", stream_tokens=40, **kw)
    assert streamed.n_tokens == whole.n_tokens and streamed.n_units == len(TEXTS) - 1  # "A": one token, skipped
    if name.endswith("gemma3"):  # long texts reach past the sliding window
        assert max(whole.n_tokens) > model.config.get_text_config().sliding_window
    torch.testing.assert_close(torch.tensor(streamed.nll), torch.tensor(whole.nll), rtol=1e-6, atol=1e-6)
    assert streamed.ppl == pytest.approx(whole.ppl, rel=1e-6)


def test_gemma3_masks_and_rotary_per_layer_type(models):
    """What the engine hands each block (captured with the padding mask, dtypes kept) is what
    the model's own forward hands that layer: the sliding-window mask and local rotary to
    sliding layers, the global ones to full-attention layers; and the two differ here (the
    sequence is longer than the window), so a mix-up would be seen."""
    model, tok = models["tiny-random-gemma3"]
    model = copy.deepcopy(model)
    cfg = model.config.get_text_config()
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    ids = torch.randint(0, cfg.vocab_size, (2, 80), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0  # the second row padded
    assert ids.shape[1] > cfg.sliding_window
    bl = blocks(model, resolve_spec(model))
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda _m, a, k, j=j: seen.__setitem__(j, k), with_kwargs=True)
             for j, b in enumerate(bl)]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    _, kwargs = BlockEngine(model, None, "cpu", chunks=[ids], masks=[mask], keep_dtypes=True).capture()

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, tuple):
            return isinstance(b, tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    by_type = {}
    for j, t in enumerate(cfg.layer_types):
        got, want = kwargs[0][j], seen[j]
        for key in ("attention_mask", "position_embeddings", "position_ids"):
            assert same(got[key], want[key]), (j, t, key)
        by_type[t] = got
    s, f = by_type["sliding_attention"], by_type["full_attention"]
    assert not same(s["attention_mask"], f["attention_mask"])  # the window cuts the sliding mask
    assert not same(s["position_embeddings"], f["position_embeddings"])  # local vs global rotary base


def test_placement_rule(models, monkeypatch):
    """Whole on the CPU or where the model already is; on a GPU, whole when the weights take at
    most 80% of its free memory, else streamed (the module docstring of evaluate)."""
    model, _ = models["tiny-random-llama"]
    assert eval_placement(model, "cpu") == "whole"
    size = model_bytes(model)
    half = model_bytes(model, torch.bfloat16)
    n_buf = sum(b.numel() * b.element_size() for b in model.buffers())
    assert half - n_buf == pytest.approx((size - n_buf) / 2, abs=64)  # floating parameters counted in bf16
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for free, want in ((int(size / evaluate.WHOLE_FRACTION) + 1, "whole"), (int(size / evaluate.WHOLE_FRACTION) - 1, "stream")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None, free=free: (free, 2 * free))
        assert eval_placement(model, "cuda:0") == want, free
    # the dtype it will be cast to counts: in bf16 it fits where float32 does not
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None: (int(size * 0.7 / evaluate.WHOLE_FRACTION), size))
    assert eval_placement(model, "cuda") == "stream"
    assert eval_placement(model, "cuda", torch.bfloat16) == "whole"


def test_diagnostics_placement_keeps_only_small_models_on_the_gpu(models, monkeypatch):
    """After the evaluation the report moves the FP model to the GPU for its diagnostics and the
    sensitivity pass only when it takes at most DIAG_FRACTION of the GPU's total memory (an 8B model
    on an H200 stays on the CPU and is streamed); never when evaluation itself would stream it."""
    from types import SimpleNamespace

    from awqnb.analysis.evaluate import diagnostics_placement

    model, _ = models["tiny-random-llama"]
    assert diagnostics_placement(model, "cpu") == "whole"
    size = model_bytes(model)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None: (100 * size, 100 * size))
    for total, want in ((int(size / evaluate.DIAG_FRACTION) + 1, "whole"), (int(size / evaluate.DIAG_FRACTION) - 1, "stream")):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d=None, t=total: SimpleNamespace(total_memory=t))
        assert eval_placement(model, "cuda:0") == "whole"  # evaluation would take it whole either way
        assert diagnostics_placement(model, "cuda:0") == want, total
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None: (size // 2, 100 * size))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d=None: SimpleNamespace(total_memory=100 * size))
    assert diagnostics_placement(model, "cuda") == "stream"  # it does not fit at all


def test_bad_placement_is_one_clear_error(models):
    model, _ = models["tiny-random-llama"]
    with pytest.raises(evaluate.AwqnbError, match="placement"):
        token_perplexity(model, torch.arange(200), seqlen=64, placement="gpu", progress=False)


def test_runner_evaluates_streamed_when_the_model_does_not_fit(models, monkeypatch):
    """The comparison runner asks `eval_placement`; told 'stream', it leaves the model where it is
    and the results equal the whole-model run's."""
    from awqnb.compare import runner

    model, tok = models["tiny-random-llama"]
    tokens = torch.randint(0, model.config.vocab_size, (64 * 3,), generator=torch.Generator().manual_seed(3))
    data = {"toks": tokens, "texts": TEXTS[:4]}
    kw = dict(tokenizer=tok, seeds=1, datasets=data, eval_seqlen=64, sample_max_length=64, progress=False)
    whole = runner.run_comparison(model, ["fp"], **kw)
    moved = []
    monkeypatch.setattr(runner, "eval_placement", lambda m, dev, dtype=None: "stream")
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    streamed = runner.run_comparison(model, ["fp"], **kw)
    assert not moved  # the model was never moved as a whole
    for ds in data:
        a, b = whole.runs[0].results[ds], streamed.runs[0].results[ds]
        assert a.meta["placement"] == "whole" and b.meta["placement"] == "stream"
        torch.testing.assert_close(torch.tensor(b.nll), torch.tensor(a.nll), rtol=1e-6, atol=1e-6)
