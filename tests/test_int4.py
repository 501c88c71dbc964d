"""The INT4 runtime (awqnb.export.int4): codes unpacked from compressed-tensors' packing, Int4Linear on
torch's CPU int4 kernel against the dequantized dense linear, and packed directories loaded as INT4:
same logits and perplexity as the fake-quant model, no dense weight kept for the quantized linears."""
import copy
import json
import logging

import pytest
import torch
from torch import nn

from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.export import int4
from awqnb.export import packed as export
from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig

FAST = SearchConfig(n_grid=4)


def _codes(n, k, gs, bits=4, seed=0, sym=False):
    g = torch.Generator().manual_seed(seed)
    top = 2 ** bits - 1
    q = torch.randint(0, top + 1, (n, k), generator=g)
    ng = -(-k // (k if gs == -1 else gs))
    scale = torch.rand(n, ng, generator=g) * 0.02 + 0.005
    zero = None if sym else torch.randint(0, top + 1, (n, ng), generator=g)
    return q, scale, zero


def _dense(q, scale, zero, gs):
    k = q.shape[1]
    g = k if gs == -1 else gs
    z = 8.0 if zero is None else zero.float().repeat_interleave(g, 1)[:, :k]
    return (q.float() - z) * scale.repeat_interleave(g, 1)[:, :k]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_unpack_int32_inverts_compressed_tensors_packing(bits, dim):
    """Our unpacking of compressed-tensors' int32 words gives back every code it packed (lengths that
    do and do not fill whole words, fields straddling words at 3 bits)."""
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for shape in [(16, 96), (24, 37), (8, 5)]:
        v = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
        packed = pack_to_int32(v, bits, packed_dim=dim)
        got = int4.unpack_int32(packed, bits, shape[dim], dim=dim) - 2 ** (bits - 1)
        assert got.shape == v.shape and torch.equal(got.to(torch.int8), v), (bits, dim, shape)


@pytest.mark.parametrize("n,k,gs,sym", [(64, 256, 32, False), (80, 160, 32, False), (48, 512, 128, False),
                                         (32, 256, 256, True), (32, 160, -1, False), (16, 384, -1, True)])
def test_int4_linear_matches_dequantized_linear_float32(n, k, gs, sym):
    """On the CPU kernel in float32, y = x Wᵀ + b with W = (q − z)·s to float rounding
    (per channel runs as kernel groups of 32/128 with the scale repeated)."""
    q, scale, zero = _codes(n, k, gs, sym=sym)
    if sym:
        q = q.clamp(1, 15)  # a symmetric code: q − 8 in [−7, 7]
    bias = torch.randn(n)
    mod = int4.Int4Linear.from_codes(q, scale, zero, gs, bias, dtype=torch.float32)
    assert mod.kernel == "torch" and not hasattr(mod, "weight")
    w = _dense(q, scale, zero, gs)
    x = torch.randn(3, 5, k)
    want = x @ w.t() + bias
    torch.testing.assert_close(mod(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.dequantized_weight(), w, rtol=1e-6, atol=1e-6)


def test_int4_linear_bfloat16_within_bf16_rounding():
    """bf16: the relative error against the float32 product of the same codes is bf16's (≈ 2⁻⁸), and
    no worse than the dense bf16 linear's own."""
    n, k, gs = 256, 512, 64
    q, scale, zero = _codes(n, k, gs)
    w = _dense(q, scale, zero, gs)
    mod = int4.Int4Linear.from_codes(q, scale, zero, gs, dtype=torch.bfloat16)
    x = torch.randn(7, k)
    ref = x @ w.t()
    err = (mod(x.bfloat16()).float() - ref).norm() / ref.norm()
    dense = (nn.functional.linear(x.bfloat16(), w.bfloat16()).float() - ref).norm() / ref.norm()
    assert mod(x.bfloat16()).dtype == torch.bfloat16
    assert err < 8e-3 and err < 2 * dense + 1e-3, (err, dense)


@pytest.mark.parametrize("bits", [2, 3])
def test_int4_linear_runs_codes_of_fewer_bits(bits):
    q, scale, zero = _codes(32, 128, 32, bits=bits)
    mod = int4.Int4Linear.from_codes(q, scale, zero, 32, dtype=torch.float32)
    x = torch.randn(4, 128)
    torch.testing.assert_close(mod(x), x @ _dense(q, scale, zero, 32).t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k,gs,why", [(64, 256, 16, "group 16"), (40, 160, 32, "N=40"), (64, 96, 64, "group 64")])
def test_kernel_refusals_fall_back_to_dequant_per_call(n, k, gs, why):
    """Shapes the kernel refuses keep their 4-bit codes (nibble-packed), dequantize at each call,
    and say why; kernel='torch' raises one line instead."""
    q, scale, zero = _codes(n, k, gs)
    mod = int4.Int4Linear.from_codes(q, scale, zero, gs, torch.randn(n), dtype=torch.float32)
    assert mod.kernel == "dequant" and why in mod.refusal
    assert mod.codes.dtype == torch.uint8 and mod.codes.shape == (n, (k + 1) // 2)
    x = torch.randn(2, 3, k)
    torch.testing.assert_close(mod(x), x @ _dense(q, scale, zero, gs).t() + mod.bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(AwqnbError, match="cannot run"):
        int4.Int4Linear.from_codes(q, scale, zero, gs, dtype=torch.float32, kernel="torch")


def test_forced_dequant_equals_the_kernel():
    q, scale, zero = _codes(64, 256, 64)
    a = int4.Int4Linear.from_codes(q, scale, zero, 64, dtype=torch.float32)
    b = int4.Int4Linear.from_codes(q, scale, zero, 64, dtype=torch.float32, kernel="dequant")
    assert (a.kernel, b.kernel) == ("torch", "dequant")
    x = torch.randn(5, 256)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
    assert b.nbytes() < 0.2 * 64 * 256 * 4  # nibbles + float32 scale and zero per 64


def test_moved_kernel_layout_is_refused():
    """The CPU and CUDA packed layouts differ: a module moved across them says to reload."""
    q, scale, zero = _codes(32, 128, 32)
    mod = int4.Int4Linear.from_codes(q, scale, zero, 32, dtype=torch.float32)
    assert mod.dtype == torch.float32 and mod.to(torch.bfloat16).dtype == torch.bfloat16
    mod.layout = "cuda"  # as if packed for CUDA, now read on the CPU
    with pytest.raises(AwqnbError, match="reload it with load_int4"):
        mod(torch.randn(2, 128))


def test_codes_out_of_range_are_refused():
    q, scale, zero = _codes(16, 64, 32, bits=8)
    with pytest.raises(AwqnbError, match=r"\[0, 15\]"):
        int4.Int4Linear.from_codes(q, scale, zero, 32)


def test_kernel_group_choice():
    assert int4.kernel_group(4096, 128) == 128 and int4.kernel_group(4096, -1) == 256
    assert int4.kernel_group(160, -1) == 32 and int4.kernel_group(576, 64) == 64
    assert int4.kernel_group(96, 64) is None and int4.kernel_group(4096, 16) is None


# --- kernel choice ---------------------------------------------------------------------------

def test_auto_on_cpu_chooses_torch_without_importing_gemlite(monkeypatch):
    """'auto' on the CPU never tries gemlite (a CUDA-only package); it runs torch's kernel."""
    monkeypatch.setattr(int4, "gemlite_import", lambda: pytest.fail("gemlite imported on the CPU"))
    assert int4.select_kernel("auto", 64, 256, 32, torch.device("cpu"), torch.float32) == ("torch", None)
    assert int4.select_kernel("tinygemm", 64, 256, 32, torch.device("cpu"), torch.float32) == ("torch", None)
    assert int4.select_kernel("dequant", 64, 256, 32, torch.device("cpu"), torch.float32)[0] == "dequant"
    with pytest.raises(AwqnbError, match="unknown"):
        int4.select_kernel("marlin", 64, 256, 32, torch.device("cpu"), torch.float32)


def test_gemlite_asked_on_cpu_is_one_line():
    q, scale, zero = _codes(64, 256, 32)
    with pytest.raises(AwqnbError, match="gemlite runs on CUDA only") as e:
        int4.Int4Linear.from_codes(q, scale, zero, 32, dtype=torch.float32, kernel="gemlite")
    assert "\n" not in str(e.value) and "kernel='auto' or 'torch'" in str(e.value)


def test_missing_gemlite_explicit_raises_auto_logs_once(monkeypatch, caplog):
    """On CUDA without gemlite: asked for, one AwqnbError line naming `pip install gemlite`; under
    'auto', torch's kernel and one log line however many linears (no GPU here: the CUDA checks
    are stubbed, the selection logic is what runs)."""
    why = "gemlite is not importable (ModuleNotFoundError: No module named 'gemlite')"
    monkeypatch.setattr(int4, "_GEMLITE", {"mod": None, "why": why})
    monkeypatch.setattr(int4, "kernel_refusal", lambda *a: None)
    cuda = torch.device("cuda")
    assert int4.gemlite_refusal(4096, 4096, 128, cuda, torch.bfloat16) == why
    assert "gemlite runs on CUDA only" in int4.gemlite_refusal(4096, 4096, 128, torch.device("cpu"), torch.bfloat16)
    assert "group 8" in int4.gemlite_refusal(4096, 4096, 8, cuda, torch.bfloat16)
    assert "single group" in int4.gemlite_refusal(64, 128, 128, cuda, torch.bfloat16)
    with pytest.raises(AwqnbError, match="pip install gemlite") as e:
        int4.select_kernel("gemlite", 4096, 4096, 128, cuda, torch.bfloat16)
    assert "\n" not in str(e.value)
    with caplog.at_level(logging.INFO, logger="awqnb.export.int4"):
        for _ in range(3):
            assert int4.select_kernel("auto", 4096, 4096, 128, cuda, torch.bfloat16) == ("torch", None)
    lines = [r.getMessage() for r in caplog.records if "gemlite" in r.getMessage()]
    assert len(lines) == 1 and "not importable" in lines[0]


def test_gemlite_group_choice():
    assert int4.gemlite_group(4096, 128) == 128 and int4.gemlite_group(4096, 16) == 16
    assert int4.gemlite_group(4096, -1) == 256 and int4.gemlite_group(96, 64) is None


def _gemlite_ready():
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    return int4.gemlite_import()[1]


@pytest.mark.skipif(_gemlite_ready() is not None, reason=f"gemlite kernel test: {_gemlite_ready()}")
@pytest.mark.parametrize("m", [1, 8, 100])
@pytest.mark.parametrize("n,k,gs", [(512, 1024, 128), (256, 512, 64), (384, 512, -1)])
def test_gemlite_int4_linear_equals_dequantized_bf16_product(m, n, k, gs):
    """CUDA + gemlite only: y = x Wᵀ + b on gemlite (GEMV / split-K / GEMM by rows) equals the bf16
    product with the dequantized weight to bf16 rounding, holds one packed copy, no dense weight."""
    q, scale, zero = _codes(n, k, gs, seed=m)
    bias = torch.randn(n)
    mod = int4.Int4Linear.from_codes(q, scale, zero, gs, bias, dtype=torch.bfloat16, device="cuda", kernel="gemlite")
    assert mod.kernel == "gemlite" and not hasattr(mod, "packed") and not hasattr(mod, "codes")
    assert mod.nbytes() < 0.35 * n * k * 2
    w = _dense(q, scale, zero, gs).cuda()
    x = torch.randn(m, k, device="cuda")
    ref = x @ w.t() + bias.cuda()
    got = mod(x.bfloat16()).float()
    dense = (nn.functional.linear(x.bfloat16(), w.bfloat16(), bias.cuda().bfloat16()).float() - ref).norm() / ref.norm()
    err = (got - ref).norm() / ref.norm()
    # split-K kernels (M ≤ 64) add their partial sums atomically in bf16 on sm90: a few more bf16
    # roundings than the dense product's; a wrong layout or zero point gives an error near 1
    assert err < 1.2e-2 and err < 4 * dense + 2e-3, (err, dense)


# --- packed directories --------------------------------------------------------------------

def _packed(tiny, tmp_path, name, method="awq", quant=QuantConfig(4, 32), dtype=None, **kw):
    fp, tok, calib = tiny[name]
    m = copy.deepcopy(fp)
    cfg = MethodConfig(method, quant, FAST, calib_batch_size=4, **kw)
    res = pipeline.quantize(m, cfg, calib if method != "rtn" else None, progress=False)
    d = export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata(), dtype=dtype)
    return m, calib, cfg, d


def _quantized_names(m, cfg):
    return set(export.quantized_linears(m, cfg))


@pytest.mark.parametrize("name,method,quant", [
    ("tiny-random-llama", "rtn", QuantConfig(4, 32)),
    ("tiny-random-gemma3", "awq", QuantConfig(4, 32)),       # AWQ scales folded into the norms
    ("tiny-random-llama", "rtn", QuantConfig(4, -1)),        # per channel
    ("tiny-random-llama", "rtn", QuantConfig(4, 32, True)),  # symmetric: no zero point
])
def test_load_int4_equals_fake_quant_model(tiny, tmp_path, name, method, quant):
    """float32 on the CPU: every quantized linear is an Int4Linear on the kernel, the logits equal the
    fake-quant model's to float rounding, and the state holds no dense weight for those linears."""
    m, calib, cfg, d = _packed(tiny, tmp_path, name, method, quant)
    r, tok = int4.load_int4(d, device="cpu")
    qnames = _quantized_names(m, cfg)
    mods = dict(r.named_modules())
    assert all(isinstance(mods[n], int4.Int4Linear) and mods[n].kernel == "torch" for n in qnames)
    sd = r.state_dict()
    assert not any(f"{n}.weight" in sd for n in qnames)
    ids = torch.stack(calib.samples[:2])
    with torch.no_grad():
        a, b = m(ids).logits, r(ids).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (a - b).abs().max()
    assert tok is not None
    for n, p in m.named_parameters():  # everything not quantized is the checkpoint's tensor as it was
        if n.rsplit(".", 1)[0] not in qnames:
            assert torch.equal(p, dict(r.named_parameters())[n]), n


def test_int4_perplexity_and_memory(tiny, tmp_path):
    """The INT4 model's perplexity equals the fake-quant model's to float rounding (awqnb's own
    evaluation), and its quantized linears hold ≤ 0.2× the bytes of their float32 weights (4-bit
    codes + a float32 scale and zero term per 32 weights = 0.75 B against 4 B a weight)."""
    from awqnb.analysis.evaluate import token_perplexity

    m, calib, cfg, d = _packed(tiny, tmp_path, "tiny-random-llama", "rtn")
    r, tok = int4.load_int4(d, device="cpu")
    tokens = torch.cat(calib.samples)  # 4 × 64 WikiText-2 tokens
    a = token_perplexity(m, tokens, seqlen=64, max_windows=4, progress=False)
    b = token_perplexity(r, tokens, seqlen=64, max_windows=4, progress=False)
    assert b.ppl == pytest.approx(a.ppl, rel=1e-5)
    assert max(abs(x - y) for x, y in zip(a.nll, b.nll)) < 1e-5
    s = int4.int4_summary(r)
    qnames = _quantized_names(m, cfg)
    dense_bytes = sum(dict(m.named_modules())[n].weight.numel() * 4 for n in qnames)
    held = sum(t.numel() * t.element_size() for k, t in r.state_dict().items() if k.rsplit(".", 1)[0] in qnames)
    assert s["int4_linears"] == len(qnames) == 14 and s["dense_equivalent_bytes"] == dense_bytes
    assert held == s["int4_bytes"] and held <= 0.2 * dense_bytes, (held, dense_bytes)


def test_load_int4_bf16_checkpoint(tiny, tmp_path):
    """A bf16 export loads in bf16 (its config's dtype); the logits agree with the bf16 fake-quant
    model to bf16 rounding."""
    m, calib, cfg, d = _packed(tiny, tmp_path, "tiny-random-gemma3", dtype=torch.bfloat16)
    r, _ = int4.load_int4(d)
    assert r.get_input_embeddings().weight.dtype == torch.bfloat16
    ref = copy.deepcopy(m).to(torch.bfloat16)
    ids = torch.stack(calib.samples[:2])
    with torch.no_grad():
        a, b, exact = ref(ids).logits.float(), r(ids).logits.float(), m(ids).logits
    err = (b - exact).norm() / exact.norm()
    assert err < 3e-2 and err < 2 * (a - exact).norm() / exact.norm() + 1e-2


def test_eight_bit_plan_linears_stay_dense(tiny, tmp_path):
    """A mixed plan's 8-bit linears (their own exact-name group) do not fit 4 bits: dense at load,
    equal to the fake-quant weights; the 4-bit ones are Int4Linear."""
    from awqnb.quant.plan import Plan

    m, calib, cfg, d = _packed(tiny, tmp_path, "tiny-random-llama", "rtn", QuantConfig(4, 32, True),
                               plan=Plan.parse_keep("1.down"))
    r, _ = int4.load_int4(d)
    down = r.model.layers[1].mlp.down_proj
    assert isinstance(down, nn.Linear) and torch.equal(down.weight, m.model.layers[1].mlp.down_proj.weight)
    assert isinstance(r.model.layers[0].mlp.down_proj, int4.Int4Linear)
    assert int4.int4_summary(r)["int4_linears"] == 13
    ids = torch.stack(calib.samples[:1])
    with torch.no_grad():
        torch.testing.assert_close(r(ids).logits, m(ids).logits, rtol=1e-4, atol=1e-4)


def test_load_int4_refusals(tiny, tmp_path):
    fp, tok, _ = tiny["tiny-random-llama"]
    fp.save_pretrained(tmp_path / "fp")
    with pytest.raises(AwqnbError, match="not a packed"):
        int4.load_int4(tmp_path / "fp")


def test_fallback_is_logged_once_per_load(tiny, tmp_path, caplog):
    """g16 (which the kernel refuses) loads, dequantizes per call, and says so in one warning."""
    m, calib, cfg, d = _packed(tiny, tmp_path, "tiny-random-llama", "rtn", QuantConfig(4, 16))
    with caplog.at_level(logging.WARNING, logger="awqnb.export.int4"):
        r, _ = int4.load_int4(d)
    warns = [x for x in caplog.records if x.levelno == logging.WARNING]
    assert len(warns) == 1 and "14 linear(s)" in warns[0].getMessage() and "group 16" in warns[0].getMessage()
    assert int4.int4_summary(r)["dequant"] == 14
    ids = torch.stack(calib.samples[:1])
    with torch.no_grad():
        torch.testing.assert_close(r(ids).logits, m(ids).logits, rtol=1e-4, atol=1e-4)


def test_cli_eval_runtime_int4(tiny, tmp_path, capsys):
    """`awqnb eval --runtime int4` on a packed directory: the perplexity of `--runtime dense` to float
    rounding, labelled with its runtime on stdout and in the JSON; a non-packed model is one line."""
    from awqnb.cli import main

    m, calib, cfg, d = _packed(tiny, tmp_path, "tiny-random-llama", "rtn")
    notes = tmp_path / "notes.txt"  # a small file of one's own: no WikiText-2 tokenizing
    notes.write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 40)
    out = {}
    for rt in ("dense", "int4"):
        assert main(["eval", "--model", str(d), "--dataset", str(notes), "--seqlen", "64", "--max-windows", "3",
                     "--device", "cpu", "--runtime", rt, "--json", str(tmp_path / f"{rt}.json")]) == 0
        text = capsys.readouterr().out
        assert "[rtn] " in text and "notes.txt (sha256" in text and f"ppl seqlen=64 units=3 runtime={rt}: " in text
        assert float(text.strip().rsplit(" ", 1)[-1]) > 0  # the perplexity stays the line's last word
        out[rt] = json.loads((tmp_path / f"{rt}.json").read_text())
        assert out[rt]["meta"]["runtime"] == rt
    assert out["int4"]["ppl"] == pytest.approx(out["dense"]["ppl"], rel=1e-5)
    assert out["int4"]["meta"]["int4"]["int4_linears"] == 14
    assert main(["eval", "--model", "tiny-random-llama", "--seqlen", "64", "--max-windows", "1",
                 "--runtime", "int4"]) == 2
    err = capsys.readouterr().err
    assert "not a packed" in err and len(err.strip().splitlines()) == 1
