"""Packed export (compressed-tensors pack-quantized), the seed-004 API, pickle-free replay records."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from awqnb.export import packed as export
from awqnb.quant import pipeline
from awqnb.core import tensorjson
from awqnb.api import detect_quantization, quantize_with_awq, read_prompts
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.codes import recover_codes
from awqnb.core.primitives import compute_qparams, dequantize, fake_quant, quantize

FAST = SearchConfig(n_grid=4)


def _quantized(tiny, name, method, quant, **kw):
    fp, tok, calib = tiny[name]
    m = copy.deepcopy(fp)
    cfg = MethodConfig(method, quant, FAST, calib_batch_size=4, **kw)
    res = pipeline.quantize(m, cfg, calib if method != "rtn" else None, progress=False)
    return m, tok, calib, cfg, res


def _reload(path, plain=False, **kw):
    """transformers' load with the option `detect_quantization(path)['load_with']` names for an
    asymmetric checkpoint (dense at load); plain=True: no option (symmetric ones only)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if not plain:
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


@pytest.mark.parametrize("name,method,quant", [
    ("tiny-random-llama", "awq_sh", QuantConfig(4, 32)),      # flips: some groups lose an end code
    ("tiny-random-gemma3", "awq", QuantConfig(4, 32)),
    ("tiny-random-llama", "awq_gqa", QuantConfig(4, -1)),     # per channel, ReFlip on q_proj
    ("tiny-random-llama", "rtn", QuantConfig(4, 32, True)),   # symmetric: no zero point
])
def test_packed_reload_equals_fake_quant(tiny, tmp_path, name, method, quant):
    """The reloaded packed model is the fake-quant model: every parameter bit for bit, so the
    logits too (measured max |Δ| = 0; asserted ≤ 1e-6)."""
    m, tok, calib, cfg, res = _quantized(tiny, name, method, quant)
    export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata(), result=res)
    r = _reload(tmp_path / "p", plain=quant.symmetric)
    ids = torch.stack(calib.samples[:2])
    with torch.no_grad():  # a plain load of a symmetric checkpoint is lazy: the first forward decompresses
        assert (m(ids).logits - r(ids).logits).abs().max() <= 1e-6
    got = dict(r.named_parameters())
    for n, p in m.named_parameters():
        assert torch.equal(p, got[n]), n
    meta = json.loads((tmp_path / "p" / "quantization_metadata.json").read_text())["export"]
    assert meta["max_abs_err"] == 0.0 and meta["linears"] == 14
    if method == "awq_sh":
        assert meta["lattice_groups"] > 0  # compute_qparams(Ŵ) alone would have been wrong there


