"""praq / robust_praq: the loud-silence property, the formulas, determinism, and end to end runs."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awqnb import cli
from awqnb.quant import pipeline
from awqnb.model.arch import blocks, resolve_spec
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.quant.importance import importance_vectors, spearman
from awqnb.quant.methods import get_method
from awqnb.quant.methods.praq import PraqStats, activation_scale, back_project
from awqnb.analysis.synthetic import error_table, make_loud_silence, rank_table, saliences

from conftest import TINY  # noqa: E402
ROOT = Path(__file__).resolve().parents[1]


# ---- the loud-silence toy -------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy():
    t = make_loud_silence(seed=0)
    return t, saliences(t)


def test_praq_ranks_the_bursty_dead_group_above_mean_abs(toy):
    t, sal = toy
    rk = rank_table(t, sal).set_index("group")
    # mean |x| puts B (dead, rare bursts) last; praq lifts it above the quiet group C
    assert rk.loc["B", "rank l1"] > rk.loc["C", "rank l1"]
    assert rk.loc["B", "rank praq"] < rk.loc["B", "rank l1"] - 30
    assert rk.loc["B", "rank praq"] < rk.loc["C", "rank praq"]
    assert rk.loc["B", "praq"] / rk.loc["B", "E|h| (l1)"] > 5
    # praq's down utility is exactly mean |x| of the down input
    torch.testing.assert_close(sal["utility"], sal["l1"], rtol=1e-5, atol=1e-6)


def test_praq_scaling_cuts_the_error_on_burst_tokens(toy):
    t, sal = toy
    err = error_table(t, sal, group_sizes=(32, -1), n_grid=20).set_index(["group_size", "salience"])
    for g in (32, -1):
        assert err.loc[(g, "praq"), "mse_burst"] < 0.8 * err.loc[(g, "l1"), "mse_burst"]
        assert err.loc[(g, "praq"), "mse_all"] < err.loc[(g, "l1"), "mse_all"]


def test_toy_is_deterministic():
    a, b = make_loud_silence(seed=3), make_loud_silence(seed=3)
    assert torch.equal(a.x_calib, b.x_calib) and a.group == b.group
    assert not torch.equal(a.x_calib, make_loud_silence(seed=4).x_calib)


# ---- formulas -------------------------------------------------------------------------------

def test_praq_stats_match_the_formula_and_stream():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 12, generator=g)
    wg, wu = torch.randn(7, 12, generator=g), torch.randn(7, 12, generator=g)
    act = torch.nn.SiLU()
    whole = PraqStats(wg, wu, act)
    whole.update(x)
    parts = PraqStats(wg, wu, act, token_chunk=17)
    for xc in x:
        parts.update(xc)
    xf = x.reshape(-1, 12)
    z, u = xf @ wg.T, xf @ wu.T
    h = act(z) * u
    U = h.abs().mean(0)
    S = (h.pow(2).mean(0) - U**2).sqrt()
    P = torch.sigmoid(3.0 * (z.amax(0) + 0.2 * z.std(0, unbiased=False) + 3.0))
    for st in (whole, parts):
        torch.testing.assert_close(st.utility, U, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.spread, S, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.importance(3.0, -3.0, 0.2), U + P * S, rtol=1e-4, atol=1e-6)


def test_tau_is_knee_relative_for_gelu_tanh():
    from transformers.activations import ACT2FN

    c = activation_scale("gelu_pytorch_tanh")
    assert activation_scale("silu") == 1.0
    assert c == pytest.approx(0.7525 / 1.2785, abs=2e-3)
    # a channel sitting exactly at tau: P = 1/2 for both activations (noise_factor 0, one token)
    w = torch.ones(1, 1)
    for name, z0 in (("silu", -3.0), ("gelu_pytorch_tanh", -3.0 * c)):
        st = PraqStats(w, w, ACT2FN[name], activation_scale(name))
        st.update(torch.tensor([[z0]]))
        assert st.p_live(3.0, -3.0, 0.0).item() == pytest.approx(0.5, abs=1e-5)


def test_back_projection_reduces_to_l1_for_uniform_importance():
    g = torch.Generator().manual_seed(1)
    wg, wu, xa = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g), torch.rand(5, generator=g)
    torch.testing.assert_close(back_project(torch.full((9,), 2.5), wg, wu, xa), xa)
    imp = torch.zeros(9)
    imp[0] = 1.0  # only row 0 matters: hidden channels feeding it most get the most salience
    a = back_project(imp, wg, wu, torch.ones(5))
    w0 = (wg[0].abs() + wu[0].abs()) / (wg.abs() + wu.abs()).sum(0)
    assert torch.equal(a.argsort(), w0.argsort())


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    a = torch.tensor([1.0, 2.0, 2.0, 5.0, 3.0, 3.0, 0.5])
    b = [7.0, 1.0, 2.0, 9.0, 3.0, 3.0, 0.1]
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b).statistic, abs=1e-12)
    assert spearman(a, a) == pytest.approx(1.0)


def test_bad_params_are_refused():
    cls = get_method("praq")
    with pytest.raises(AwqnbError, match="beta"):
        cls(MethodConfig("praq", params={"beta": 0.0}))
    with pytest.raises(AwqnbError, match="no parameter"):
        cls(MethodConfig("praq", params={"noise_std": 0.1}))
    with pytest.raises(AwqnbError, match="n_noise_samples"):
        get_method("robust_praq")(MethodConfig("robust_praq", params={"n_noise_samples": 0}))
    assert get_method("full_praq") is cls


# ---- tiny models end to end -----------------------------------------------------------------

# `tiny` (each tiny model, tokenizer, 4 × 64 calibration): tests/conftest.py


def _run(tiny, name, method, gs=32, params=None, seed=42, n_grid=5):
    fp, tok, calib = tiny[name]
    q = copy.deepcopy(fp)
    cfg = MethodConfig(method, QuantConfig(4, gs), SearchConfig(n_grid=n_grid), params=params or {},
                       calib_batch_size=2, seed=seed)
    return q, pipeline.quantize(q, cfg, calib, progress=False)


def _logit_err(model, fp, calib):
    ids = torch.stack(calib.samples[:2])
    with torch.no_grad():
        return (model(input_ids=ids).logits - fp(input_ids=ids).logits).pow(2).mean().item()


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", ["praq", "robust_praq", "full_praq", "full_robust_praq"])
def test_pipeline_end_to_end(tiny, name, method):
    fp, tok, calib = tiny[name]
    q, res = _run(tiny, name, method)
    assert res.method == method.replace("full_", "")
    assert res.config.quant.group_size == (-1 if method.startswith("full_") else 32)
    n = len(blocks(fp, resolve_spec(fp)))
    assert sorted(res.alphas()) == list(range(n))
    for rec in res.layers:
        assert set(rec.groups) == {"qkv", "vo", "gate_up", "down"}
        assert all(torch.isfinite(g.salience).all() and (g.salience > 0).all() for g in rec.groups.values())
        ev = rec.evidence["praq"]
        assert ev["act_scale"] == pytest.approx(1.0 if name.endswith("llama") else 0.5886, abs=1e-3)
    json.dumps(res.metadata())
    rtn = copy.deepcopy(fp)
    pipeline.quantize(rtn, MethodConfig("rtn", res.config.quant), progress=False)
    assert _logit_err(q, fp, calib) < _logit_err(rtn, fp, calib)
    replayed = pipeline.apply(copy.deepcopy(fp), res)
    for p1, p2 in zip(q.parameters(), replayed.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_robust_with_zero_noise_is_praq_exactly(tiny, name):
    q1, r1 = _run(tiny, name, "praq")
    q2, r2 = _run(tiny, name, "robust_praq", params={"noise_std": 0.0})
    for a, b in zip(r1.layers, r2.layers):
        for g in a.groups:
            assert torch.equal(a.groups[g].salience, b.groups[g].salience)
            assert a.groups[g].losses == b.groups[g].losses
    for p1, p2 in zip(q1.parameters(), q2.parameters()):
        assert torch.equal(p1, p2)


def test_robust_is_deterministic_under_the_seed(tiny):
    name = "tiny-random-llama"
    _, r1 = _run(tiny, name, "robust_praq", n_grid=2)
    _, r2 = _run(tiny, name, "robust_praq", n_grid=2)
    _, r3 = _run(tiny, name, "robust_praq", n_grid=2, seed=7)
    _, rp = _run(tiny, name, "praq", n_grid=2)
    torch.manual_seed(123)  # the global RNG plays no part
    _, r4 = _run(tiny, name, "robust_praq", n_grid=2)
    s = lambda r, g: r.layers[0].groups[g].salience  # noqa: E731
    for g in ("qkv", "vo", "gate_up", "down"):
        assert torch.equal(s(r1, g), s(r2, g)) and torch.equal(s(r1, g), s(r4, g))
        assert not torch.equal(s(r1, g), s(r3, g))
        assert not torch.equal(s(r1, g), s(rp, g))
        torch.testing.assert_close(s(r1, g), s(rp, g), rtol=0.05, atol=1e-4)  # 1% noise: small change


@pytest.mark.parametrize("name", TINY)
def test_importance_vectors_agree_with_the_method(tiny, name):
    fp, tok, calib = tiny[name]
    df = importance_vectors(copy.deepcopy(fp), calib, 0, batch_size=2)
    assert set(df.group) == {"qkv", "vo", "gate_up", "down"}
    _, res = _run(tiny, name, "praq", n_grid=2)
    for g in ("qkv", "gate_up", "down"):
        want = torch.tensor(df[df.group == g].praq.to_numpy(), dtype=torch.float32)
        torch.testing.assert_close(res.layers[0].groups[g].salience, want, rtol=1e-4, atol=1e-6)
    d = df[df.group == "down"]
    assert (d.praq >= d.utility - 1e-7).all()
    assert (d.l1 - d.utility).abs().max() < 1e-5
    with pytest.raises(AwqnbError, match="out of range"):
        importance_vectors(fp, calib, 99)


# ---- command line ---------------------------------------------------------------------------

def test_cli_full_praq_subprocess(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "awqnb", "quantize", "--model", "tiny-random-llama", "--method", "praq",
         "--group-size", "-1", "--n-calib", "2", "--calib-seqlen", "32", "--n-grid", "2",
         "--beta", "2.5", "--tau", "-2.0", "--noise-factor", "0.1", "--output-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    dest = Path(out.stdout.strip().splitlines()[-1])
    meta = json.loads((dest / "quantization_metadata.json").read_text())
    assert meta["method"] == "praq" and meta["config"]["quant"]["group_size"] == -1
    assert meta["config"]["params"] == {"beta": 2.5, "tau": -2.0, "noise_factor": 0.1}
    assert meta["layers"][0]["evidence"]["praq"]["tau_z"] == pytest.approx(-2.0)


def test_cli_robust_praq_flags(tmp_path, capsys):
    rc = cli.main(["quantize", "--model", "tiny-random-gemma3", "--method", "full_robust_praq",
                   "--n-calib", "2", "--calib-seqlen", "32", "--n-grid", "2", "--noise-std", "0.02",
                   "--n-noise-samples", "2", "--output-dir", str(tmp_path)])
    assert rc == 0
    dest = Path(capsys.readouterr().out.strip().splitlines()[-1])
    meta = json.loads((dest / "quantization_metadata.json").read_text())
    assert meta["method"] == "robust_praq" and meta["config"]["quant"]["group_size"] == -1
    assert meta["config"]["params"] == {"noise_std": 0.02, "n_noise_samples": 2}
    assert cli.main(["quantize", "--model", "tiny-random-llama", "--method", "praq", "--noise-std", "0.1",
                     "--output-dir", str(tmp_path)]) == 2  # praq has no noise_std
