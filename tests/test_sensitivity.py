"""End-to-end layer sensitivity, mixed-precision plans in the quantizer, the CLI and the export."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from awqnb.export import packed as export
from awqnb.quant import pipeline
from awqnb.analysis import plans, sensitivity as S
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.quant.plan import Plan
from awqnb.analysis.statcache import DiagnosticsCache

from conftest import quantize_each  # noqa: E402

FAST = SearchConfig(n_grid=4)
SEQ, NWIN = 40, 2  # > the tiny Gemma's sliding window of 32


def _cfg(method="awq", plan=None, quant=QuantConfig(4, 32), **kw):
    return MethodConfig(method, quant, FAST, calib_batch_size=4, plan=plan, **kw)


def _tokens(n=SEQ * NWIN + 7):
    return torch.randint(0, 2000, (n,), generator=torch.Generator().manual_seed(1))


def _windows():
    return _tokens()[: SEQ * NWIN].view(NWIN, SEQ)


@pytest.fixture(scope="module")
def quantized(tiny):
    """Per tiny model: (fp model, calibration, quantized copy, QuantResult) of awq W4 g32."""
    return quantize_each(tiny, _cfg())


@pytest.fixture(scope="module")
def frames(quantized):
    out = {}
    for name, (fp, calib, q, res) in quantized.items():
        out[name] = S.sensitivity(fp, None, calib, _tokens(), seqlen=SEQ, n_windows=NWIN, result=(q, res),
                                  progress=False, cache=False)
    return out


def _kl_ppl(logits, ref_logits, ids):
    """Mean KL(ref ‖ logits) over predicted positions and perplexity, from full-model logits."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    lr = torch.log_softmax(ref_logits[:, :-1].double(), -1)
    kl = (lr.exp() * (lr - lp)).sum(-1).mean()
    nll = -lp.gather(-1, ids[:, 1:, None]).mean()
    return float(kl), math.exp(float(nll))


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_all_effective_weights_reproduce_the_quantized_model(quantized, name):
    """Every W_eff swapped into the FP model (its norms unfolded) gives the quantized model's logits."""
    fp, calib, q, res = quantized[name]
    ref = S.reference(fp, None, result=(q, res))
    hybrid = S.swap_effective(copy.deepcopy(fp), ref.weff)
    ids = _windows()
    with torch.no_grad():
        a, b, c = hybrid(ids).logits, q(ids).logits, fp(ids).logits
    assert (a - b).abs().max() < 1e-4 * b.abs().max()
    assert (b - c).abs().max() > 100 * (a - b).abs().max()  # the quantization is visible at that scale