def test_packed_layout_is_compressed_tensors_with_awqnb_codes(tiny, tmp_path):
    """Tensors and config as llm-compressor writes them; the packed codes are awqnb's own RTN codes
    of the FP weights (independent of the recovery), shifted to the signed range."""
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32
    from safetensors.torch import load_file

    fp = tiny["tiny-random-llama"][0]
    m, tok, _, cfg, res = _quantized(tiny, "tiny-random-llama", "rtn", QuantConfig(4, 32))
    d = export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata())
    sd = load_file(str(d / "model.safetensors"))
    w = fp.model.layers[1].mlp.down_proj.weight.data  # [160, 224]
    scale, zero = compute_qparams(w, cfg.quant)
    pre = "model.layers.1.mlp.down_proj."
    assert pre + "weight" not in sd
    assert sd[pre + "weight_packed"].dtype == torch.int32 and sd[pre + "weight_packed"].shape == (160, 224 // 8)
    assert sd[pre + "weight_zero_point"].shape == (160 // 8, 7) and sd[pre + "weight_scale"].dtype == torch.float32
    codes = unpack_from_int32(sd[pre + "weight_packed"], 4, torch.Size([160, 224]))
    assert torch.equal(codes.long() + 8, quantize(w, scale, zero, cfg.quant).long())
    zp = unpack_from_int32(sd[pre + "weight_zero_point"], 4, torch.Size([160, 7]), packed_dim=0)
    assert torch.equal(zp.long() + 8, zero.long())
    torch.testing.assert_close(sd[pre + "weight_scale"], scale, rtol=0, atol=0)
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"] and "dequantize" not in qc
    wq = qc["config_groups"]["group_0"]["weights"]
    assert (wq["num_bits"], wq["group_size"], wq["strategy"], wq["symmetric"]) == (4, 32, "group", False)
    meta = json.loads((d / "quantization_metadata.json").read_text())
    # 4-bit codes + a float32 scale and a 4-bit zero per 32 weights
    assert meta["export"]["bits_per_weight"] == pytest.approx(4 + 32 / 32 + 4 / 32, abs=0.01)
    assert "tie_word_embeddings" in json.loads((d / "config.json").read_text())
    assert not [f for f in d.iterdir() if f.suffix in (".pt", ".bin", ".pkl", ".pickle")]


def test_bf16_export_reloads_as_the_bf16_fake_quant_model(tiny, tmp_path):
    m, tok, calib, cfg, res = _quantized(tiny, "tiny-random-gemma3", "awq", QuantConfig(4, 32))
    export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata(), dtype=torch.bfloat16)
    r = _reload(tmp_path / "p")
    assert r.dtype == torch.bfloat16
    want = copy.deepcopy(m).to(torch.bfloat16)
    got = dict(r.named_parameters())
    for n, p in want.named_parameters():
        assert torch.equal(p, got[n]), n


def test_reload_needs_no_awqnb(tiny, tmp_path):
    """Plain transformers + compressed-tensors in a fresh interpreter, awqnb never imported."""
    m, tok, calib, cfg, res = _quantized(tiny, "tiny-random-llama", "awq", QuantConfig(4, 32))
    export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata())
    ids = calib.samples[0][None, :16]
    torch.save(ids, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'p')!r},
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
        assert not any(k == "awqnb" or k.startswith("awqnb.") for k in sys.modules)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    with torch.no_grad():
        assert torch.equal(m(ids).logits, torch.load(tmp_path / "out.pt"))


def test_recover_codes_handles_lost_end_codes_and_refuses_off_grid():
    cfg = QuantConfig(4, 8)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=g)
    w[0, :8] = torch.rand(8, generator=g) + 0.1  # one-signed group: zero clamps to 0
    scale, zero = compute_qparams(w, cfg)
    q = quantize(w, scale, zero, cfg)
    g1, g2 = q[1, :8], q[2, 8:]
    g1[g1 == 0] += 1  # flips move every code-0 weight of a group inwards
    g2[g2 == 15] -= 1  # ... and every code-15 weight of another
    w_hat = dequantize(q, scale, zero, cfg)
    naive_s, naive_z = compute_qparams(w_hat, cfg)
    assert not torch.allclose(naive_s, scale)  # the fast path alone cannot see the grid
    c = recover_codes(w_hat, cfg)
    assert c.lattice_groups >= 3 and c.max_abs_err == 0.0
    assert torch.equal(dequantize(c.q.float(), c.scale, c.zero, cfg), w_hat)
    assert int(c.q.min()) >= 0 and int(c.q.max()) <= 15
    with pytest.raises(AwqnbError, match="not on a 4-bit grid"):
        recover_codes(w, cfg)  # FP weights: not quantized at all
    assert torch.equal(recover_codes(fake_quant(w, cfg), cfg).q.float(), quantize(w, scale, zero, cfg))


# a group of SmolLM2-135M's layers.0.self_attn.q_proj (row 443, group 7) after gptq at g64 (issue 21):
# codes 1..15 (GPTQ never reached code 0), zero 11, scale 0.05755208432674408, weights stored in bf16
SMOLLM2_GPTQ_CODES = [7, 10, 11, 11, 13, 11, 8, 11, 9, 9, 12, 15, 5, 12, 12, 12, 2, 7, 12, 4, 10, 12, 14, 8, 9, 7,
                      10, 9, 12, 11, 9, 8, 15, 6, 13, 10, 15, 3, 11, 12, 7, 6, 9, 11, 12, 7, 13, 10, 1, 9, 12, 13,
                      10, 10, 12, 13, 13, 1, 12, 14, 9, 15, 10, 11]


