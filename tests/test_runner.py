"""The comparison runner (awqnb.compare.runner) on tiny random models: tidy shape over methods × seeds,
fresh exact copies per method, the verdicts of awqnb.analysis.stats over seeds, seeds < 1, the reference methods
refused without llm-compressor, JSON round trip; bench/quality.py on the runner."""
import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from awqnb.compare import comparison, runner
from awqnb.core.config import QuantConfig, SearchConfig
from conftest import random_calibration
from awqnb.core.errors import AwqnbError
from awqnb.analysis import stats
from awqnb.analysis.evaluate import PerplexityResult

ROOT = Path(__file__).resolve().parents[1]
Q = QuantConfig(bits=4, group_size=32)
S = SearchConfig(n_grid=4)




@pytest.fixture(scope="module")
def setup(tiny):
    model, tok, _ = tiny["tiny-random-llama"]
    g = torch.Generator().manual_seed(1)
    data = {"toks": torch.randint(0, model.config.vocab_size, (4 * 48,), generator=g),
            "texts": ["The tower is 324 metres tall.", "Its base is square, 125 metres on each side.",
                      "A third sentence, a little longer than the others, for the sample protocol."]}
    return model, tok, data


def _snapshot(model):
    return {k: v.detach().clone() for k, v in list(model.named_parameters()) + list(model.named_buffers())}


def _same(model, snap):
    cur = dict(list(model.named_parameters()) + list(model.named_buffers()))
    return set(cur) == set(snap) and all(cur[k].dtype == snap[k].dtype and torch.equal(cur[k], snap[k]) for k in snap)


@pytest.fixture(scope="module")
def comp(setup):
    model, tok, data = setup
    return runner.run_comparison(model, ["rtn", "awq"], tokenizer=tok, seeds=(1, 2), calibration=random_calibration(1000),
                                 datasets=data, quant=Q, search=S, eval_seqlen=48, sample_max_length=32,
                                 device="cpu", layer_mse=True, mse_samples=2, model_name="tiny-random-llama",
                                 progress=False)


def test_tidy_shape_two_methods_two_seeds(comp):
    f = comp.frame()
    assert len(f) == 2 * 2 * 2  # (rtn, awq) × seeds (1, 2) × (toks, texts)
    assert set(zip(f.label, f.seed, f.dataset)) == {(m, s, d) for m in ("rtn", "awq") for s in (1, 2)
                                                     for d in ("toks", "texts")}
    assert set(f.protocol) == {"gptq-token", "sample"}
    assert (f[f.dataset == "toks"].n_units == 4).all() and all(len(x) == 4 for x in f[f.dataset == "toks"].nll)
    assert (f.status == "ok").all() and f.ppl.map(math.isfinite).all()
    assert f[f.label == "rtn"].shared.all() and not f[f.label == "awq"].shared.any()  # rtn: no calibration, run once
    assert [(r.label, r.seed) for r in comp.runs] == [("rtn", 1), ("awq", 1), ("awq", 2)]
    assert f[f.label == "awq"].quantize_s.gt(0).all()
    aw = {s: comp.per_seed("awq", "toks")[s].ppl for s in (1, 2)}
    assert aw[1] != aw[2]  # another calibration draw, another model
    s = comp.summary().set_index(["label", "dataset"])
    assert len(s) == 4 and (s.n_seeds == 2).all()
    row = s.loc[("awq", "toks")]
    assert row.ppl_mean == pytest.approx((aw[1] + aw[2]) / 2)
    assert row.ppl_sd == pytest.approx(abs(aw[1] - aw[2]) / math.sqrt(2))
    assert s.loc[("rtn", "toks")].ppl_sd == 0
    assert "1: " in row.per_seed and "2: " in row.per_seed
    v = comp.verdicts("rtn")
    assert set(zip(v.label, v.dataset)) == {("awq", "toks"), ("awq", "texts")}
    assert (v.n_seeds == 2).all() and (v.verdict == "cannot separate seeds").all()  # 2 seeds: no verdict
    assert v.noise.str.contains("fewer than 3 seeds").all()
    assert ((v.ci_low <= v.delta_pct) & (v.delta_pct <= v.ci_high)).all()
    assert set(comp.mse.method) == {"rtn", "awq"} and set(comp.mse.seed) == {1}
    assert set(comp.quant_results) == {("rtn", 1), ("awq", 1), ("awq", 2)}