@pytest.mark.parametrize("cdtype", [torch.float32, torch.bfloat16])
def test_reference_keeps_wq_in_the_models_dtype_and_forms_weff_exactly(tiny, cdtype):
    """A bf16 model's Reference holds W_q in bf16 (half a float32 copy) plus the folded scales, and
    forms W_eff from them bit for bit as `effective_weights` (float32) cast to the compute dtype —
    the old float32 copies — from the (model, result) pair and from a replayed QuantResult alike."""
    from awqnb.analysis.scales import effective_weights

    fp = copy.deepcopy(tiny["tiny-random-llama"][0]).to(torch.bfloat16)
    q = copy.deepcopy(fp)
    res = pipeline.quantize(q, _cfg(), tiny["tiny-random-llama"][2], progress=False)
    assert any(r.groups for r in res.layers)  # folded scales: W_eff ≠ W_q, the division is tested
    for ref in (S.reference(fp, None, result=(q, res), dtype=cdtype), S.reference(fp, None, result=res, dtype=cdtype)):
        for j in range(len(res.layers)):
            old = {n: w.to("cpu", cdtype) for n, w in effective_weights(q, res, j, device="cpu").items()}
            assert all(w.dtype == torch.bfloat16 for w in ref.wq[j].values())
            new = ref.weff[j]
            assert new.keys() == old.keys()
            for n in old:
                assert new[n].dtype == cdtype and torch.equal(new[n], old[n]), (j, n)
                assert torch.equal(ref.weights(j, "cpu", torch.float32)[n], effective_weights(q, res, j, "cpu")[n])
    # the pair's weights are copied: editing the quantized model later does not edit the Reference
    ref = S.reference(fp, None, result=(q, res))
    before = ref.weff[0]["mlp.down_proj"].clone()
    with torch.no_grad():
        q.model.layers[0].mlp.down_proj.weight.add_(1.0)
    assert torch.equal(ref.weff[0]["mlp.down_proj"], before)


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_variants_from_cached_prefixes_equal_full_forwards(quantized, frames, name):
    """A row of the frame (computed from cached hidden states, blocks i..L only) equals KL / ppl of
    a full forward of the same hybrid model, for both modes, layers 0 and 1; also FP and fully
    quantized references."""
    fp, calib, q, res = quantized[name]
    df = frames[name]
    ref = S.reference(fp, None, result=(q, res))
    ids = _windows()
    fams = list(S.family_linears(pipeline.resolve_spec(fp)))
    with torch.no_grad():
        fp_logits = fp(ids).logits
        _, fp_ppl = _kl_ppl(fp_logits, fp_logits, ids)
        qkl, qppl = _kl_ppl(q(ids).logits, fp_logits, ids)
    assert df.attrs["fp_ppl"] == pytest.approx(fp_ppl, rel=1e-5)
    assert df.attrs["quant_ppl"] == pytest.approx(qppl, rel=1e-5)
    assert df.attrs["quant_kl"] == pytest.approx(qkl, rel=1e-4, abs=1e-9)
    for layer, fam, mode in [(0, "qkv", "only"), (1, "down", "only"), (0, "gate_up", "except"), (1, "vo", "except")]:
        which = [(layer, fam)] if mode == "only" else [(l, f) for l in (0, 1) for f in fams if (l, f) != (layer, fam)]
        hybrid = S.swap_effective(copy.deepcopy(fp), ref.weff, which)
        with torch.no_grad():
            kl, ppl = _kl_ppl(hybrid(ids).logits, fp_logits, ids)
        row = df[(df.layer == layer) & (df.family == fam) & (df["mode"] == mode)].iloc[0]
        assert row.kl == pytest.approx(kl, rel=1e-4, abs=1e-9), (layer, fam, mode)
        assert row.ppl == pytest.approx(ppl, rel=1e-5)
        assert row.dppl == pytest.approx(ppl - fp_ppl if mode == "only" else qppl - ppl, rel=1e-3, abs=1e-6)
        assert row.kl > 1e-6  # something was measured


def test_frame_schema_and_reading(frames):
    df = frames["tiny-random-llama"]
    assert list(df.columns) == S.COLUMNS
    assert len(df) == 2 * 4 * 2 and set(df["mode"]) == {"only", "except"}
    assert str(df.layer.dtype) == "int64" and str(df.n_params.dtype) == "int64"
    assert set(df.mse_kind) == {"relative"} and (df.mse > 0).all()
    # n_params: q+k+v of a 160-wide model with 2 kv heads of 40
    assert df[(df.family == "qkv")].n_params.iloc[0] == 160 * 160 + 2 * (80 * 160)
    prov = df.attrs["provenance"]
    assert prov["method"] == "awq" and prov["bits"] == 4 and prov["group_size"] == 32
    assert prov["eval"]["seqlen"] == SEQ and prov["eval"]["n_windows"] == NWIN
    assert prov["calibration"]["n_calib"] == 4 and prov["dtype"] == "float32"
    # the sum of one layer's 'only' KLs decides the most sensitive layer
    only = df[df["mode"] == "only"].groupby("layer").kl.sum()
    assert S.most_sensitive_layer(df) == int(only.idxmax())
    r = S.rank(df, "kl", "only")
    assert list(r["rank"]) == list(range(1, 9)) and r.kl.is_monotonic_decreasing
    r = S.rank(df, "kl", "except")
    assert r.kl.is_monotonic_increasing  # lowest KL without it = most recovered by keeping it FP