def test_recover_codes_on_the_bf16_gptq_group_the_export_refused():
    """The smallest gap between its bf16 values (0.0547) is an ulp short of the step (0.0576): the old
    lattice estimate then put -0.574 (k = -10) and -0.520 (k = -9) both on k = -10 and refused the
    model. The codes, zero and every bf16 value come back exactly."""
    cfg = QuantConfig(4, 64)
    k = torch.tensor([SMOLLM2_GPTQ_CODES], dtype=torch.float32) - 11
    w_hat = (k * torch.tensor(0.05755208432674408)).to(torch.bfloat16)
    c = recover_codes(w_hat, cfg)
    assert c.lattice_groups == 1 and c.max_abs_err == 0.0
    assert torch.equal(c.q.float() - c.zero, k) and int(c.zero) == 11
    assert torch.equal(dequantize(c.q.float(), c.scale, c.zero, cfg).to(torch.bfloat16), w_hat)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sym", [False, True])
def test_recover_codes_on_low_precision_groups_without_an_end_code(dtype, sym):
    """16384 groups that lost their lowest code (as GPTQ's and flips' can), stored in bf16/fp16: every
    one needs the lattice and comes back bit for bit (before the fix 4 asymmetric bf16 ones were refused).
    Genuinely off-grid weights of the same dtype are still refused."""
    cfg = QuantConfig(4, 64, sym)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 256, generator=g) * 0.05
    scale, zero = compute_qparams(w, cfg)
    q = quantize(w, scale, zero, cfg).clamp(min=-6 if sym else 1)
    w_hat = dequantize(q, scale, zero, cfg).to(dtype)
    c = recover_codes(w_hat, cfg)
    assert c.max_abs_err == 0.0 and c.lattice_groups > (6000 if sym else 16000)
    assert torch.equal(dequantize(c.q.float(), c.scale, c.zero, cfg).to(dtype), w_hat)
    with pytest.raises(AwqnbError, match="not on a 4-bit grid"):
        recover_codes((torch.randn(64, 256, generator=g) * 0.05).to(dtype), cfg)


def test_format_refusals_are_clear(tiny, tmp_path, monkeypatch):
    m, tok, _, cfg, res = _quantized(tiny, "tiny-random-llama", "rtn", QuantConfig(4, 128))
    with pytest.raises(AwqnbError, match=r"does not divide the 160, 224 input channels.*--group-size 32.*--format fake"):
        export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata())
    assert not (tmp_path / "p").exists() and not list(tmp_path.iterdir())
    m, tok, _, cfg, res = _quantized(tiny, "tiny-random-llama", "rtn", QuantConfig(4, 32))
    export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata())
    with pytest.raises(AwqnbError, match="already exists.*overwrite"):
        export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata())
    export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata(), overwrite=True)

    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(AwqnbError, match="could not write .*disk full.*nothing was written"):
        export.save_packed(m, tok, tmp_path / "q", cfg, res.metadata())
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p"]  # no half-written directory
    monkeypatch.undo()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "compressed_tensors" else real(n, *a))
    with pytest.raises(AwqnbError, match="pip install compressed-tensors==0.19.0.*--format fake"):
        export.save_packed(m, tok, tmp_path / "r", cfg, res.metadata())


