"""The peers AutoRound (`ar`) and HQQ (`hqq`) as reference methods of the comparison
(`awqnb.compare.reference`): run on the tiny random models through the runner's reference path,
left in awqnb's fake-quant form, read by awqnb's evidence and its packed exporter. Skipped with the
reason where the package is absent (`pip install 'awqnb[peers]'`; `make setup` installs both)."""
import builtins
import copy
import importlib.util
import json
import math
import sys

import pytest
import torch

from awqnb.compare import reference, runner
from awqnb.compare.specs import parse_spec
from awqnb.core.codes import recover_codes
from awqnb.core.config import QuantConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.primitives import dequantize
from conftest import random_calibration

Q = QuantConfig(bits=4, group_size=32)


def _absent(name: str) -> str | None:
    """Why the peer cannot run here, without importing it at collection (auto_round takes seconds)."""
    t = reference.TOOLS[name]
    if importlib.util.find_spec(t.module) is None:
        return f"{t.label} not installed ({t.hint})"
    v = reference.tool_version(name)
    return None if v and any(v.startswith(p) for p in t.tested) else f"{t.label} {v} outside the tested range"


needs_ar = pytest.mark.skipif(_absent("ar") is not None, reason=str(_absent("ar")))
needs_hqq = pytest.mark.skipif(_absent("hqq") is not None, reason=str(_absent("hqq")))




@pytest.fixture(scope="module")
def gemma(tiny):
    """tiny-random-gemma3: every linear side a multiple of 32, so AutoRound quantizes all of them."""
    return tiny["tiny-random-gemma3"]