def test_plans_from_the_frame(frames):
    df = frames["tiny-random-llama"]
    top = S.rank(df, "kl", "only")
    p = plans.plan_from_sensitivity(df, k=2)
    assert [(l, f) for l, f, _ in p.entries] == sorted(zip(top.layer[:2], top.family[:2]),
                                                       key=lambda t: (t[0], ["qkv", "vo", "gate_up", "down"].index(t[1])))
    assert {b for *_, b in p.entries} == {8}
    pm = plans.plan_from_sensitivity(df, k=1, by="mse")
    m = df.drop_duplicates(["layer", "family"]).sort_values("mse", ascending=False).iloc[0]
    assert pm.entries == ((int(m.layer), m.family, 8),)
    assert plans.plan_from_sensitivity(df, k=3, by="random", seed=5) == plans.plan_from_sensitivity(df, k=3, by="random", seed=5)
    # recovery: the family whose FP copy lowers the fully quantized model's KL most
    ex = df[df["mode"] == "except"].sort_values("kl").iloc[0]
    assert plans.plan_from_sensitivity(df, k=1, by="recovery").entries == ((int(ex.layer), ex.family, 8),)
    # density: 'only' KL per parameter, so a small family can come before a larger, more sensitive one
    only = df[df["mode"] == "only"]
    dens = (only.kl / only.n_params).to_numpy()
    best = only.iloc[int(dens.argmax())]
    assert plans.plan_from_sensitivity(df, k=1, by="density").entries == ((int(best.layer), best.family, 8),)
    two = df.copy()
    two.loc[(two["mode"] == "only") & (two.family == "qkv"), "kl"] = 1.0  # 2 qkv families, both very sensitive
    two.loc[(two["mode"] == "only") & (two.family == "down"), "kl"] = 0.9
    two.loc[(two["mode"] == "only") & (two.family == "down"), "n_params"] = 1  # …but a down costs almost nothing
    assert {f for _, f, _ in plans.plan_from_sensitivity(two, k=2, by="density").entries} == {"down"}
    assert {f for _, f, _ in plans.plan_from_sensitivity(two, k=2, by="kl").entries} == {"qkv"}
    with pytest.raises(AwqnbError, match="'except' rows"):
        plans.plan_from_sensitivity(df[df["mode"] == "only"], k=1, by="recovery")
    with pytest.raises(AwqnbError, match="'only' rows"):
        plans.plan_from_sensitivity(df[df["mode"] == "except"], k=1, by="density")
    with pytest.raises(AwqnbError, match="unknown"):
        plans.plan_from_sensitivity(df, k=1, by="magic")
    # average bits: weighted by n_params over all 8 candidates, never above the budget
    for budget in (4.0, 4.5, 5.5, 8.0):
        pb = plans.plan_from_sensitivity(df, avg_bits=budget)
        assert plans.plan_avg_bits(df, pb) <= budget + 1e-12
    assert len(plans.plan_from_sensitivity(df, avg_bits=8.0)) == 8 and len(plans.plan_from_sensitivity(df, avg_bits=4.0)) == 0
    pl = plans.plan_from_sensitivity(df, max_linears=2)
    assert 0 < plans.plan_linears(df, pl) <= 2
    with pytest.raises(AwqnbError, match="exactly one budget"):
        plans.plan_from_sensitivity(df, k=1, avg_bits=5)
    with pytest.raises(AwqnbError, match="keep_bits=5"):
        plans.plan_from_sensitivity(df, k=1, keep_bits=5)