def test_replay_record_is_json_and_safetensors(tiny, tmp_path):
    fp = tiny["tiny-random-llama"][0]
    m, _, _, cfg, res = _quantized(tiny, "tiny-random-llama", "awq_gqa", QuantConfig(4, 32))
    js = res.save(tmp_path / "quant_result.pt")  # an old-style name still gives the new pair
    assert js == tmp_path / "quant_result.json" and (tmp_path / "quant_result.safetensors").is_file()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["quant_result.json", "quant_result.safetensors"]
    json.loads(js.read_text())  # plain JSON: nothing executes on load
    back = pipeline.QuantResult.load(tmp_path / "quant_result")
    assert back.alphas() == res.alphas() and back.config == res.config
    replayed = pipeline.apply(copy.deepcopy(fp), back)
    for (n, p1), p2 in zip(m.named_parameters(), replayed.parameters()):
        assert torch.equal(p1, p2), n
    obj = {"a": (1, 2.5, float("inf")), 3: {"t": torch.arange(3, dtype=torch.int8), "e": torch.zeros(0)},
           "dt": torch.bfloat16, "n": None}
    out = tensorjson.load(tensorjson.save(obj, tmp_path / "x"))
    assert out["a"] == (1, 2.5, float("inf")) and out["dt"] is torch.bfloat16 and out["n"] is None
    assert torch.equal(out[3]["t"], obj[3]["t"]) and out[3]["e"].shape == (0,)
    with pytest.raises(AwqnbError, match="no record"):
        tensorjson.load(tmp_path / "missing")


def test_quantize_with_awq_api(tmp_path):
    prompts = tmp_path / "calib.txt"
    prompts.write_text("What is the capital of France?\n\n  Explain photosynthesis briefly.  \n"
                       "Write a short poem about the sea and the wind over the harbour.\n", encoding="utf-8")
    path, info = quantize_with_awq("tiny-random-llama", tmp_path / "out", prompts, group_size=32,
                                   chat_template=True, device="cpu")
    assert path == tmp_path / "out" / "tiny-random-llama_AWQ_w4_g32_headfp16_quantized"
    assert info["format"] == "packed" and info["n_prompts"] == "3" and all(isinstance(v, str) for v in info.values())
    meta = json.loads((path / "quantization_metadata.json").read_text())
    assert meta["calibration"]["n_prompts"] == 3 and meta["calibration"]["chat_template"] is True
    assert len(meta["calibration"]["sha256"]) == 64 and meta["config"]["seed"] == 13
    assert len(meta["layers"]) == 2 and set(meta["layers"][0]["alpha"]) == {"qkv", "vo", "gate_up", "down"}
    assert meta["versions"]["compressed-tensors"] == "0.19.0" and meta["versions"]["torch"]
    d = detect_quantization(path)
    assert "CompressedTensorsConfig(dequantize=True)" in d.pop("load_with")
    assert d == {"quantized": True, "method": "awq", "format": "packed", "bits": 4, "group_size": 32,
                 "symmetric": False, "lm_head": "fp16", "quant_method": "compressed-tensors"}
    assert _reload(path).config.model_type == "llama"
    with pytest.raises(AwqnbError, match="already exists"):
        quantize_with_awq("tiny-random-llama", tmp_path / "out", prompts, group_size=32, device="cpu")
    fake, _ = quantize_with_awq("tiny-random-llama", tmp_path / "out", prompts, group_size=-1, backend="awq_sh",
                                format="fake", device="cpu")
    assert fake.name == "tiny-random-llama_AWQ_SH_w4_gch_headfp16"
    d = detect_quantization(fake)
    assert (d["method"], d["format"], d["group_size"], d["quant_method"]) == ("awq_sh", "fake", -1, None)
    assert (fake / "quant_result.json").is_file()
    from awqnb.model.tiny import build_tiny

    (tmp_path / "fp").mkdir()
    build_tiny("tiny-random-llama")[0].config.save_pretrained(tmp_path / "fp")
    assert detect_quantization(tmp_path / "fp")["quantized"] is False


def test_bad_prompts_files_are_clear(tmp_path):
    with pytest.raises(AwqnbError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(AwqnbError, match="no prompts"):
        quantize_with_awq("tiny-random-llama", tmp_path / "o", tmp_path / "empty.txt", group_size=32, device="cpu")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    with pytest.raises(AwqnbError, match="cannot read prompts file"):
        read_prompts(tmp_path / "bin.txt")
    assert not (tmp_path / "o").exists()


def test_cli_refuses_unpackable_group_size(tmp_path):
    p = subprocess.run([sys.executable, "-m", "awqnb", "quantize", "--model", "tiny-random-llama", "--method", "rtn",
                        "--group-size", "128", "--output-dir", str(tmp_path / "q")], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("awqnb: error:")]
    assert len(err) == 1 and "--group-size 32" in err[0] and "--format fake" in err[0]
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())