def test_json_round_trip_keeps_provenance_and_units(comp, tmp_path):
    p = comp.to_json(tmp_path / "cmp.json")
    d = json.loads(p.read_text())
    prov = d["provenance"]
    assert prov["seeds"] == [1, 2] and prov["bits"] == 4 and prov["group_size"] == 32 and prov["complete"]
    assert [m["label"] for m in prov["methods"]] == ["rtn", "awq"]
    assert prov["methods"][1]["config"]["search"]["n_grid"] == 4
    assert {x["name"]: x["protocol"] for x in prov["datasets"]} == {"toks": "gptq-token", "texts": "sample"}
    assert prov["versions"]["torch"] and prov["device"] == "cpu" and "llmcompressor" in prov["versions"]
    back = comparison.Comparison.read(p)
    assert back.frame().drop(columns=["nll", "n_tokens"]).equals(comp.frame().drop(columns=["nll", "n_tokens"]))
    assert back.per_seed("awq", "toks")[2].nll == comp.per_seed("awq", "toks")[2].nll
    assert back.verdicts("rtn").equals(comp.verdicts("rtn"))
    with pytest.raises(AwqnbError, match="not an awqnb comparison"):
        comparison.Comparison.from_dict({"format": "x"})


def test_each_method_quantizes_an_exact_fresh_copy(setup, monkeypatch):
    """Every quantization starts from parameters and buffers equal (values and dtypes) to the FP
    model's, although each evaluation casts its copy to bf16 and a method scribbles on a buffer."""
    from awqnb.quant import pipeline

    model, tok, data = setup
    snap = _snapshot(model)
    seen = []
    real = pipeline.quantize

    def checked(m, cfg, calib, **kw):
        seen.append((cfg.method, _same(m, snap)))
        out = real(m, cfg, calib, **kw)
        for _, b in m.named_buffers():  # a quantizer that leaves something behind in its copy
            b.add_(1.0)
        return out

    monkeypatch.setattr(runner, "quantize", checked)  # what the runner calls
    comp = runner.run_comparison(model, ["rtn", "awq", "awq_sh"], tokenizer=tok, seeds=(1, 2),
                                 calibration=random_calibration(1000), datasets={"toks": data["toks"]}, quant=Q, search=S,
                                 eval_seqlen=48, device="cpu", eval_dtype="bfloat16", progress=False)
    assert [m for m, _ in seen] == ["rtn", "awq", "awq_sh", "awq", "awq_sh"]
    assert all(ok for _, ok in seen), seen
    assert _same(model, snap)  # the FP model itself is untouched
    assert comp.provenance["eval_dtype"] == "bfloat16"
    assert comp.per_seed("awq", "toks")[1].meta["seed"] == 1
    # the check itself bites: a copy that is not fresh fails it
    leaky = copy.deepcopy(model)
    next(b for _, b in leaky.named_buffers()).add_(1e-3)
    assert not _same(leaky, snap)


def _res(nll, ds="w"):
    return PerplexityResult(ds, "gptq-token", 64, math.exp(sum(nll) / len(nll)), list(nll), [63] * len(nll))


def _seeds(shifts, base_nll, ds="w"):
    return {s: _res([v + off for v in base_nll], ds) for s, off in shifts.items()}


