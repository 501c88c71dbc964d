"""The block engine: what a block sees, where weights live, compute dtype, the exact bf16 Gemma fold."""
import copy

import pytest
import torch

from awqnb.quant import pipeline
from awqnb.model.arch import attn_shape, blocks, get_module, resolve_spec
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.analysis.salience import salience_table
from awqnb.engine.walk import BlockEngine, onloaded
from awqnb.core.dtypes import fp32_names, mark_fp32
from awqnb.core.errors import AwqnbError
from awqnb.quant.methods.awq import fold_scales
from awqnb.model.devices import cast_parameters

from conftest import TINY  # noqa: E402


def _fresh(tiny, name):
    model, tok, calib = tiny[name]
    return copy.deepcopy(model), tok, calib


@pytest.mark.parametrize("name", TINY)
def test_walk_sees_what_the_model_computes(tiny, name):
    """Each block's input in an FP walk equals the model's own hidden state entering it."""
    model, _, calib = _fresh(tiny, name)
    ids = torch.stack(calib.samples[:4])
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    engine = BlockEngine(model, calib.samples[:4], batch_size=2)
    seen = []
    for step in engine.walk():
        outs = step.forward()
        step.next_hidden = outs
        seen.append(torch.cat(step.hidden, 0))
    assert len(seen) == len(blocks(model, resolve_spec(model)))
    for j, h in enumerate(seen):
        torch.testing.assert_close(h, ref[j], rtol=1e-5, atol=1e-5)
    assert all("forward" not in b.__dict__ for b in blocks(model, resolve_spec(model)))


def test_walk_stops_after_the_last_requested_block(tiny):
    model, _, calib = _fresh(tiny, "tiny-random-llama")
    calls = []
    bl = blocks(model, resolve_spec(model))
    hooks = [b.mlp.register_forward_hook(lambda m, a, o, j=j: calls.append(j)) for j, b in enumerate(bl)]
    try:
        got = [s.index for s in BlockEngine(model, calib.samples[:2], batch_size=2).walk([1])]
    finally:
        for h in hooks:
            h.remove()
    assert got == [1]
    assert calls == [0]  # block 0 ran once to reach block 1 (the capture runs no block); nothing after


def test_onload_casts_and_restores_dtypes_and_devices(tiny):
    model, _, calib = _fresh(tiny, "tiny-random-gemma3")
    block = blocks(model, resolve_spec(model))[0]
    ln = get_module(block, "input_layernorm")
    norm = ln.weight
    before = {n: (p.dtype, p.device) for n, p in block.named_parameters()}
    with onloaded(block, "cpu", torch.bfloat16):
        assert get_module(block, "self_attn.q_proj").weight.dtype == torch.bfloat16
        mark_fp32(ln)  # what the Gemma fold does while the block is loaded
    after = {n: (p.dtype, p.device) for n, p in block.named_parameters()}
    assert after == before  # back in float32 (this model's own dtype)
    # a bf16 model: the marked norm stays float32 after offload, the rest returns to bf16
    cast_parameters(model, torch.bfloat16)
    assert norm.dtype == torch.float32 and "input_layernorm.weight" in fp32_names(block)
    with onloaded(block, "cpu", torch.bfloat16):
        assert norm.dtype == torch.float32
    assert get_module(block, "self_attn.q_proj").weight.dtype == torch.bfloat16 and norm.dtype == torch.float32


def test_fp32_mark_survives_deepcopy(tiny):
    """A copy of a quantized Gemma (runner, sensitivity bench) must keep its folded norms float32 when
    cast for evaluation: the mark lived on the Parameter once, and deepcopy dropped it."""
    model, _, _ = _fresh(tiny, "tiny-random-gemma3")
    ln = get_module(blocks(model, resolve_spec(model))[0], "input_layernorm")
    mark_fp32(ln)
    twin = copy.deepcopy(model)
    cast_parameters(twin, torch.bfloat16)
    twin_ln = get_module(blocks(twin, resolve_spec(twin))[0], "input_layernorm")
    assert twin_ln.weight.dtype == torch.float32
    assert get_module(blocks(twin, resolve_spec(twin))[0], "post_attention_layernorm").weight.dtype == torch.bfloat16