@pytest.mark.slow
def test_smollm2_packed_reload_equals_fake(tmp_path):
    """The real model: its 576 columns refuse group 128 with what to do; g64 packs and reloads to
    the same parameters bit for bit."""
    from awqnb.model.loading import load_model

    m, tok = load_model("smollm2-135m")
    bad = MethodConfig("rtn", QuantConfig(4, 128))
    with pytest.raises(AwqnbError, match=r"576.*--group-size 64.*per-channel.*--format fake"):
        export.check_packable(m, bad)
    cfg = MethodConfig("rtn", QuantConfig(4, 64))
    res = pipeline.quantize(m, cfg, None, progress=False)
    d = export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata())
    meta = json.loads((d / "quantization_metadata.json").read_text())["export"]
    assert meta["linears"] == 210 and meta["max_abs_err"] == 0.0
    r = _reload(d)
    got = dict(r.named_parameters())
    for n, p in m.named_parameters():
        assert torch.equal(p, got[n]), n


# --- the saved config as other tools read it (issue 28 item 3) ---------------------------------------

def _qc(d):
    return json.loads((d / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("sym", [False, True])
def test_mixed_precision_groups_target_exact_names(tiny, tmp_path, sym):
    """A plan's 8-bit q/k/v and down_proj: no group targets the class `Linear` (vLLM matches it before
    the parts of its fused qkv_proj / gate_up_proj); every linear's target, as compressed-tensors'
    `match_targets` ranks them and as vLLM's fused-name rule reads them, has the bits the plan gave it;
    no `dequantize` key; awqnb's loader reloads every parameter bit for bit."""
    from compressed_tensors.utils import match_targets

    from awqnb.model.loading import load_model
    from awqnb.quant.plan import Plan

    fp, tok, _ = tiny["tiny-random-llama"]
    cfg = MethodConfig("rtn", QuantConfig(4, 32, sym), plan=Plan.parse_keep("0.qkv,0.down,1.gate_up:16"))
    m = copy.deepcopy(fp)
    res = pipeline.quantize(m, cfg, None, progress=False)
    d = export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata(), other_bits="group")
    qc = _qc(d)
    assert "dequantize" not in qc
    groups = qc["config_groups"]
    assert not any("Linear" in g["targets"] for g in groups.values())
    bits_of = {t: g["weights"]["num_bits"] for g in groups.values() for t in g["targets"]}
    want = {f"model.layers.0.self_attn.{x}_proj": 8 for x in "qkv"} | {"model.layers.0.mlp.down_proj": 8}
    fp_kept = {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}
    for n, mod in m.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if n in fp_kept or n == "lm_head":
            assert n in qc["ignore"] and n not in bits_of, n
            continue
        targets = [t for g in groups.values() for t in match_targets(n, mod, g["targets"])]
        assert targets == [n] and bits_of[n] == want.get(n, 4), n
    for fused, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))):
        for j in range(2):  # vLLM: a fused layer takes its parts' target when all of them match one
            sub = "self_attn" if fused == "qkv_proj" else "mlp"
            got = {bits_of.get(f"model.layers.{j}.{sub}.{p}") for p in parts}
            assert len(got) == 1, (j, fused, got)
    r, _ = load_model(str(d), dtype=torch.float32)  # re-decodes the 8-bit group (transformers reads group_0's bits)
    got = dict(r.named_parameters())
    for n, p in m.named_parameters():
        assert torch.equal(p, got[n]), n
    if not sym:
        assert "awqnb" in detect_quantization(d)["load_with"] and "cannot load" in detect_quantization(d)["load_with"]