def test_plan_json_round_trip_and_validation(tmp_path):
    p = Plan.parse_keep("12.down, 1.gate_up:16,0.o")
    assert p.entries == ((0, "vo", 8), (1, "gate_up", 16), (12, "down", 8))
    f = tmp_path / "plan.json"
    p.to_json(f)
    assert Plan.read(f) == p and Plan.from_obj(json.loads(f.read_text())["keep"]) == p
    assert MethodConfig.from_dict(_cfg(plan=p).to_dict()).plan == p
    for bad, msg in [("3.mlp", "family 'mlp' does not exist"), ("3.down:5", "bits 5"), ("down", "LAYER.FAMILY"),
                     ("1.down,1.down:16", "twice"), ("x.down", "not a whole number"), ("", "empty")]:
        with pytest.raises(AwqnbError, match=msg):
            Plan.parse_keep(bad)
    f.write_text('{"keep": [{"layer": 0}]}')
    with pytest.raises(AwqnbError, match="lacks family"):
        Plan.read(f)
    # a config without a plan keeps its old dict (and so its output directory hash)
    assert "plan" not in _cfg().to_dict() and _cfg(plan=Plan()).plan is None
    assert _cfg(plan=p).tag.endswith("_keep3")


def test_bad_input_is_refused_before_work(tiny):
    fp, tok, calib = tiny["tiny-random-llama"]
    m = copy.deepcopy(fp)
    before = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(AwqnbError, match="layer 2 does not exist.*2 decoder layers"):
        pipeline.quantize(m, _cfg(plan=Plan.parse_keep("2.down")), calib, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    toks = _tokens()
    for kw, msg in [(dict(n_windows=0), "n_windows=0"), (dict(seqlen=0), "seqlen=0"),
                    (dict(n_windows=NWIN + 1), "needs n_windows × seqlen"), (dict(families=["mlp"]), "family 'mlp'"),
                    (dict(modes=("all",)), "unknown"), (dict(layers=[5]), "layer 5 is out of range")]:
        args = dict(seqlen=SEQ, n_windows=NWIN, progress=False, cache=False)
        args.update(kw)
        with pytest.raises(AwqnbError, match=msg):
            S.sensitivity(m, _cfg(), calib, toks, **args)
    with pytest.raises(AwqnbError, match="does not exist"):
        S.sensitivity(m, _cfg(plan=Plan.parse_keep("7.qkv")), calib, toks, seqlen=SEQ, n_windows=NWIN, cache=False)


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_plan_keeping_everything_fp_is_the_fp_model(tiny, method):
    """Every family at 16: the run is the FP model (rtn: the same weights; awq: scales folded
    exactly), so every 'only' KL is 0 and the slice's ppl is the FP ppl."""
    fp, tok, calib = tiny["tiny-random-llama"]
    plan = Plan(tuple((l, f, 16) for l in (0, 1) for f in ("qkv", "vo", "gate_up", "down")))
    q = copy.deepcopy(fp)
    res = pipeline.quantize(q, _cfg(method, plan=plan), calib if method == "awq" else None, progress=False)
    ids = _windows()
    with torch.no_grad():
        assert torch.allclose(q(ids).logits, fp(ids).logits, atol=1e-4)
    if method == "rtn":
        assert all(torch.equal(p, dict(fp.named_parameters())[n]) for n, p in q.named_parameters())
    df = S.sensitivity(fp, None, calib, _tokens(), seqlen=SEQ, n_windows=NWIN, result=(q, res), modes="only",
                       progress=False, cache=False)
    # rtn: W_eff is W bit for bit; awq: x·s/s in float32 (quantized runs measure ~1e-3 nats)
    tol = 1e-12 if method == "rtn" else 1e-6
    assert df.kl.abs().max() < tol and df.mse.abs().max() < tol and abs(df.attrs["quant_kl"]) < tol
    assert df.ppl.to_numpy() == pytest.approx(df.attrs["fp_ppl"], rel=tol)


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_planned_8bit_family_matches_keep_weights(tiny, quantized, method):
    """The pipeline keeps a planned family at 8 bits on the run's scales: block 0 (same inputs with
    or without the plan) equals `keep_weights` of the unplanned run, which pareto swaps in."""
    fp, tok, calib = tiny["tiny-random-llama"]
    c = calib if method == "awq" else None
    base = copy.deepcopy(fp)
    res0 = pipeline.quantize(base, _cfg(method), c, progress=False)
    q = copy.deepcopy(fp)
    res = pipeline.quantize(q, _cfg(method, plan=Plan.parse_keep("0.down,0.qkv")), c, progress=False)
    kw = plans.keep_weights(fp, res0, 8, [0])
    eff = S.reference(fp, None, result=(q, res)).weff[0]
    eff0 = S.reference(fp, None, result=(base, res0)).weff[0]
    for n in ("mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"):
        assert torch.allclose(eff[n], kw[0][n], atol=1e-6), n
        assert not torch.allclose(eff[n], eff0[n], atol=1e-4), n  # 8 bits is not the 4-bit run
    assert torch.allclose(eff["mlp.gate_proj"], eff0["mlp.gate_proj"], atol=1e-6)  # not planned: as before
    # apply() replays the plan
    again = pipeline.apply(copy.deepcopy(fp), res)
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in q.named_parameters())
    assert res.metadata()["plan"]["keep"] == [{"layer": 0, "family": "qkv", "bits": 8},
                                              {"layer": 0, "family": "down", "bits": 8}]