def test_verdicts_over_seeds_follow_the_rule():
    g = torch.Generator().manual_seed(0)
    base = {s: _res((3 + 0.1 * torch.randn(30, generator=g)).tolist()) for s in (1, 2, 3)}
    iv = stats.paired_interval(base, base)
    assert (iv.delta_pct, iv.n_seeds, iv.verdict) == (0.0, 3, "within noise") and iv.ci_low == iv.ci_high == 0
    shifted = {s: _res([v - 0.05 for v in r.nll]) for s, r in base.items()}
    iv = stats.paired_interval(shifted, base)
    assert iv.delta_pct == pytest.approx((math.exp(-0.05) - 1) * 100) and iv.verdict == "better"
    assert stats.paired_interval(base, shifted).verdict == "worse"
    # seed noise: each seed shifted by a different amount around −1% → within noise with 3 seeds (t = 4.30),
    # although every seed is better on every window; the same spread over 5 seeds is resolved
    three = _seeds({1: -0.02, 2: -0.01, 3: 0.0}, base[1].nll)
    iv3 = stats.paired_interval(three, {s: base[1] for s in three})
    assert iv3.verdict == "within noise" and iv3.ci_low < 0 < iv3.ci_high
    half = math.log1p(iv3.ci_high / 100) - math.log(1 + iv3.delta_pct / 100)
    assert half == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-4)  # t_2 × sd / √k, no window term
    five = _seeds({1: -0.02, 2: -0.015, 3: -0.01, 4: -0.005, 5: 0.0}, base[1].nll)
    assert stats.paired_interval(five, {s: base[1] for s in five}).verdict == "better"
    # two seeds that agree perfectly still give no verdict; neither side calibrated gives one on windows
    two = {s: shifted[s] for s in (1, 2)}
    assert stats.paired_interval(two, base).verdict == "cannot separate seeds"
    assert stats.paired_interval({1: shifted[1]}, {1: base[1]}, calibrated=False).verdict == "better"
    with pytest.raises(AwqnbError, match="different units"):
        stats.paired_interval({1: _res([3.0] * 4)}, {1: _res([3.0] * 5)})
    with pytest.raises(AwqnbError, match="no calibration seed in common"):
        stats.paired_interval({1: base[1]}, {2: base[2]})


def test_seed_claims_over_three_seeds_say_held_or_did_not_hold():
    """compare.seed_claims on a Comparison: 'held' where the rule says better, 'did not hold' where
    it says worse, 'within noise' where a seed spread hides the difference."""
    from awqnb.compare.claims import method_configs

    cfgs = method_configs(["awq", "awq_sh", "praq", "awq_dh"], {"awq_l1": {"method": "awq", "salience": "l1"}}, Q,
                          SearchConfig(salience="l2"))
    g = torch.Generator().manual_seed(0)
    base = (3 + 0.1 * torch.randn(40, generator=g)).tolist()
    shift = {"awq": (0, 0, 0), "awq_sh": (-0.05, -0.04, -0.06), "praq": (0.05, 0.04, 0.06),
             "awq_dh": (-0.1, 0.0, 0.08), "awq_l1": (0.01, -0.01, 0.0)}
    runs = [comparison.RunRecord(lb, cfgs[lb].method, s, results={"w": _res([v + off for v in base])})
            for lb, offs in shift.items() for s, off in zip((1, 2, 3), offs)]
    prov = {"seeds": [1, 2, 3], "methods": [{"label": lb, "method": c.method, "kind": "awqnb", "config": c.to_dict()}
                                             for lb, c in cfgs.items()]}
    claims = comparison.Comparison(runs, prov).claims().set_index("claim")
    assert claims.loc["heuristic rounding beats plain AWQ", "verdict"] == "held"
    assert claims.loc["praq beats AWQ", "verdict"] == "did not hold"
    assert claims.loc["dynamic heuristic beats plain AWQ", "verdict"] == "within noise"
    assert claims.loc["L2 salience beats L1", "verdict"] == "within noise"
    assert (claims.loc["heuristic rounding beats plain AWQ", "n_seeds"]) == 3