def test_one_precision_keeps_the_class_target(tiny, tmp_path):
    m, tok, _, cfg, res = _quantized(tiny, "tiny-random-llama", "rtn", QuantConfig(4, 32))
    qc = _qc(export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata()))
    assert [g["targets"] for g in qc["config_groups"].values()] == [["Linear"]] and "dequantize" not in qc


@pytest.mark.parametrize("bits,head,what", [(2, "fp16", "2-bit linears"), (3, "fp16", "3-bit linears"),
                                            (4, "quantize", "a quantized lm_head")])
def test_what_vllm_does_not_serve_is_refused_or_flagged(tiny, tmp_path, caplog, bits, head, what):
    """2/3-bit packed output and a packed lm_head: one line naming --format fake, nothing written;
    allow_unservable=True writes it (and reloads it bit for bit) with a warning that vLLM will not."""
    m, tok, _, cfg, res = _quantized(tiny, "tiny-random-llama", "rtn", QuantConfig(bits, 32), lm_head=head)
    with pytest.raises(AwqnbError, match=rf"^the packed format would hold {what} .*vLLM will not load; "
                                         r"use --format fake .*allow_unservable=True"):
        export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata())
    assert not (tmp_path / "p").exists()
    with caplog.at_level("WARNING", logger="awqnb.export.packed"):
        d = export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata(), allow_unservable=True)
    assert any("vLLM will not load" in r.getMessage() and what in r.getMessage() for r in caplog.records)
    w = _qc(d)["config_groups"]["group_0"]["weights"]
    assert w["num_bits"] == bits and ("lm_head" in _qc(d)["ignore"]) == (head == "fp16")
    got = dict(_reload(d).named_parameters())
    for n, p in m.named_parameters():
        assert torch.equal(p, got[n]), n


@pytest.mark.parametrize("method,params,want", [("gptq", {"act_order": True}, "weight"),
                                                ("gptq", {"act_order": False}, None), ("rtn", {}, None)])
def test_actorder_is_recorded_as_vllm_reads_it(tiny, tmp_path, method, params, want):
    """GPTQ in act order keeps contiguous groups (no g_idx): compressed-tensors' "weight", never
    "group" (vLLM's Machete refuses it, compressed-tensors 0.19 rejects it)."""
    m, tok, _, cfg, res = _quantized(tiny, "tiny-random-llama", method, QuantConfig(4, 32), params=params)
    d = export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata())
    assert _qc(d)["config_groups"]["group_0"]["weights"]["actorder"] == want
    got = dict(_reload(d).named_parameters())
    for n, p in m.named_parameters():
        assert torch.equal(p, got[n]), n


def test_unservable_settings_are_refused_before_quantizing(tiny):
    """check_packable (what the CLI and quantize_with_awq run before calibration) refuses them too."""
    fp = tiny["tiny-random-llama"][0]
    with pytest.raises(AwqnbError, match="3-bit linears .*--format fake"):
        export.check_packable(fp, MethodConfig("awq", QuantConfig(3, 32)))
    with pytest.raises(AwqnbError, match="quantized lm_head"):
        export.check_packable(fp, MethodConfig("awq", QuantConfig(4, 32), lm_head="quantize"))
    export.check_packable(fp, MethodConfig("awq", QuantConfig(3, 32)), allow_unservable=True)


def test_cli_unservable_packed_is_one_line_or_written_with_the_flag(tmp_path, capsys):
    """`awqnb quantize --bits 3` (packed by default): one error line naming --format fake and the flag,
    nothing written; with --allow-unservable the directory is written and says 3 bits."""
    from awqnb import cli

    args = ["quantize", "--model", "tiny-random-llama", "--method", "rtn", "--bits", "3", "--group-size", "32",
            "--output-dir", str(tmp_path / "q")]
    assert cli.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "--format fake" in err[0] and "allow" in err[0], err
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())
    assert cli.main(args + ["--allow-unservable"]) == 0
    d = tmp_path / "q" / capsys.readouterr().out.strip().splitlines()[-1].rsplit("/", 1)[-1]
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 3 and "dequantize" not in qc