def test_pareto_and_cache(quantized, frames, tmp_path):
    fp, calib, q, res = quantized["tiny-random-llama"]
    df = frames["tiny-random-llama"]
    p = plans.pareto(fp, None, calib, _tokens(), df, ks=(0, 1, 8), keep_bits=16, strategies=("sensitivity", "recovery", "random"),
                 result=(q, res), progress=False)
    assert list(p.columns[:5]) == ["strategy", "k", "avg_bits", "ppl", "kl"]
    k0 = p[p.k == 0].iloc[0]
    assert k0.ppl == pytest.approx(df.attrs["quant_ppl"], rel=1e-9) and k0.avg_bits == 4
    k8 = p[p.k == 8].iloc[0]  # everything kept FP: the FP model
    assert k8.ppl == pytest.approx(df.attrs["fp_ppl"], rel=1e-6) and abs(k8.kl) < 1e-7 and k8.avg_bits == 16
    k1 = p[(p.k == 1) & (p.strategy == "sensitivity")].iloc[0]  # one family FP = that family's 'except' row
    top = plans.plan_from_sensitivity(df, k=1).entries[0]
    row = df[(df.layer == top[0]) & (df.family == top[1]) & (df["mode"] == "except")].iloc[0]
    assert k1.kl == pytest.approx(row.kl, rel=1e-6) and k1.ppl == pytest.approx(row.ppl, rel=1e-9)
    # 'recovery' keeps the family whose FP copy the 'except' rows say recovers most: at k = 1 (kept FP),
    # the plan's KL is exactly that smallest 'except' KL
    r1 = p[(p.k == 1) & (p.strategy == "recovery")].iloc[0]
    assert r1.kl == pytest.approx(df[df["mode"] == "except"].kl.min(), rel=1e-6)
    # cache: a second call reads the frame (and attrs) back without recomputing
    cache = DiagnosticsCache(tmp_path / "cache")
    args = dict(seqlen=SEQ, n_windows=NWIN, result=(q, res), progress=False, cache=cache, modes="except",
                layers=[1], families=["down"])
    a = S.sensitivity(fp, None, calib, _tokens(), **args)
    fresh = DiagnosticsCache(tmp_path / "cache")  # from disk
    b = S.sensitivity(fp, None, calib, _tokens(), **{**args, "cache": fresh})
    assert fresh.hits == 1 and fresh.computed == 0
    assert a.equals(b) and b.attrs["quant_ppl"] == a.attrs["quant_ppl"] and b.attrs["provenance"] == a.attrs["provenance"]
    assert len(b) == 1 and b.kl.iloc[0] == pytest.approx(
        df[(df.layer == 1) & (df.family == "down") & (df["mode"] == "except")].kl.iloc[0], rel=1e-9)