def test_rope_frequencies_are_never_cast(tiny):
    model, _, calib = _fresh(tiny, "tiny-random-llama")
    inv = model.model.rotary_emb.inv_freq.clone()
    pipeline.quantize(model, MethodConfig("awq", QuantConfig(4, 32), SearchConfig(n_grid=2), dtype="bfloat16",
                                          calib_batch_size=2), calib, progress=False)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, inv)


def test_diagnostics_and_quantizer_see_the_same_inputs(tiny):
    """With FP propagation, the salience the quantizer searched with at block 1 equals the
    diagnostics' salience table for block 1: one walk, one view of what a block saw."""
    model, _, calib = _fresh(tiny, "tiny-random-llama")
    table = salience_table(copy.deepcopy(model), calib, layers=[1], batch_size=2, cache=False)
    cfg = MethodConfig("awq", QuantConfig(4, 32), SearchConfig(n_grid=2, propagate="fp"), calib_batch_size=2)
    res = pipeline.quantize(model, cfg, calib, progress=False)
    got = res.layers[1].groups["qkv"].salience
    want = torch.tensor(table.query("group == 'qkv'").sort_values("channel")["l2"].to_numpy())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


def test_bf16_search_matches_fp32_search(tiny):
    """Search forwards in bf16 (fp32 sums) give the same α→loss curves as fp32 up to bf16 noise."""
    fp, _, calib = _fresh(tiny, "tiny-random-llama")
    cfg = MethodConfig("awq", QuantConfig(4, 32), SearchConfig(n_grid=10), calib_batch_size=2)
    r32 = pipeline.quantize(copy.deepcopy(fp), cfg, calib, progress=False)
    m16 = copy.deepcopy(fp)
    r16 = pipeline.quantize(m16, MethodConfig(**{**vars(cfg), "dtype": "bfloat16"}), calib, progress=False)
    c32, c16 = r32.curves(), r16.curves()
    rel = ((c16.loss - c32.loss).abs() / c32.loss)
    first = rel[c32.layer == 0].to_numpy()  # block 0 sees the same inputs in both runs
    assert first.max() < 0.1, first.max()  # bf16 weights and attention: a few % on a tiny model
    assert rel.median() < 0.05, rel.median()  # later blocks see slightly different quantized inputs
    assert r16.timings["compute_dtype"] == "bfloat16" and r32.timings["compute_dtype"] == "float32"
    assert r16.metadata()["config"]["dtype"] == "bfloat16"
    # the model keeps its storage dtype: float32 here, with bf16-computed choices folded in
    assert all(p.dtype == torch.float32 for p in m16.parameters())


