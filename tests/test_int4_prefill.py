"""The INT4 runtime's prefill path (awqnb.export.int4): above `prefill_rows` rows a gemlite or
nibble Int4Linear dequantizes its one packed copy (one fused kernel where compiled) and runs
F.linear; gemlite's layout read without gemlite (packed here as gemlite packs it); a packed lm_head
loads as an Int4Linear. The compiled kernel is checked on the CPU (inductor's C++ backend) where a
compiler is present, on CUDA with gemlite otherwise."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.export import int4
from awqnb.export import packed as export
from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig


def _codes(n, k, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen)
    s = (torch.rand(n, -(-k // g), generator=gen) * 0.02 + 0.005).bfloat16()  # bf16 scales, as held
    z = torch.randint(0, 16, (n, -(-k // g)), generator=gen)
    return q, s, z


def _dense_bf16(q, s, z, g):
    """The dequantized weight [N, K]: (q − z)·s exact in float32, rounded to bf16 once."""
    k = q.shape[1]
    return ((q.float() - z.float().repeat_interleave(g, 1)[:, :k]) * s.float().repeat_interleave(g, 1)[:, :k]).bfloat16()


def _gemlite_pack(q, s, z):
    """gemlite 0.6's layout (GemLiteLinear.pack, 4 bits, packing_bitwidth 32, (q − z)·s mode): codes
    packed over K, 8 per int32 word (code 8c + i at bits 4i of word c), transposed to [K/8, N];
    scales and zeros [K/g, N]."""
    n, k = q.shape
    w = torch.zeros(n, k // 8, dtype=torch.int32)
    for j in range(8):
        w |= q[:, j::8].to(torch.int32) << (4 * j)
    return w.t().contiguous(), s.t().contiguous(), z.to(s.dtype).t().contiguous()


class _FakeGemlite(nn.Module):
    """Holds gemlite's tensors and mode fields; its own matmul (the small-M path) counts calls."""

    def __init__(self, q, s, z, mode=3):
        super().__init__()
        w_q, sc, ze = _gemlite_pack(q, s, z)
        self.W_q, self.scales, self.zeros = nn.Parameter(w_q, False), nn.Parameter(sc, False), nn.Parameter(ze, False)
        self.W_group_mode, self.elements_per_sample, self.calls = mode, 8, 0
        self.group = q.shape[1] // sc.shape[0]

    def forward(self, x):
        self.calls += 1
        return x @ int4.gemlite_dense(self.W_q, self.scales, self.zeros, self.group, self.W_group_mode == 4)


def _gemlite_module(q, s, z, g, bias=None):
    n, k = q.shape
    mod = int4.Int4Linear(k, n, g, "gemlite", "cpu", torch.bfloat16)
    mod.kernel_group, mod.gl = g, _FakeGemlite(q, s, z)
    if bias is not None:
        mod.bias = nn.Parameter(bias.bfloat16(), requires_grad=False)
    return mod


def _compiles_here() -> str | None:
    """None if torch.compile runs on this CPU (inductor needs a C++ compiler), else why not."""
    try:
        torch.compile(lambda t: t * 2, dynamic=False, fullgraph=True)(torch.ones(4))
    except Exception as e:  # noqa: BLE001
        return f"torch.compile on CPU: {type(e).__name__}"
    return None


@pytest.mark.parametrize("n,k,g", [(48, 256, 128), (64, 512, 32)])
def test_gemlite_layout_dequantizes_to_the_bf16_weight(n, k, g):
    """Eager ops on gemlite's packed layout give the dequantized weight exactly (bf16), as Wᵀ [K, N];
    fma mode (zeros stored as −z·s) gives it to bf16 rounding."""
    q, s, z = _codes(n, k, g)
    w_q, sc, ze = _gemlite_pack(q, s, z)
    want = _dense_bf16(q, s, z, g)
    got = int4.gemlite_dense(w_q, sc, ze, g)
    assert got.shape == (k, n) and got.dtype == torch.bfloat16
    assert torch.equal(got.t(), want)
    fma = int4.gemlite_dense(w_q, sc, (-ze.float() * sc.float()).bfloat16(), g, fma=True)
    torch.testing.assert_close(fma.t().float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * want.float().abs().max())


def test_nibble_layout_dequantizes_to_the_bf16_weight():
    """The nibble copy (a 'dequant' linear) of an odd K with a shorter last group (K=96, g64)."""
    q, s, z = _codes(40, 96, 64)
    mod = int4.Int4Linear.from_codes(q, s.float(), z, 64, dtype=torch.bfloat16, kernel="dequant")
    assert mod.prefill_layout() == "nibbles"
    assert torch.equal(mod.prefill_weight(), _dense_bf16(q, s, z, 64))