def _packed_cfg(sym):
    return _cfg("rtn", plan=Plan.parse_keep("0.down,1.qkv:16"), quant=QuantConfig(4, 32, sym))


@pytest.mark.parametrize("sym", [False, True])
def test_export_keeps_planned_linears_out_of_the_4bit_set(tiny, tmp_path, sym):
    """FP-kept linears are in `ignore`; 8-bit kept ones are a second exact-name group (symmetric) or
    dense in `ignore` (asymmetric: transformers' dequantize-on-load path reads one group); the
    reloaded model equals the fake-quant one either way."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    fp, tok, calib = tiny["tiny-random-llama"]
    cfg = _packed_cfg(sym)
    m = copy.deepcopy(fp)
    res = pipeline.quantize(m, cfg, None, progress=False)
    export.save_packed(m, tok, tmp_path / "p", cfg, res.metadata(), result=res)
    qc = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    fp_kept = [f"model.layers.1.self_attn.{x}_proj" for x in "kqv"]
    assert set(fp_kept) <= set(qc["ignore"]) and "lm_head" in qc["ignore"]
    groups = qc["config_groups"]
    # a plan: the 4-bit group names its linears exactly, so no class target catches an 8-bit one
    assert "Linear" not in groups["group_0"]["targets"] and groups["group_0"]["weights"]["num_bits"] == 4
    assert "model.layers.0.mlp.gate_proj" in groups["group_0"]["targets"]
    if sym:
        assert groups["group_1"]["targets"] == ["model.layers.0.mlp.down_proj"]
        assert groups["group_1"]["weights"]["num_bits"] == 8
        assert "model.layers.0.mlp.down_proj" not in qc["ignore"]
    else:
        assert list(groups) == ["group_0"] and "model.layers.0.mlp.down_proj" in qc["ignore"]
    meta = json.loads((tmp_path / "p" / "quantization_metadata.json").read_text())
    assert meta["export"]["linears"] == 14 - 3 - (0 if sym else 1)
    assert meta["export"]["other_bits"]["8"] == ["model.layers.0.mlp.down_proj"]
    assert meta["plan"]["keep"][0] == {"layer": 0, "family": "down", "bits": 8}
    kw = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    r = export.decompress(AutoModelForCausalLM.from_pretrained(tmp_path / "p", **kw).eval())  # symmetric: lazy
    got = dict(r.named_parameters())
    for n, p in m.named_parameters():
        assert torch.equal(p, got[n]), n


def test_cli_keep_writes_the_plan(tmp_path, capsys):
    from awqnb import cli

    out = tmp_path / "out"
    rc = cli.main(["quantize", "--model", "tiny-random-llama", "--method", "rtn", "--group-size", "32",
                   "--keep", "1.down,0.gate_up:16", "--output-dir", str(out), "--format", "fake"])
    assert rc == 0
    dest = next(out.iterdir())
    assert "_keep2_" in dest.name
    meta = json.loads((dest / "quantization_metadata.json").read_text())
    assert meta["config"]["plan"] == [{"layer": 0, "family": "gate_up", "bits": 16},
                                      {"layer": 1, "family": "down", "bits": 8}]
    assert meta["plan"]["keep"] == meta["config"]["plan"]
    plan = tmp_path / "plan.json"
    Plan.parse_keep("9.down").to_json(plan)
    capsys.readouterr()
    rc = cli.main(["quantize", "--model", "tiny-random-llama", "--method", "rtn", "--plan", str(plan),
                   "--output-dir", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "layer 9 does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())
    rc = cli.main(["quantize", "--model", "tiny-random-llama", "--method", "rtn", "--keep", "0.down:5",
                   "--output-dir", str(tmp_path / "o3")])
    assert rc == 2 and "bits 5" in capsys.readouterr().err


# --- the ranking slice is not the scoring slice (issue 25 item 4) -----------------------------

def _occurs(window, stream) -> bool:
    """Whether `window` appears as a contiguous run anywhere in `stream` (both 1-D)."""
    import numpy as np

    w, s = window.numpy(), stream.numpy()
    n = len(w)
    for i in np.flatnonzero(s[: len(s) - n + 1] == w[0]):
        if np.array_equal(s[i:i + n], w):
            return True
    return False


def test_wikitext2_ranking_slice_is_disjoint_from_the_evaluation(tiny):
    from awqnb.model.data import load_eval_tokens, ranking_tokens

    _, tok, _ = tiny["tiny-random-llama"]
    seqlen, n = 64, 8
    rank_toks, desc = ranking_tokens(tok, "wikitext2", n_windows=n, seqlen=seqlen, calib_dataset="wikitext2")
    eval_toks = load_eval_tokens(tok, "wikitext2")
    assert desc.startswith("WikiText-2 validation, first 8 × 64 tokens; evaluation: WikiText-2 test (disjoint)")
    assert "calibration is also drawn from WikiText-2 validation" in desc
    ranked = S.eval_windows(rank_toks, seqlen, n)
    scored = S.eval_windows(eval_toks, seqlen, n)
    assert not any(_occurs(w, eval_toks) for w in ranked)  # no ranking window anywhere in the test set
    assert not any(_occurs(w, rank_toks) for w in scored)  # nor a scoring window in the validation set


def test_ranking_on_the_evaluation_set_is_refused_unless_asked(tiny):
    from awqnb.model.data import ranking_dataset, ranking_tokens

    assert ranking_dataset("wikitext2") == "wikitext2-validation"
    assert ranking_dataset("c4") == "c4-heldout"
    assert ranking_dataset("notes.txt") == "wikitext2-validation"
    with pytest.raises(AwqnbError, match="is the evaluation set"):
        ranking_dataset("wikitext2", "wikitext2")
    _, tok, _ = tiny["tiny-random-llama"]
    _, desc = ranking_tokens(tok, "wikitext2", rank_dataset="wikitext2", allow_eval=True, n_windows=2, seqlen=64)
    assert desc == ("WikiText-2 test, first 2 × 64 tokens; evaluation: the same set — the plans are scored on the "
                    "data they were chosen on")


def test_plans_ranked_on_one_slice_are_scored_on_another_and_the_record_names_both(quantized):
    import json
    from pathlib import Path

    fp, calib, q, res = quantized["tiny-random-llama"]
    rank_toks = _tokens()
    score_toks = torch.randint(0, 2000, (SEQ * NWIN,), generator=torch.Generator().manual_seed(7))
    sens = S.sensitivity(fp, None, calib, rank_toks, seqlen=SEQ, n_windows=NWIN, result=(q, res), progress=False,
                         cache=False, slice_name="ranking tokens")
    front = plans.pareto(fp, None, calib, score_toks, sens, ks=(0, 1), strategies=("sensitivity",), result=(q, res),
                         progress=False, slice_name="scoring tokens")
    assert front.attrs["rank_slice"]["slice"] == "ranking tokens"
    assert front.attrs["score_slice"]["slice"] == "scoring tokens" and front.attrs["same_slice"] is False
    assert front.attrs["rank_slice"]["tokens_sha1"] != front.attrs["score_slice"]["tokens_sha1"]
    rec = plans.sensitivity_record(sens, front, method="awq")
    assert (rec["rank_slice"], rec["score_slice"], rec["same_slice"]) == ("ranking tokens", "scoring tokens", False)
    assert rec["score_fp_ppl"] == pytest.approx(front.attrs["fp_ppl"])
    assert rec["score_quant_ppl"] == pytest.approx(front[front.k == 0].ppl.iloc[0])
    assert rec["fp_ppl"] == sens.attrs["fp_ppl"] != rec["score_fp_ppl"]
    # the report's metrics.json 'sensitivity' is this record, ranked on ranking_tokens and scored on the evaluation
    nb = json.loads((Path(__file__).parents[1] / "notebooks" / "model_report.ipynb").read_text(encoding="utf-8"))
    src = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "sensitivity_record(" in src and "ranking_tokens(" in src and "slice_name=rank_slice" in src
    assert "slice_name=score_slice" in src and "sensitivity=sens_metrics" in src


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_prefixes_kept_on_the_host_give_the_same_frame(quantized, frames, name, monkeypatch):
    """Prefixes moved off the device (on a GPU: when they would take more than SENS_PREFIX_BYTES;
    forced here) and read back one at a time give the very same frame, with a state cap of one
    start layer per group (more groups, more block walks)."""
    fp, calib, q, res = quantized[name]
    monkeypatch.setattr(S, "_prefixes_on_host", lambda dev, offload, nbytes: nbytes > 0)
    copied = []
    keep = S.EvalSlice.keep

    def counting_keep(self, hs):
        out = keep(self, hs)
        copied.extend(o is not h and torch.equal(o, h) for o, h in zip(out, hs))
        return out

    monkeypatch.setattr(S.EvalSlice, "keep", counting_keep)
    df = S.sensitivity(fp, None, calib, _tokens(), seqlen=SEQ, n_windows=NWIN, result=(q, res), progress=False,
                       cache=False, max_states=8)
    assert copied and all(copied)  # every prefix went through the host copy
    want = frames[name]
    assert df[["layer", "family", "mode"]].equals(want[["layer", "family", "mode"]])
    assert torch.equal(torch.tensor(df.kl.values), torch.tensor(want.kl.values))
    assert torch.equal(torch.tensor(df.ppl.values), torch.tensor(want.ppl.values))


def test_the_passes_gpu_caches_are_bounded_whatever_the_depth(monkeypatch):
    """On a GPU with room to spare (simulated: 140 GB free), the hybrid states held at once are
    capped at SENS_STATES_BYTES and the prefixes of a deep model go to the host; the refusal
    estimate counts them the same way, so it is flat in depth once the prefixes leave the GPU."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from awqnb.engine import budget

    dev = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (140 * 10**9, 150 * 10**9))
    one = 8 * 512 * 8192 * 4  # a 70B-wide float32 state of 8 × 512 tokens: 134 MB
    state = SimpleNamespace(numel=lambda: one // 4, element_size=lambda: 4)
    sl = SimpleNamespace(h_fp=[[state]], dev=dev, engine=SimpleNamespace(offload=False))
    ms = S._max_states(sl, None)
    assert ms * one <= budget.SENS_STATES_BYTES < (ms + 1) * one
    assert not S._prefixes_on_host(dev, False, budget.SENS_PREFIX_BYTES)
    assert S._prefixes_on_host(dev, False, budget.SENS_PREFIX_BYTES + 1)
    assert not S._prefixes_on_host(dev, True, 10**12) and not S._prefixes_on_host(torch.device("cpu"), False, 10**12)

    def est(layers):
        cfg = LlamaConfig(vocab_size=128, hidden_size=8192, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=64, num_key_value_heads=8)
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        return budget.sensitivity_estimate(model, "cuda:0", torch.float32, 8, 512, 8, False, 2048).parts["cached states"]

    assert est(2) == (2 * 2 + 1 + 8) * one  # shallow: the prefixes stay on the GPU
    assert est(40) == est(80) == (2 + 8) * one  # deep: two of them at a time