def test_gemma_offset_norm_fold_is_exact_in_bf16(tiny):
    """(1+w)/s − 1 written into a bf16 weight loses the gain (6% at s = 16, all of it at s ≥ 256);
    the fold keeps the norm in float32, so (1 + w') · s = 1 + w and the bf16 block is unchanged."""
    model, _, calib = _fresh(tiny, "tiny-random-gemma3")
    cast_parameters(model, torch.bfloat16)
    spec, attn = resolve_spec(model), attn_shape(model.config)
    block = blocks(model, spec)[0]
    group = next(g for g in spec.groups if g.name == "qkv")
    norm = get_module(block, group.prev_op).weight
    h = torch.randn(2, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    hidden, kwargs = BlockEngine(model, calib.samples[:2], batch_size=2).capture()
    kw = kwargs[0][0]
    kw = {k: (tuple(t[:, :16] for t in v) if k == "position_embeddings" else v) for k, v in kw.items()
          if k in ("position_embeddings",)}
    with torch.no_grad():
        ref = block(h, **kw)
    gain = 1.0 + norm.detach().double().clone()
    s = torch.logspace(0, 9, gain.numel(), base=2.0)[torch.randperm(gain.numel(), generator=torch.Generator().manual_seed(1))]
    # the flaw being avoided: the same fold stored in bf16
    naive = ((gain.float() / s - 1.0).to(torch.bfloat16).double() + 1.0) * s
    assert ((naive - gain).abs() / gain.abs()).max() > 0.05
    fold_scales(block, group, s, spec, attn)
    assert norm.dtype == torch.float32
    # fp32 keeps (1+w)/s to ~1e-7 absolute: ~1e-5 relative at s = 512
    torch.testing.assert_close((1.0 + norm.detach().double()) * s, gain, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        out = block(h, **kw)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 2e-2, err  # bf16 rounding of W·s only


def test_out_of_memory_names_the_block_and_the_option(tiny, monkeypatch):
    from awqnb.engine import walk as E

    model, _, calib = _fresh(tiny, "tiny-random-llama")

    def boom(module, device, dtype, home=None, ready=None):
        if home is None:
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(E, "_move", boom)
    with pytest.raises(AwqnbError, match="offload-activations"):
        with onloaded(blocks(model, resolve_spec(model))[0], "cpu"):
            pass


def test_compute_dtype_is_validated():
    with pytest.raises(AwqnbError, match="dtype"):
        MethodConfig("awq", dtype="int8")


def test_loading_in_bf16_keeps_rope_frequencies_fp32():
    from awqnb.model.loading import load_model

    model, _ = load_model("tiny-random-llama", dtype="bfloat16")
    assert get_module(blocks(model, resolve_spec(model))[0], "self_attn.q_proj").weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("lbs", [1, 2])
def test_quantized_propagation_feeds_each_batch_the_quantized_outputs(tiny, lbs):
    """propagate='quantized' with layer_batch_size k: the first block of each batch sees the
    outputs of the already-quantized blocks before it; the others of a batch see FP outputs."""
    fp, _, calib = _fresh(tiny, "tiny-random-llama")
    assert len(blocks(fp, resolve_spec(fp))) >= 2
    q = copy.deepcopy(fp)
    cfg = MethodConfig("awq", QuantConfig(4, 32), SearchConfig(n_grid=2), calib_batch_size=2, layer_batch_size=lbs)
    res = pipeline.quantize(q, cfg, calib, progress=False)
    for j in (1,):  # lbs 1: block 0 quantized before it; lbs 2: same batch, block 0 FP
        quantized_before = j - (j % lbs)  # blocks before the batch holding j are quantized
        hybrid = copy.deepcopy(fp)
        for i in range(quantized_before):
            blocks(hybrid, resolve_spec(hybrid))[i].load_state_dict(blocks(q, resolve_spec(q))[i].state_dict())
        table = salience_table(hybrid, calib, layers=[j], batch_size=2, cache=False)
        want = torch.tensor(table.query("group == 'qkv'").sort_values("channel")["l2"].to_numpy()).float()
        torch.testing.assert_close(res.layers[j].groups["qkv"].salience, want, rtol=1e-5, atol=1e-6)
        if quantized_before:  # the check can tell the two apart: FP inputs give another salience
            fp_table = salience_table(copy.deepcopy(fp), calib, layers=[j], batch_size=2, cache=False)
            other = torch.tensor(fp_table.query("group == 'qkv'").sort_values("channel")["l2"].to_numpy()).float()
            assert (other - want).abs().max() > 1e-4


def test_out_of_memory_in_the_search_is_one_clear_error(tiny, monkeypatch):
    fp, _, calib = _fresh(tiny, "tiny-random-llama")

    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    from awqnb.quant.methods import awq

    monkeypatch.setattr(awq, "search_group", oom)  # the AWQ scaler's search
    with pytest.raises(AwqnbError, match=r"quantizing block 0 .*offload-activations"):
        pipeline.quantize(fp, MethodConfig("awq", QuantConfig(4, 32)), calib, progress=False)
    assert all("forward" not in b.__dict__ for b in blocks(fp, resolve_spec(fp)))


def test_block_errors_say_where_the_error_enters(tiny):
    fp, _, calib = _fresh(tiny, "tiny-random-llama")
    cfg = MethodConfig("awq", QuantConfig(4, 32), SearchConfig(n_grid=2), calib_batch_size=2)
    res = pipeline.quantize(copy.deepcopy(fp), cfg, calib, progress=False)
    err = res.block_errors()
    assert list(err.layer) == list(range(len(res.layers)))
    assert (err.rel_err > 0).all() and (err.rel_err < 1).all()
    cfg3 = MethodConfig("awq", QuantConfig(3, 32), SearchConfig(n_grid=2), calib_batch_size=2)
    err3 = pipeline.quantize(copy.deepcopy(fp), cfg3, calib, progress=False).block_errors()
    assert err3.rel_err.iloc[0] > err.rel_err.iloc[0]  # 3 bits hurt block 0 more than 4 bits
    assert res.metadata()["layers"][0]["evidence"]["block_rel_err"] == err.rel_err.iloc[0]


def _deep_llama(n_layers: int):
    """A tiny Llama of `n_layers` blocks with eager attention: its causal mask is a real float
    tensor, so a compute dtype other than the model's makes the engine cast it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _walk_peak(n_layers: int, mode: str) -> tuple[int, int]:
    """(peak bytes allocated over a float64 walk of a float32 model above what was allocated
    before it, bytes of one block in float64), from the CPU allocator's own events (the
    profiler's memory records: every allocation and free, transients included). The model is
    built inside the profile so that the frees of its weights moved home are seen too."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = _deep_llama(n_layers)
        samples = [torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
        with record_function("awqnb-walk"):
            engine = BlockEngine(model, samples, "cpu", torch.float64, batch_size=2)
            if mode == "walk":
                for _ in engine.walk():
                    pass
            else:
                out = engine.outputs()
                assert len(out) == 2 and out[0].dtype == torch.float64
    events = list(prof.profiler.kineto_results.events())
    walk = next(e for e in events if e.name() == "awqnb-walk")
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    cur = peak = 0
    for t, nbytes in mem:
        if walk.start_ns() <= t <= walk.end_ns():
            cur += nbytes
            peak = max(peak, cur)
    block = sum(p.numel() for p in engine.blocks[0].parameters()) * 8
    return peak, block


@pytest.mark.parametrize("mode", ["walk", "outputs"])
def test_walk_memory_does_not_grow_with_depth(mode):
    """Peak bytes allocated during a walk in a compute dtype other than the model's (so the
    keyword tensors are cast) are the same for 4 and 16 blocks: the casts are shared across
    blocks and a finished block's kwargs, weights and activations are freed. (Before the fix:
    1.96 MB for 4 blocks, 3.93 MB for 16.)"""
    p4, block = _walk_peak(4, mode)
    p16, _ = _walk_peak(16, mode)
    assert p4 > 0
    assert p16 <= p4 + block, (p4, p16, block)


def test_keyword_tensors_are_cast_once_and_shared(tiny):
    """Every block of a layer type gets the very same cast tensors (one copy per chunk and type)."""
    model, _, calib = _fresh(tiny, "tiny-random-gemma3")
    _, kwargs = BlockEngine(model, calib.samples[:2], dtype=torch.float64, batch_size=2).capture()
    types = model.config.layer_types
    for kw in kwargs:
        cos = {}
        for j, k in enumerate(kw):
            c = k["position_embeddings"][0]
            assert c.dtype == torch.float64
            assert cos.setdefault(types[j], c) is c  # the same tensor object for the same type
        assert cos["sliding_attention"] is not cos["full_attention"]


def test_a_cast_walk_that_only_reads_leaves_the_model_exact(tiny):
    """A walk in another compute dtype (bf16 over a float32 model: a deep dive's or sensitivity's
    capture with --dtype bfloat16) must not round the model it reads; a quantizing walk (writes)
    brings its blocks home cast back."""
    from awqnb.analysis.layer_local import capture_layer_inputs

    model, _, calib = tiny["tiny-random-llama"]
    model = copy.deepcopy(model)
    assert next(model.parameters()).dtype == torch.float32
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hidden, _ = capture_layer_inputs(model, calib, 1, "cpu", dtype=torch.bfloat16)
    assert hidden[0].dtype == torch.bfloat16
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    block = blocks(model, resolve_spec(model))[0]
    with onloaded(block, "cpu", torch.bfloat16, writes=True):
        assert block.self_attn.q_proj.weight.dtype == torch.bfloat16
    w = block.self_attn.q_proj.weight
    assert w.dtype == torch.float32 and torch.equal(w, before["model.layers.0.self_attn.q_proj.weight"].bfloat16().float())


def _walk_writes(model, calib, prefetch, touch_next=False):
    """A quantizer-like walk in bf16 over a float32 model: each block's q_proj is halved while
    it is worked on; with `touch_next`, block j+1's k_proj is replaced during step j (after the
    engine began prefetching it)."""
    engine = BlockEngine(model, calib.samples[:4], dtype=torch.bfloat16, batch_size=2, writes=True,
                         prefetch=prefetch)
    bl = blocks(model, resolve_spec(model))
    for step in engine.walk():
        assert step.block.self_attn.q_proj.weight.dtype == torch.bfloat16
        step.block.self_attn.q_proj.weight.data.mul_(0.5)
        if touch_next and step.index + 1 < len(bl):
            nxt = bl[step.index + 1].self_attn.k_proj.weight
            nxt.data = nxt.data + 1.0
        step.next_hidden = step.forward()
    return engine


@pytest.mark.parametrize("touch_next", [False, True])
def test_prefetch_changes_nothing_a_walk_computes(tiny, touch_next, monkeypatch):
    """With prefetch (block j+1 made ready while block j is worked on, block j sent home in the
    background) a writing walk leaves the model exactly as without it, also when a consumer
    replaces a tensor of the next block after its prefetch began (that tensor is moved again)."""
    from awqnb.engine import walk as E

    model, _, calib = _fresh(tiny, "tiny-random-llama")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    _walk_writes(a, calib, prefetch=False, touch_next=touch_next)
    taken, take = [], E.Prefetch.take

    def counting(self, module):
        got = take(self, module)
        taken.append(len(got))
        return got

    monkeypatch.setattr(E.Prefetch, "take", counting)
    engine = _walk_writes(b, calib, prefetch=True, touch_next=touch_next)
    assert sum(taken) > 0  # the prefetched tensors were used
    assert engine._prefetch is None  # closed: no worker left running
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert p.dtype == q.dtype == torch.float32 and p.device == q.device, n
        assert torch.equal(p, q), n


def test_prefetch_in_a_reading_walk_leaves_the_model_exact(tiny):
    model, _, calib = _fresh(tiny, "tiny-random-llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = BlockEngine(model, calib.samples[:4], dtype=torch.bfloat16, batch_size=2, prefetch=True)
    ref = BlockEngine(copy.deepcopy(model), calib.samples[:4], dtype=torch.bfloat16, batch_size=2,
                      prefetch=False).outputs()
    out = engine.outputs()
    assert all(torch.equal(x, y) for x, y in zip(out, ref))
    assert all(torch.equal(p, before[n]) and p.dtype == torch.float32 for n, p in model.named_parameters())


def test_prefetch_keeps_quantization_bit_exact(tiny, monkeypatch):
    """awq through the pipeline with the engine's prefetch forced on (it is on by default only on
    a GPU): the same weights and records as without."""
    import awqnb.engine.walk as walk

    model, _, calib = _fresh(tiny, "tiny-random-llama")
    cfg = MethodConfig("awq", QuantConfig(4, 32), SearchConfig(n_grid=4), calib_batch_size=2, dtype="bfloat16")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = pipeline.quantize(a, cfg, calib, progress=False)
    orig = walk.BlockEngine.__init__

    def forced(self, *args, **kw):
        kw["prefetch"] = True
        orig(self, *args, **kw)

    monkeypatch.setattr(walk.BlockEngine, "__init__", forced)
    rb = pipeline.quantize(b, cfg, calib, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [r.groups.keys() for r in ra.layers] == [r.groups.keys() for r in rb.layers]
    assert [g.best_alpha for r in ra.layers for g in r.groups.values()] == \
        [g.best_alpha for r in rb.layers for g in r.groups.values()]