def test_one_seed_says_calibration_noise_is_not_measured(setup):
    model, tok, data = setup
    c = runner.run_comparison(model, ["rtn", "awq"], tokenizer=tok, seeds=(5,), calibration=random_calibration(1000),
                              datasets={"toks": data["toks"]}, quant=Q, search=S, eval_seqlen=48, device="cpu",
                              progress=False)
    v = c.verdicts("rtn")
    assert list(v.n_seeds) == [1] and "ONE calibration seed" in v.noise.iloc[0]
    assert list(v.verdict) == ["cannot separate seeds"]
    assert "cannot separate seeds" in c.seeds_note() and "3 or more seeds" in c.seeds_note()
    assert math.isnan(c.summary().set_index("label").loc["awq", "ppl_sd"])


@pytest.mark.parametrize("seeds", [0, -1, (), []])
def test_fewer_than_one_seed_fails_before_any_work(setup, seeds, monkeypatch):
    model, tok, data = setup
    monkeypatch.setattr(runner, "quantize", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(AwqnbError, match="at least one|no calibration seeds"):
        runner.run_comparison(model, ["awq"], tokenizer=tok, seeds=seeds, calibration=random_calibration(1000),
                              datasets={"toks": data["toks"]}, device="cpu", progress=False)


def test_bad_inputs_fail_before_any_work(setup):
    model, tok, data = setup
    kw = dict(tokenizer=tok, calibration=random_calibration(1000), datasets={"toks": data["toks"]}, device="cpu", progress=False)
    with pytest.raises(AwqnbError, match="repeat a seed"):
        runner.run_comparison(model, ["awq"], seeds=(1, 1), **kw)
    with pytest.raises(AwqnbError, match="whole numbers"):
        runner.run_comparison(model, ["awq"], seeds=(1.5,), **kw)
    with pytest.raises(AwqnbError, match="unknown method 'nope'"):
        runner.run_comparison(model, ["nope"], seeds=(1,), **kw)
    with pytest.raises(AwqnbError, match="no evaluation datasets"):
        runner.run_comparison(model, ["awq"], seeds=(1,), **{**kw, "datasets": {}})
    with pytest.raises(AwqnbError, match="needs the tokenizer"):
        runner.run_comparison(model, ["awq"], seeds=(1,), **{**kw, "tokenizer": None, "calibration": None})


def _hide_llmcompressor(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "llmcompressor" or name.startswith("llmcompressor."):
            raise ImportError("No module named 'llmcompressor'")
        return real(name, *a, **k)

    for m in [m for m in sys.modules if m == "llmcompressor" or m.startswith("llmcompressor.")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setattr(builtins, "__import__", fake)


def test_reference_methods_refused_without_llmcompressor_others_run(setup, monkeypatch, caplog):
    from awqnb.compare import reference

    _hide_llmcompressor(monkeypatch)
    assert "not importable" in reference.refusal("llmc_gptq") and "awqnb[reference]" in reference.refusal("llmc_awq")
    with pytest.raises(AwqnbError, match="llmc_gptq needs llm-compressor"):
        reference.quantize_reference(torch.nn.Linear(2, 2), "llmc_gptq", [torch.zeros(4, dtype=torch.long)])
    model, tok, data = setup
    with caplog.at_level("WARNING", logger="awqnb.compare.runner"):
        c = runner.run_comparison(model, ["rtn", "llmc_awq", "llmc_gptq"], tokenizer=tok, seeds=(1, 2),
                                  calibration=random_calibration(1000), datasets={"toks": data["toks"]}, quant=Q,
                                  eval_seqlen=48, device="cpu", progress=False)
    assert set(c.skipped) == {"llmc_awq", "llmc_gptq"}
    assert all("needs llm-compressor" in why and "\n" not in why for why in c.skipped.values())
    assert sum("llmc_awq skipped" in r.message for r in caplog.records) == 1
    f = c.frame()
    assert set(f[f.status == "ok"].label) == {"rtn"} and f[f.status == "ok"].ppl.gt(1).all()
    assert set(f[f.status == "skipped"].label) == {"llmc_awq", "llmc_gptq"}
    assert c.verdicts("rtn").empty
    assert c.summary().label.tolist() == ["rtn"]
    d = c.to_dict()
    assert sum(r["status"] == "skipped" for r in d["runs"]) == 4 and d["runs"][1]["reason"]


def test_reference_version_outside_the_tested_range(monkeypatch):
    from awqnb.compare import reference

    if importlib.util.find_spec("llmcompressor") is None:
        monkeypatch.setitem(sys.modules, "llmcompressor", type(sys)("llmcompressor"))
    monkeypatch.setattr(reference, "llmc_version", lambda: "0.9.1")
    why = reference.refusal("llmc_awq")
    assert "0.14.x" in why and "0.9.1" in why and "outside the tested range" in why


def test_seed_claims_over_seeds(comp):
    claims = comp.claims()
    assert set(claims.verdict) <= {"not run", "held", "did not hold", "within noise", "cannot separate seeds"}
    assert (claims.verdict == "not run").all()  # rtn, awq only: no pair of the claims ran


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llmcompressor") is None, reason="llm-compressor not installed")
def test_llmc_methods_run_in_the_comparison(setup):
    """llm-compressor's AWQ and GPTQ on the same calibration ids; what comes back is a plain model
    whose linears hold the fake-quantized weights (no scales, wrappers or offload caches left)."""
    model, tok, data = setup
    c = runner.run_comparison(model, ["rtn", "llmc_awq", "llmc_gptq"], tokenizer=tok, seeds=(1,),
                              calibration=random_calibration(1000), datasets={"toks": data["toks"]}, quant=Q, eval_seqlen=48,
                              device="cpu", progress=False)
    assert not c.skipped, c.skipped
    for label in ("llmc_awq", "llmc_gptq"):
        run = next(r for r in c.runs if r.label == label)
        assert run.info["linears"] == 14 and run.info["group_size"] == 32 and run.quantize_s > 0
        assert run.calibration["seed"] == 1 and run.calibration["n_calib"] == 4
        assert math.isfinite(run.results["toks"].ppl)
        assert run.results["toks"].ppl != c.per_seed("rtn", "toks")[1].ppl
    assert next(r for r in c.runs if r.label == "llmc_gptq").info["weight_was_quantized"] == 14
    from awqnb.compare.reference import quantize_reference

    m = copy.deepcopy(model)
    quantize_reference(m, "llmc_awq", random_calibration(1000)(3), tok, 4, 32)
    lin = m.model.layers[0].mlp.up_proj
    assert [n for n, _ in lin.named_parameters()] == ["weight"] and "forward" not in vars(lin)
    assert all(type(mod._parameters) is dict for mod in m.modules())
    assert all(torch.unique(row).numel() <= 16 for row in lin.weight.detach().view(lin.out_features, -1, 32)[:, 0])


def _bench_quality(args: list[str]) -> int:
    """bench/quality.py run as a script (tests do not import bench scripts)."""
    import subprocess

    p = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.returncode


def test_bench_quality_on_the_runner(tmp_path, monkeypatch):
    """bench/quality.py with --seeds on a tiny model: tidy JSON, a table of mean ± sd and verdicts."""
    calib = tmp_path / "calib.txt"
    calib.write_text("The tower is 324 metres tall, about the same height as an 81-storey building. " * 60)
    out = tmp_path / "q"
    _hide_llmcompressor(monkeypatch)
    rc = _bench_quality(["--model", "tiny-random-llama", "--methods", "rtn,awq@n_grid=2,llmc_gptq", "--seeds", "1,2",
                       "--group-sizes", "32", "--datasets", "wikitext2", "--seqlen", "64", "--max-windows", "3",
                       "--n-calib", "2", "--calib-seqlen", "32", "--calib-dataset", str(calib), "--device", "cpu",
                       "--baseline", "rtn", "--out", str(out)])
    assert rc == 0
    d = json.loads((out / "comparison_g32.json").read_text())
    assert d["provenance"]["seeds"] == [1, 2] and d["provenance"]["complete"]
    runs = {(r["label"], r["seed"]): r for r in d["runs"]}
    assert set(runs) == {("rtn", 1), ("awq@n_grid=2", 1), ("awq@n_grid=2", 2), ("llmc_gptq", 1), ("llmc_gptq", 2)}
    assert runs[("awq@n_grid=2", 2)]["config"]["search"]["n_grid"] == 2
    assert runs[("llmc_gptq", 1)]["status"] == "skipped"
    md = (out / "summary.md").read_text()
    assert "awq@n_grid=2" in md and "±" in md and "| cannot separate seeds |" in md  # 2 seeds: no verdict
    assert "llmc_gptq" in md and "skipped" in md
    # a run split by seeds merges back into one comparison
    for seed in ("1", "2"):
        assert _bench_quality(["--model", "tiny-random-llama", "--methods", "rtn,awq", "--seeds", seed, "--group-sizes",
                             "32", "--datasets", "wikitext2", "--seqlen", "64", "--max-windows", "3", "--n-calib", "2",
                             "--calib-seqlen", "32", "--calib-dataset", str(calib), "--device", "cpu",
                             "--out", str(out / f"s{seed}")]) == 0
    assert _bench_quality(["--merge", f"{out / 's1'},{out / 's2'}", "--baseline", "rtn", "--also-vs", "awq,nope",
                         "--out", str(out / "m")]) == 0
    vmd = (out / "m" / "verdicts.md").read_text()  # every method against rtn and against awq
    assert "## g32 vs rtn" in vmd and "## g32 vs awq" in vmd and "## g32 vs nope: did not run" in vmd
    assert "| rtn | wikitext2 |" in vmd.split("## g32 vs awq")[1] and "| 2 |" in vmd
    merged = comparison.Comparison.read(out / "m" / "comparison_g32.json")
    assert merged.seeds == [1, 2] and [(r.label, r.seed) for r in merged.runs] == [("rtn", 1), ("awq", 1), ("awq", 2)]
    assert merged.provenance["complete"]  # every (method, seed) is in one piece or the other
    s2 = comparison.Comparison.read(out / "s2" / "comparison_g32.json")
    s2_cut = comparison.Comparison([r for r in s2.runs if r.label != "awq"], s2.provenance, None, {})
    assert not comparison.Comparison.merge(comparison.Comparison.read(out / "s1" / "comparison_g32.json"),
                                       s2_cut).provenance["complete"]  # awq's seed-2 run is missing
    v = merged.verdicts("rtn")
    assert list(v.n_seeds) == [2]
    whole = comparison.Comparison.read(out / "comparison_g32.json")  # the one-call run above
    # a run cut off before seed 2: the table says which seeds it holds, not the requested count
    cut = comparison.Comparison([r for r in whole.runs if r.shared or r.seed == 1], whole.provenance, None, {})
    (out / "cut").mkdir()
    cut.to_json(out / "cut" / "comparison_g32.json")
    assert _bench_quality(["--merge", str(out / "cut"), "--baseline", "rtn", "--out", str(out / "cm")]) == 0
    head = (out / "cm" / "summary.md").read_text().splitlines()[0]
    assert "(seeds 1; requested 1, 2)" in head and "over 1 calibration seed " in head
    assert whole.per_seed("rtn", "wikitext2")[1].nll == merged.per_seed("rtn", "wikitext2")[2].nll
    assert "± " in (out / "m" / "summary.md").read_text()
    # --seed alone still works (one seed)
    rc = _bench_quality(["--model", "tiny-random-llama", "--methods", "rtn", "--seed", "7", "--group-sizes", "32",
                       "--datasets", "wikitext2", "--seqlen", "64", "--max-windows", "2", "--device", "cpu",
                       "--out", str(out / "one")])
    assert rc == 0 and json.loads((out / "one" / "comparison_g32.json").read_text())["provenance"]["seeds"] == [7]
    with pytest.raises(AwqnbError, match="differ in calibration"):  # another calibration set: not one comparison
        comparison.Comparison.merge(merged, comparison.Comparison.read(out / "one" / "comparison_g32.json"))