@pytest.fixture(scope="module")
def run(gemma):
    """One comparison on tiny-random-gemma3, seed 3: rtn, ar@iters=1 (AutoRound's tuning path, one
    iteration), hqq and hqq@optimize=false through the runner's reference path; each peer's
    quantized model kept (the runner frees it after evaluation) → (Comparison, label → (model, info))."""
    if reference.refusal("ar") or reference.refusal("hqq"):
        pytest.skip(str(reference.refusal("ar") or reference.refusal("hqq")))
    model, tok, _ = gemma
    kept = {}
    real = reference.quantize_reference

    def keep(qmodel, name, *a, **k):
        info = real(qmodel, name, *a, **k)
        kept[name] = (qmodel, info)
        return info

    toks = torch.randint(0, model.config.vocab_size, (3 * 48,), generator=torch.Generator().manual_seed(1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "quantize_reference", keep)
        c = runner.run_comparison(model, ["rtn", "ar@iters=1", "hqq", "hqq@optimize=false"], tokenizer=tok,
                                  seeds=(3,), calibration=random_calibration(model.config.vocab_size), datasets={"toks": toks},
                                  quant=Q, eval_seqlen=48, device="cpu", progress=False, layer_mse=True,
                                  mse_samples=2)
    return c, kept


@pytest.fixture(scope="module")
def quantized(run):
    return run[1]


@needs_ar
@needs_hqq
def test_peers_run_in_the_comparison(run):
    """ar@iters=1 and hqq beside rtn: version, parameters, the run's seed and time recorded; hqq,
    calibration-free, runs once and stands for every seed."""
    c, _ = run
    assert not c.skipped, c.skipped
    (ar,) = [r for r in c.runs if r.label == "ar@iters=1"]
    assert ar.seed == 3 and ar.info["seed"] == 3 and ar.method == "ar@iters=1"
    assert ar.info["tool"] == "AutoRound" and ar.info["version"] == "0.16.1" and ar.info["iters"] == 1
    assert ar.info["params"] == {"iters": 1} and ar.info["linears"] == 14 and ar.info["on_awqnb_grid"]
    assert ar.info["n_calib"] == 4 and ar.info["calib_seqlen"] == 32 and ar.info["group_size"] == 32
    assert ar.quantize_s > 0 and ar.info["seconds"] > 0 and "peak_gpu_gb" in ar.info  # None on a CPU
    assert math.isfinite(ar.results["toks"].ppl) and ar.results["toks"].ppl != c.per_seed("rtn", "toks")[3].ppl
    (hqq,) = [r for r in c.runs if r.label == "hqq"]
    assert hqq.shared and hqq.info["version"].startswith("0.2.8") and hqq.info["seconds"] > 0
    assert hqq.info["hqq_weight_params"]["axis"] == 1 and hqq.info["params"] == {}
    assert hqq.results["toks"].ppl != c.per_seed("rtn", "toks")[3].ppl
    described = {m["label"]: m["config"] for m in c.provenance["methods"]}
    assert described["ar@iters=1"]["tool"] == "AutoRound" and described["ar@iters=1"]["params"] == {"iters": 1}
    assert described["hqq"]["version"] == hqq.info["version"]
    assert hqq.calibration is None  # calibration-free: none drawn or recorded
    assert c.provenance["versions"]["auto-round"] == "0.16.1" and c.provenance["versions"]["hqq"].startswith("0.2.8")
    # the peers' linears through awqnb's layer-error evidence, in the same run, like rtn's
    labels = set(c.mse["method"])
    assert {"rtn", "ar@iters=1", "hqq"} <= labels, labels


@needs_ar
@needs_hqq
def test_autoround_leaves_awqnb_fake_quant_weights(gemma, quantized):
    """Every block linear on a W4 g32 grid recover_codes accepts, reproduced exactly from its codes;
    every other tensor the FP model's own (AutoRound tuned in bf16 and cast them; they are given
    back); no AutoRound attribute left on a module; lm_head untouched."""
    model, _, _ = gemma
    m, info = quantized["ar@iters=1"]
    assert info["on_awqnb_grid"] and info["off_grid_linears"] == 0 and info["iters"] == 1 and info["seed"] == 3
    fp = dict(model.named_parameters()) | dict(model.named_buffers())
    changed = 0
    for name, lin in reference.block_linears(m):
        w = lin.weight.detach()
        assert w.dtype == torch.float32
        codes = recover_codes(w, Q, name)
        assert torch.equal(dequantize(codes.q.float(), codes.scale, codes.zero, Q).to(w.dtype), w)
        changed += not torch.equal(w, fp[f"{name}.weight"])
    assert changed == 14
    lin_weights = {f"{n}.weight" for n, _ in reference.block_linears(m)}
    for k, t in list(m.named_parameters()) + list(m.named_buffers()):
        if k not in lin_weights:
            assert t.dtype == fp[k].dtype and torch.equal(t, fp[k]), k
    assert all(not hasattr(mod, a) for mod in m.modules() for a in ("scale", "zp", "global_name"))


@needs_ar
@needs_hqq
def test_hqq_grid_is_awqnbs_only_with_an_integer_zero_point(quantized):
    """HQQ's optimised zero point is a float: its weights are off awqnb's grid, recover_codes says
    so in one line. hqq@optimize=false keeps the rounded zero point: on the grid."""
    m, info = quantized["hqq"]
    assert not info["on_awqnb_grid"] and info["off_grid_linears"] == 14 and "not on a 4-bit grid" in info["off_grid_example"]
    name, lin = reference.block_linears(m)[0]
    with pytest.raises(AwqnbError, match="not on a 4-bit grid") as e:
        recover_codes(lin.weight.detach(), Q, name)
    assert "\n" not in str(e.value)
    m2, info2 = quantized["hqq@optimize=false"]
    assert info2["on_awqnb_grid"] and info2["params"] == {"optimize": False}
    for name, lin in reference.block_linears(m2):
        c = recover_codes(lin.weight.detach(), Q, name)
        assert c.max_abs_err == 0.0 and int(c.zero.min()) >= 0 and int(c.zero.max()) <= 15


@needs_ar
@needs_hqq
def test_peer_models_through_awqnbs_evidence(gemma, quantized):
    """layer_mse, block errors and the sensitivity pass read a peer's model as awqnb's own."""
    from awqnb.analysis import layer_error, sensitivity

    model, _, calib = gemma
    (qa, ia), (qh, ih) = quantized["ar@iters=1"], quantized["hqq"]
    ra = reference.peer_result(model, qa, ia, calib)
    rh = reference.peer_result(model, qh, ih, calib)
    assert ra.method == "ar" and ra.config.params == {"iters": 1} and ra.versions == {"auto-round": "0.16.1"}
    be = ra.block_errors()
    assert len(be) == model.config.num_hidden_layers and (be.rel_err > 0).all() and (be.rel_err < 1).all()
    mse = layer_error.layer_mse(model, calib, {"ar": (qa, ra), "hqq": (qh, rh)}, cache=False)
    assert set(mse.method) == {"ar", "hqq"} and len(mse) == 2 * 14
    assert (mse.rel_mse > 0).all() and mse.rel_mse.lt(1).all()
    toks = torch.cat(calib.samples)
    f = sensitivity.sensitivity(model, None, None, toks, result=(qa, ra), seqlen=32, n_windows=2, layers=[0],
                                families=["qkv"], modes=["only"], cache=False, progress=False)
    assert len(f) == 1 and f.kl.iloc[0] > 0 and f.attrs["provenance"]["method"] == "ar"


@needs_ar
@needs_hqq
def test_packed_export_of_a_peer_where_its_grid_matches(gemma, quantized, tmp_path):
    """AutoRound's model packs (the reload is its fake-quant model bit for bit); HQQ's default
    (float zero point) is refused with the exporter's one line."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from awqnb.export import packed

    _, tok, calib = gemma
    m, info = quantized["ar@iters=1"]
    meta = {"peer": reference.peer_config(info).to_dict(), "info": {k: v for k, v in info.items() if k != "params"}}
    packed.save_packed(m, tok, tmp_path / "ar", reference.grid_config(info), meta)
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "ar", quantization_config=CompressedTensorsConfig(dequantize=True))
    got = dict(r.named_parameters())
    for n, p in m.named_parameters():
        assert torch.equal(p, got[n]), n
    export = json.loads((tmp_path / "ar" / "quantization_metadata.json").read_text())
    assert export["peer"]["method"] == "ar" and export["export"]["max_abs_err"] == 0.0
    h, hinfo = quantized["hqq"]
    with pytest.raises(AwqnbError, match="not on a 4-bit grid") as e:
        packed.save_packed(h, tok, tmp_path / "hqq", reference.grid_config(hinfo), {})
    assert "\n" not in str(e.value) and not (tmp_path / "hqq").exists()


@needs_ar
def test_autoround_after_awqnbs_scales(gemma):
    """ar@prescale=awq: awqnb's awq search runs on AutoRound's calibration ids and its scales and
    clip ranges are folded into the model before AutoRound rounds it. With AutoRound's plain RTN
    (iters=0, disable_opt_rtn) the result is awqnb's `awq` on the same ids and seed: every tensor
    the scales fold into (the norms) exactly awqnb's, and the linears' codes the same but for ties
    of AutoRound's float16 scale (≥ 99% of codes per linear); without prescale the norms are the FP
    model's."""
    from awqnb.core.config import SearchConfig
    from awqnb.quant import pipeline
    from awqnb.quant.method_config import MethodConfig

    model, tok, _ = gemma
    cal = random_calibration(model.config.vocab_size)(3)
    got = {}
    for spec in ("ar@iters=0,disable_opt_rtn=true", "ar@iters=0,disable_opt_rtn=true,prescale=awq"):
        m = copy.deepcopy(model)
        got[spec] = (m, reference.quantize_reference(m, spec, cal, tok, 4, 32, False, device="cpu", seed=3))
    m_pre, info = got["ar@iters=0,disable_opt_rtn=true,prescale=awq"]
    assert info["prescale"] == "awq" and info["prescale_groups"] > 0 and info["prescale_s"] > 0
    assert info["on_awqnb_grid"] and info["params"]["prescale"] == "awq"
    awq = copy.deepcopy(model)
    pipeline.quantize(awq, MethodConfig("awq", Q, SearchConfig(), seed=3), cal, device="cpu", progress=False)
    pre, ref, fp = dict(m_pre.named_parameters()), dict(awq.named_parameters()), dict(model.named_parameters())
    plain = dict(got["ar@iters=0,disable_opt_rtn=true"][0].named_parameters())
    lin = {f"{n}.weight" for n, _ in reference.block_linears(m_pre)}
    others = [k for k in pre if k not in lin]
    assert all(torch.equal(pre[k], ref[k]) for k in others)
    assert all(torch.equal(plain[k], fp[k]) for k in others)
    folded = [k for k in others if not torch.equal(pre[k], fp[k])]
    assert any("layernorm" in k for k in folded), folded
    for k in lin:
        same = (recover_codes(pre[k], Q, k).q == recover_codes(ref[k], Q, k).q).float().mean()
        assert same >= 0.99, (k, float(same))


@pytest.mark.parametrize("spec,msg", [
    ("ar@nonsense=1", "ar has no parameter 'nonsense'"),
    ("ar@bits=3", "bits is set by the comparison"),
    ("ar@seed=3", "seed is set by the comparison"),
    ("ar@iters=ten", "iters=ten is not an int"),
    ("ar@iters=0,lr=0.01", "only when it tunes"),
    ("ar@iters=-1", "must be ≥ 0"),
    ("hqq@axis=2", "axis=2 must be 0 or 1"),
    ("hqq@nbits=3", "nbits is set by the comparison"),
    ("hqq@optimize=1", "optimize=1 is not a bool"),
    ("ar@prescale=rtn", "prescale=rtn is not an awqnb method with a scaler"),
    ("ar@prescale=3", "prescale=3 is not a str"),
])
def test_bad_peer_parameters_are_one_line(spec, msg, gemma):
    """Checked when the spec is read (the package need not be installed), and by the runner before
    any work."""
    with pytest.raises(AwqnbError, match=msg) as e:
        parse_spec(spec)
    assert "\n" not in str(e.value)
    model, tok, _ = gemma
    with pytest.raises(AwqnbError, match=msg):
        runner.run_comparison(model, ["rtn", spec], tokenizer=tok, seeds=(1,), calibration=random_calibration(100),
                              datasets={"toks": torch.zeros(96, dtype=torch.long)}, quant=Q, device="cpu",
                              progress=False)


def test_peer_specs_carry_their_parameters():
    p = parse_spec("ar@iters=200,lr=0.005,n_calib=16")
    assert p.kind == "reference" and p.method == "ar@iters=200,lr=0.005" and p.params == {"iters": 200, "lr": 0.005}
    assert p.calibration == {"n_calib": 16} and parse_spec(p.label) == p
    assert reference.split_name(p.method) == ("ar", {"iters": 200, "lr": 0.005})
    assert parse_spec("hqq").build().needs_calibration is False and parse_spec("ar").build().needs_calibration


def _hide(monkeypatch, module):
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named '{module}'")
        return real(name, *a, **k)

    for m in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setattr(builtins, "__import__", fake)


def test_peers_refused_without_their_package_others_run(gemma, monkeypatch):
    model, tok, _ = gemma
    _hide(monkeypatch, "auto_round")
    _hide(monkeypatch, "hqq")
    why = reference.refusal("ar@iters=0")
    assert why.startswith("ar needs AutoRound, which is not importable") and "awqnb[peers]" in why
    assert "hqq needs HQQ" in reference.refusal("hqq")
    c = runner.run_comparison(model, ["rtn", "ar@iters=0", "hqq"], tokenizer=tok, seeds=(1,),
                              calibration=random_calibration(model.config.vocab_size),
                              datasets={"toks": torch.randint(0, 100, (96,))}, quant=Q, eval_seqlen=48,
                              device="cpu", progress=False)
    assert set(c.skipped) == {"ar@iters=0", "hqq"} and all("\n" not in w for w in c.skipped.values())
    assert [r.label for r in c.runs if r.status == "ok"] == ["rtn"]


def test_peer_version_outside_the_tested_range(monkeypatch):
    for mod in ("auto_round", "hqq"):
        if mod not in sys.modules:
            monkeypatch.setitem(sys.modules, mod, type(sys)(mod))
    monkeypatch.setattr(reference, "tool_version", lambda name: "0.9.0")
    assert "0.16.x" in reference.refusal("ar") and "0.9.0" in reference.refusal("ar")
    assert "outside the tested range" in reference.refusal("hqq")


@needs_ar
def test_autoround_refuses_a_model_it_would_not_fully_quantize(tiny):
    """tiny-random-llama's k/v projections are 80 wide: AutoRound would keep them in 16 bits, so
    ar is refused before any work instead of compared unfairly."""
    model, tok, calib = tiny["tiny-random-llama"]
    with pytest.raises(AwqnbError, match=r"leave 4 of 14 block linears in full precision") as e:
        reference.quantize_reference(copy.deepcopy(model), "ar@iters=0", calib, tok, 4, 32)
    assert "\n" not in str(e.value)


@needs_ar
@needs_hqq
def test_scale_bench_times_peers_beside_awqnb(tmp_path):
    """bench/scale.py --peers: each peer a row of its own (tool, version, parameters, every repeat)
    on --peer-layers layers of the shape, and awqnb's rows carry each peer's s/layer over theirs."""
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_scale", bench / "scale.py")
        scale = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(scale)
        assert scale.main(["--shapes", "tiny:2", "--methods", "rtn", "--peers", "ar@iters=1,hqq", "--peer-layers", "2",
                           "--n-calib", "4", "--seqlen", "32", "--device", "cpu", "--repeats", "2",
                           "--out", str(tmp_path)]) == 0
    finally:
        sys.path.remove(str(bench))
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    by = {r["method"]: r for r in rows}
    assert by["rtn"]["tool"] == "awqnb" and by["rtn"]["layers"] == 2
    ar, hqq = by["ar@iters=1"], by["hqq"]
    assert ar["tool"] == "AutoRound" and ar["version"] == "0.16.1" and ar["params"] == {"iters": 1}
    assert hqq["tool"] == "HQQ" and hqq["version"].startswith("0.2.8")
    for r in (ar, hqq):
        assert r["shape"] == "tiny:2" and r["layers"] == 2 and r["repeats"] == 2 and len(r["repeats_total_s"]) == 2
        assert round(r["total_s"], 3) in r["repeats_total_s"]  # the row is one of its repeats (stored to ms)
    summary = (tmp_path / "summary.md").read_text()
    rtn_line = next(ln for ln in summary.splitlines() if "| awqnb | rtn |" in ln)
    want = f"ar@iters=1 {ar['s_per_layer'] / by['rtn']['s_per_layer']:.2f}× (2 layers)"
    assert want in rtn_line, rtn_line