def test_prefill_rows_switches_to_dequant_and_linear():
    """Above prefill_rows a gemlite linear runs F.linear on the weight read from its one packed copy
    (gemlite's own matmul not called); at or below, gemlite's. None keeps gemlite at every M."""
    n, k, g = 64, 256, 64
    q, s, z = _codes(n, k, g)
    bias = torch.randn(n)
    mod = _gemlite_module(q, s, z, g, bias)
    assert mod.prefill_rows == int4.PREFILL_ROWS == 128 and mod.prefill_layout() == "gemlite"
    assert {name for name, _ in mod.named_buffers()} | {name for name, _ in mod.named_parameters()} == \
        {"gl.W_q", "gl.scales", "gl.zeros", "bias"}  # one packed copy, nothing dense
    w = _dense_bf16(q, s, z, g)
    x = torch.randn(2, 100, k).bfloat16()  # 200 rows
    y = mod(x)
    assert mod.gl.calls == 0 and y.shape == (2, 100, n)
    assert torch.equal(y, F.linear(x, w, bias.bfloat16()))
    mod(x[:1])  # 100 rows ≤ 128
    assert mod.gl.calls == 1
    mod.prefill_rows = None
    mod(x)
    assert mod.gl.calls == 2
    exact = (q.float() - z.float().repeat_interleave(g, 1)) * s.float().repeat_interleave(g, 1)
    assert torch.equal(mod.dequantized_weight(), exact)  # float32, not rounded to bf16


def test_torch_kernel_keeps_its_kernel_at_every_m():
    """torch's tiled int4pack is not read back: no prefill path, the kernel runs above the threshold."""
    q, s, z = _codes(64, 256, 64)
    mod = int4.Int4Linear.from_codes(q, s.float(), z, 64, dtype=torch.bfloat16)
    assert mod.kernel == "torch" and mod.prefill_layout() is None
    x = torch.randn(300, 256).bfloat16()
    ref = x.float() @ _dense_bf16(q, s, z, 64).float().t()
    assert ((mod(x).float() - ref).norm() / ref.norm()) < 8e-3


@pytest.mark.skipif(_compiles_here() is not None, reason="no torch.compile on this CPU")
def test_compiled_dequant_is_one_kernel_equal_to_eager(monkeypatch):
    """torch.compile (inductor's C++ backend here, Triton on CUDA) of the gemlite-layout dequantization:
    one generated kernel, bit-equal to the eager ops; compiled once per shape (a second call reuses it)."""
    from torch._inductor import metrics

    q, s, z = _codes(32, 256, 64, seed=3)
    mod = _gemlite_module(q, s, z, 64)
    monkeypatch.setattr(int4, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(int4, "_COMPILED", {})
    monkeypatch.setattr(int4, "_COMPILE_STATE", {"broken": None})
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # count the kernels generated
    metrics.reset()
    w = mod.prefill_weight()
    assert metrics.generated_kernel_count == 1 and len(int4._COMPILED) == 1
    assert int4._COMPILE_STATE["broken"] is None
    assert torch.equal(w, _dense_bf16(q, s, z, 64))
    x = torch.randn(200, 256).bfloat16()
    assert torch.equal(mod(x), F.linear(x, w)) and len(int4._COMPILED) == 1 and mod.gl.calls == 0


def test_failed_compile_falls_back_to_eager_with_one_line(monkeypatch, caplog):
    """A compile that fails (here: torch.compile raising) logs one warning; every call runs eager ops."""
    q, s, z = _codes(40, 96, 64)
    mod = int4.Int4Linear.from_codes(q, s.float(), z, 64, dtype=torch.bfloat16, kernel="dequant")

    def broken(*a, **k):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(int4, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(int4, "_COMPILED", {})
    monkeypatch.setattr(int4, "_COMPILE_STATE", {"broken": None})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    x = torch.randn(300, 96).bfloat16()
    with caplog.at_level("WARNING", logger="awqnb.export.int4"):
        a, b = mod(x), mod(x)
    warns = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warns) == 1 and "no compiler here" in warns[0] and "second line" not in warns[0]
    assert torch.equal(a, F.linear(x, _dense_bf16(q, s, z, 64))) and torch.equal(a, b)


def test_load_int4_prefill_rows_and_packed_lm_head(tiny, tmp_path):
    """A packed lm_head (allow_unservable: vLLM does not load it) loads as an Int4Linear beside the
    block linears; logits equal the fake-quant model's (float32, CPU) with the prefill path on and
    off; prefill_rows reaches every Int4Linear and a bad value is one line."""
    fp, tok, calib = tiny["tiny-random-llama"]
    m = copy.deepcopy(fp)
    cfg = MethodConfig("rtn", QuantConfig(4, 32), SearchConfig(n_grid=4), lm_head="quantize")
    res = pipeline.quantize(m, cfg, None, progress=False)
    with pytest.raises(AwqnbError, match="lm_head"):
        export.save_packed(m, tok, tmp_path / "refused", cfg, res.metadata())
    d = export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata(), allow_unservable=True)
    ids = torch.stack(calib.samples[:2])  # 2 × 64 = 128 rows
    with torch.no_grad():
        want = m(ids).logits
    for rows in (None, 16):
        r, _ = int4.load_int4(d, device="cpu", kernel="dequant", prefill_rows=rows)
        head = r.get_output_embeddings()
        assert isinstance(head, int4.Int4Linear) and head.out_features == fp.config.vocab_size
        assert r.get_input_embeddings().weight.dtype == torch.float32  # the embedding stays dense
        s = int4.int4_summary(r)
        assert s["int4_linears"] == 15 and s["prefill_dequant"] == (0 if rows is None else 15)
        assert all(x.prefill_rows == rows for x in r.modules() if isinstance(x, int4.Int4Linear))
        with torch.no_grad():
            got = r(ids).logits
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with pytest.raises(AwqnbError, match="prefill_rows"):
        int4.load_int4(d, prefill_rows=-1)


def _gemlite_ready():
    if not torch.cuda.is_available():
        return "no CUDA device"
    return int4.gemlite_import()[1]


@pytest.mark.skipif(_gemlite_ready() is not None, reason=f"gemlite prefill test: {_gemlite_ready()}")
@pytest.mark.parametrize("n,k,gs", [(512, 1024, 128), (384, 512, -1)])
def test_gemlite_prefill_on_cuda_reads_gemlite_packing(n, k, gs):
    """CUDA + gemlite only: the compiled (Triton) dequantization of gemlite's own packing equals the
    bf16 dequantized weight exactly, and the prefill output equals F.linear with it."""
    q, s, z = _codes(n, k, k if gs == -1 else gs)
    mod = int4.Int4Linear.from_codes(q, s.float(), z, gs, dtype=torch.bfloat16, device="cuda", kernel="gemlite")
    assert mod.prefill_layout() == "gemlite"
    w = mod.prefill_weight()
    st = int4.compile_status()
    assert st["failed"] is None and st["compiled"] >= 1, st  # one Triton kernel from inductor, not eager ops
    assert torch.equal(w.cpu(), _dense_bf16(q, s, z, k if gs == -1 else gs))
    x = torch.randn(256, k, device="cuda").bfloat16()
    assert torch.equal(mod(x), F.linear(x, w))


def test_gemlite_borrows_the_nearest_tuned_config_for_an_untuned_shape(monkeypatch):
    """A shape missing from gemlite's autotune file (an lm_head's N) takes, per matmul type and M
    bucket, the configs of the nearest tuned N with the same K and group; tuned shapes and other
    K / groups are left alone; once per shape. (A stand-in `gemlite.core`: gemlite needs CUDA.)"""
    import sys
    import types

    def sig(m, n, k, g):
        return str((m, n, k, g, 8, 104))

    cache = {"GEMV_REVSPLITK": {sig(1, 14336, 4096, 128): {"BLOCK_SIZE_N": 256}, sig(1, 4096, 4096, 128): {"x": 1}},
             "GEMM_SPLITK": {sig(8, 14336, 4096, 128): {"BLOCK_SIZE_N": 64}, sig(8, 28672, 4096, 128): {"y": 2},
                             sig(8, 14336, 4096, 64): {"z": 3}},
             "GEMM": {sig(2048, 128256, 4096, 128): {"tuned": True}}}
    core = types.ModuleType("gemlite.core")
    core.GEMLITE_TRITON_CONFIG_CACHE = cache
    pkg = types.ModuleType("gemlite")
    pkg.core = core
    monkeypatch.setitem(sys.modules, "gemlite", pkg)
    monkeypatch.setitem(sys.modules, "gemlite.core", core)
    monkeypatch.setattr(int4, "_GEMLITE", {})
    assert int4.gemlite_borrow_config(128256, 4096, 128) == {"GEMV_REVSPLITK": 14336, "GEMM_SPLITK": 28672}
    assert cache["GEMV_REVSPLITK"][sig(1, 128256, 4096, 128)] == {"BLOCK_SIZE_N": 256}  # 14336 nearer than 4096
    assert cache["GEMM_SPLITK"][sig(8, 128256, 4096, 128)] == {"y": 2}  # 28672 nearer than 14336
    assert sig(8, 128256, 4096, 64) not in cache["GEMM_SPLITK"]  # another group is not this shape's
    assert cache["GEMM"] == {sig(2048, 128256, 4096, 128): {"tuned": True}}  # tuned already: untouched
    cache["GEMV_REVSPLITK"][sig(1, 128256, 4096, 128)]["BLOCK_SIZE_N"] = 512
    assert cache["GEMV_REVSPLITK"][sig(1, 14336, 4096, 128)] == {"BLOCK_SIZE_N": 256}  # a copy, not shared
    cache["GEMV_REVSPLITK"].pop(sig(1, 128256, 4096, 128))
    int4.gemlite_borrow_config(128256, 4096, 128)  # once per shape: not redone
    assert sig(1, 128256, 4096, 128) not in cache["GEMV_REVSPLITK"]
    assert int4.gemlite_borrow_config(4096, 11008, 128) == {}  # no config for this K
    monkeypatch.setattr(int4, "GEMLITE_BORROW", False)
    assert int4.gemlite_borrow_config(1024, 4096, 128) == {} and sig(8, 1024, 4096, 128) not in cache["GEMM_SPLITK"]
