"""Heuristic rounding (awq_sh / awq_dh / awq_js), Kneedle, James-Stein and GQA ReFlip (awq_gqa)."""
import copy
import json
from pathlib import Path

import pytest
import torch

from awqnb import cli
from awqnb.quant import pipeline
from awqnb.model.arch import AttnShape, blocks, get_module, resolve_spec
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.kneedle import knee_index, knee_outliers
from awqnb.quant.methods import get_method
from awqnb.quant.methods.gqa import gram, reflip, score_error
from awqnb.quant.methods.rounding import (apply_code_delta, code_delta, greedy_flip, input_moments,
                                          james_stein, row_error, top_percent)
from awqnb.core.primitives import compute_qparams, dequantize, expand_groups, quantize, qrange

from conftest import TINY  # noqa: E402
FLIP_METHODS = ["awq_sh", "awq_dh", "awq_js", "awq_gqa"]


# --- greedy flip on a toy layer ------------------------------------------------------------

def _toy(co=48, ci=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(co, ci, generator=g) * 0.05
    mu = torch.randn(ci, generator=g) * 0.3 + 0.1
    mu[:4] *= 20  # a few loud channels
    return w, mu


@pytest.mark.parametrize("order", ["gain", "boundary"])
@pytest.mark.parametrize("cap", [None, 2])
@pytest.mark.parametrize("qcfg", [QuantConfig(4, 32), QuantConfig(3, -1, symmetric=True), QuantConfig(4, 40)])
def test_greedy_flip_lowers_row_error_and_respects_constraints(order, cap, qcfg):
    w, mu = _toy()
    frozen = top_percent(mu.abs(), 10.0)
    res = greedy_flip(w, mu, qcfg, frozen=frozen, max_flips=cap, order=order)
    # the objective: |e_i| never rises, and falls overall
    assert torch.all(res.e_after.abs() <= res.e_before.abs() * (1 + 1e-9) + 1e-12)
    assert res.e_after.abs().mean() < (0.95 if cap else 0.1) * res.e_before.abs().mean()
    torch.testing.assert_close(res.e_before, row_error(w, res.q0, res.scale, res.zero, mu, qcfg))
    # q0 is plain round-to-nearest; q stays on the grid
    scale, zero = compute_qparams(w, qcfg)
    assert torch.equal(res.q0, quantize(w, scale, zero, qcfg))
    lo, hi = qrange(qcfg)
    assert res.q.min() >= lo and res.q.max() <= hi
    diff = res.q - res.q0
    assert set(diff.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # a flip goes to the other side of the continuous code
    t = w / expand_groups(scale, w.shape[1], qcfg.group_size) + expand_groups(zero, w.shape[1], qcfg.group_size)
    moved = diff != 0
    assert torch.equal(torch.sign(t - res.q0)[moved], diff[moved])
    # outlier channels untouched, per-row cap respected, flip count consistent
    assert not moved[:, frozen].any()
    assert torch.equal(moved.sum(1), res.n_flips)
    if cap is not None:
        assert int(res.n_flips.max()) <= cap


def test_greedy_gain_stops_only_when_no_single_flip_helps():
    w, mu = _toy(co=16, ci=64, seed=1)
    qcfg = QuantConfig(4, 32)
    res = greedy_flip(w, mu, qcfg, order="gain")
    s = expand_groups(res.scale, 64, 32)
    t = w / s + expand_groups(res.zero, 64, 32)
    d = torch.sign(t - res.q0)
    lo, hi = qrange(qcfg)
    free = (d != 0) & (res.q == res.q0) & (res.q0 + d >= lo) & (res.q0 + d <= hi)
    new_abs = (res.e_after[:, None].double() - (d * s).double() * mu.double()[None]).abs()
    assert not (free & (new_abs < res.e_after.abs()[:, None] * (1 - 1e-9))).any()


@pytest.mark.parametrize("cap", [None, 3])
def test_greedy_gain_equals_the_sequential_greedy(cap):
    """The vectorised 'gain' order makes exactly the flips of the one-flip-at-a-time greedy."""
    w, mu = _toy(co=12, ci=64, seed=4)
    qcfg = QuantConfig(4, 32)
    res = greedy_flip(w, mu, qcfg, max_flips=cap)
    s = expand_groups(res.scale, 64, 32).double()
    d = torch.sign(w / s.float() + expand_groups(res.zero, 64, 32) - res.q0).double()
    lo, hi = qrange(qcfg)
    for i in range(12):
        e = res.e_before[i].item()
        free = [j for j in range(64) if d[i, j] != 0 and lo <= res.q0[i, j] + d[i, j] <= hi]
        taken = []
        while cap is None or len(taken) < cap:
            steps = {j: (d[i, j] * s[i, j] * mu[j].double()).item() for j in free}
            j = min(steps, key=lambda k: abs(e - steps[k]), default=None)
            if j is None or abs(e - steps[j]) >= abs(e) * (1 - 1e-6):
                break
            e -= steps[j]
            taken.append(j)
            free.remove(j)
        assert sorted(taken) == torch.nonzero(res.q[i] != res.q0[i]).flatten().tolist(), i


def test_greedy_gain_takes_every_right_signed_flip_when_none_can_overshoot():
    """Rows whose error no set of flips can cancel (a frozen loud channel dominates): the greedy
    takes every flip that moves e_i towards zero (the bulk pass beyond its top-k window)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 256, generator=g) * 0.05
    mu = torch.full((256,), 1e-3)
    mu[0] = 50.0
    frozen = torch.zeros(256, dtype=torch.bool)
    frozen[0] = True
    qcfg = QuantConfig(4, 64)
    res = greedy_flip(w, mu, qcfg, frozen=frozen)
    s = expand_groups(res.scale, 256, 64)
    d = torch.sign(w / s + expand_groups(res.zero, 256, 64) - res.q0)
    lo, hi = qrange(qcfg)
    ok = (d != 0) & (res.q0 + d >= lo) & (res.q0 + d <= hi) & ~frozen[None]
    right = ok & (torch.sign(d * mu) == torch.sign(res.e_before)[:, None].float())
    total = torch.where(right, (d * s * mu).abs(), torch.zeros_like(s)).sum(1).double()
    cannot = total < res.e_before.abs()  # rows where even every right-signed flip cannot overshoot
    assert cannot.sum() >= 20
    assert torch.equal(res.n_flips[cannot], right.sum(1)[cannot])
    assert int(res.n_flips[cannot].min()) > 32
    assert torch.all(res.e_after.abs() < res.e_before.abs())


def test_code_delta_roundtrip():
    w, mu = _toy()
    res = greedy_flip(w, mu, QuantConfig(4, 32))
    rep = code_delta(res.q0, res.q)
    assert rep["idx"].dtype == torch.int32 and rep["delta"].dtype == torch.int8
    assert rep["idx"].numel() == int(res.n_flips.sum()) > 0
    assert torch.equal(apply_code_delta(res.q0, rep), res.q)


# --- Kneedle --------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(64, 3), (200, 7), (40, 1), (500, 25)])
def test_kneedle_finds_the_corner_of_an_l_curve(n, k):
    loud = torch.linspace(12.0, 10.0, k)
    bulk = torch.linspace(1.0, 0.5, n - k)
    assert knee_index(torch.cat([loud, bulk])) == k


def test_kneedle_smooth_curve_and_degenerate_cases():
    # y = 1 / (x + 0.1) on [0, 1]: the max distance below the chord is at x = sqrt(0.11) - 0.1
    x = torch.linspace(0, 1, 1001)
    k = knee_index(1 / (x + 0.1))
    assert abs(x[k].item() - (0.11 ** 0.5 - 0.1)) < 2e-3
    assert knee_index(torch.ones(50)) is None
    assert knee_index(torch.linspace(1, 0, 50)) is None  # straight line: no knee
    assert knee_index(1 - torch.linspace(0, 1, 50) ** 2) is None  # concave: no knee
    assert knee_index(torch.tensor([3.0, 1.0])) is None
    curve = torch.cat([torch.full((5,), 10.0), torch.linspace(1, 0.5, 95)])
    assert knee_index(curve, tolerance=0.02) == 7
    assert knee_index(curve, tolerance=-1.0) == 0


def test_knee_outliers_picks_the_loud_channels():
    g = torch.Generator().manual_seed(0)
    sal = torch.rand(256, generator=g) + 0.5
    loud = torch.randperm(256, generator=g)[:6]
    sal[loud] = 20 + torch.rand(6, generator=g)
    mask = knee_outliers(sal)
    assert mask.sum() == 6 and mask[loud].all()
    assert not knee_outliers(torch.ones(256)).any()


# --- James-Stein ----------------------------------------------------------------------------

def test_james_stein_formula_shrinks_toward_the_mean_and_keeps_signs():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(50, generator=g).double()
    var = torch.rand(50, generator=g).double() + 0.5
    n = 20
    js, c = james_stein(mu, var, n)
    dev = mu - mu.mean()
    expect = max(0.0, 1 - 48 * var.mean().item() / (n * (dev * dev).sum().item()))
    assert c == pytest.approx(expect) and 0 < c < 1
    torch.testing.assert_close(js, mu.mean() + c * dev)
    assert torch.all((js - mu.mean()).abs() <= dev.abs() + 1e-12)
    assert torch.equal(torch.sign(js - mu.mean()), torch.sign(dev))
    torch.testing.assert_close(js.mean(), mu.mean())
    # very noisy means: everything goes to the grand mean
    js0, c0 = james_stein(mu, var * 1e6, n)
    assert c0 == 0.0 and torch.allclose(js0, mu.mean().expand(50))
    # exact means (no variance) are left alone; p <= 2 is never shrunk
    assert james_stein(mu, torch.zeros(50, dtype=torch.float64), n)[1] == 1.0
    assert james_stein(mu[:2], var[:2], n)[1] == 1.0


def test_james_stein_lowers_estimation_error_with_few_tokens():
    """What motivates awq_js: with few calibration tokens the shrunk means are closer to the true ones."""
    g = torch.Generator().manual_seed(0)
    err_raw = err_js = 0.0
    for _ in range(20):
        true = 0.2 + 0.05 * torch.randn(256, generator=g)
        x = true + torch.randn(16, 256, generator=g)  # 16 tokens, noise std 1
        js, c = james_stein(x.mean(0), x.var(0, unbiased=False), 16)
        assert 0 <= c < 1
        err_raw += (x.mean(0) - true).pow(2).sum().item()
        err_js += (js - true).pow(2).sum().item()
    assert err_js < 0.5 * err_raw


# --- ReFlip ---------------------------------------------------------------------------------

def _toy_attention(n_heads=4, n_kv=2, hd=8, H=48, n_tok=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = AttnShape(n_heads, n_kv, hd)
    x = torch.randn(n_tok, H, generator=g)
    wq = torch.randn(n_heads * hd, H, generator=g) * 0.1
    wk = torch.randn(n_kv * hd, H, generator=g) * 0.1
    wk[hd:] *= 4.0  # kv heads differ a lot: a wrong head mapping changes every number
    wk[:, :3] *= 3.0
    return attn, x, wq, wk


def _brute_score_error(x, wq_hat, wq, wk_hat, wk, attn, kv_of):
    out = []
    hd = attn.head_dim
    for h in range(attn.n_heads):
        g = kv_of(h)
        qh, q = x @ wq_hat[h * hd:(h + 1) * hd].T, x @ wq[h * hd:(h + 1) * hd].T
        kh, k = x @ wk_hat[g * hd:(g + 1) * hd].T, x @ wk[g * hd:(g + 1) * hd].T
        out.append((qh @ kh.T - q @ k.T).pow(2).mean().item())
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("qcfg", [QuantConfig(4, 16), QuantConfig(3, -1)])
def test_reflip_lowers_attention_score_error_with_right_kv_heads(qcfg):
    attn, x, wq, wk = _toy_attention()
    assert attn.n_rep == 2
    gx, n = gram([x[None]])
    assert n == x.shape[0]
    sq, zq = compute_qparams(wq, qcfg)
    codes = quantize(wq, sq, zq, qcfg)
    sk, zk = compute_qparams(wk, qcfg)
    wk_hat = dequantize(quantize(wk, sk, zk, qcfg), sk, zk, qcfg)
    rr = reflip(gx, wq, wk, wk_hat, codes, sq, zq, qcfg, attn, critical_dim_pct=0.25, max_flip_pct=0.1)

    # the reported errors are E[(q̂·k̂ − q·k)²] over token pairs with keys of kv head h // n_rep ...
    wq_hat0 = dequantize(codes, sq, zq, qcfg)
    right = _brute_score_error(x.double(), wq_hat0.double(), wq.double(), wk_hat.double(), wk.double(), attn,
                               lambda h: h // attn.n_rep)
    wrong = _brute_score_error(x.double(), wq_hat0.double(), wq.double(), wk_hat.double(), wk.double(), attn,
                               lambda h: h % attn.n_kv)
    torch.testing.assert_close(rr.j_before.double(), right, rtol=1e-6, atol=1e-12)
    assert not torch.allclose(right, wrong, rtol=1e-2)
    after = _brute_score_error(x.double(), dequantize(rr.codes, sq, zq, qcfg).double(), wq.double(),
                               wk_hat.double(), wk.double(), attn, lambda h: h // attn.n_rep)
    torch.testing.assert_close(rr.j_after.double(), after, rtol=1e-6, atol=1e-12)
    # ... which ReFlip never raises and lowers in every head
    assert torch.all(after < right)

    # constraints: range, only critical dims (largest key magnitude), at most cap flips per dim
    lo, hi = qrange(qcfg)
    assert rr.codes.min() >= lo and rr.codes.max() <= hi
    changed = (rr.codes - codes).abs().reshape(attn.n_heads, attn.head_dim, -1)
    n_crit = int(0.25 * attn.head_dim)
    cap = int(0.1 * wq.shape[1])
    assert rr.dims.shape == (attn.n_heads, n_crit) and rr.cap == cap
    for h in range(attn.n_heads):
        g = h // attn.n_rep
        k_hat = x @ wk_hat[g * attn.head_dim:(g + 1) * attn.head_dim].T
        top = set(torch.topk(k_hat.pow(2).mean(0), n_crit).indices.tolist())
        assert set(rr.dims[h].tolist()) == top
        others = [d for d in range(attn.head_dim) if d not in top]
        assert changed[h, others].sum() == 0
        assert int(changed[h].sum(1).max()) <= cap
    assert int(rr.dim_flips.max()) <= cap
    assert torch.equal(rr.flips, rr.dim_flips.sum(1).cpu())


def test_score_error_formula_matches_tokens():
    attn, x, wq, wk = _toy_attention(n_heads=6, n_kv=3, hd=4, H=20, seed=3)
    gx, _ = gram([x.reshape(2, -1, x.shape[1])])
    wq_hat, wk_hat = wq + 0.01 * torch.randn_like(wq), wk + 0.01 * torch.randn_like(wk)
    j, ref = score_error(gx, wq_hat, wq, wk_hat, wk, attn)
    brute = _brute_score_error(x.double(), wq_hat.double(), wq.double(), wk_hat.double(), wk.double(), attn,
                               lambda h: h // attn.n_rep)
    torch.testing.assert_close(j.double(), brute, rtol=1e-6, atol=1e-12)
    assert torch.all(ref > 0)


# --- through the pipeline on tiny models ----------------------------------------------------

# `tiny` (each tiny model, tokenizer, 4 × 64 calibration): tests/conftest.py


def _cfg(method, params=None, gs=32):
    return MethodConfig(method, QuantConfig(4, gs), SearchConfig(n_grid=4), params=params or {}, calib_batch_size=2)


def _run(tiny, name, method, params=None, gs=32):
    fp, tok, calib = tiny[name]
    q = copy.deepcopy(fp)
    res = pipeline.quantize(q, _cfg(method, params, gs), calib, progress=False)
    return fp, q, res


def _logit_err(model, fp, ids):
    with torch.no_grad():
        return (model(input_ids=ids).logits - fp(input_ids=ids).logits).pow(2).mean().item()


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", FLIP_METHODS)
def test_pipeline_end_to_end_evidence_and_exact_replay(tiny, name, method):
    fp, q, res = _run(tiny, name, method)
    spec = resolve_spec(fp)
    meta = json.loads(json.dumps(res.metadata()))  # evidence is JSON-able
    assert meta["method"] == method
    for rec in res.layers:
        ev = rec.evidence
        assert set(ev["flip"]) == set(spec.linears)
        for lin_ev in ev["flip"].values():
            assert lin_ev["e_after"]["mean"] <= lin_ev["e_before"]["mean"]
            assert lin_ev["e_after"]["max"] <= lin_ev["e_before"]["max"] * (1 + 1e-9)
            assert lin_ev["flips"] > 0
        if method == "awq_dh":
            assert set(ev["outlier_frac"]) == set(spec.linears)
            cap = max(1, int(0.01 * get_module(blocks(fp, spec)[rec.index], "mlp.down_proj").in_features))
            assert ev["flip"]["mlp.down_proj"]["max_flips_row"] <= cap
        if method in ("awq_js", "awq_gqa"):
            assert all(0.0 <= c <= 1.0 for c in ev["js_factor"].values())
        if method == "awq_gqa":
            gq = ev["gqa"]
            assert len(gq["score_err_before"]) == len(gq["score_err_after"]) == q.config.num_attention_heads
            assert all(a <= b for a, b in zip(gq["score_err_after"], gq["score_err_before"]))
            assert gq["rel_improvement"] > 0 and sum(gq["flips"]) > 0
        for name_, rep in rec.replay.items():
            assert rep["idx"].device.type == "cpu" and rep["delta"].dtype == torch.int8
    # replay on a fresh FP copy reproduces the exact weights, ReFlip included
    replayed = pipeline.apply(copy.deepcopy(fp), res)
    for (n1, p1), (n2, p2) in zip(q.named_parameters(), replayed.named_parameters()):
        assert torch.equal(p1, p2), n1
    # sanity: nowhere near broken
    ids = torch.stack(tiny[name][2].samples[:2])
    assert _logit_err(q, fp, ids) < 10 * _logit_err(_run(tiny, name, "rtn")[1], fp, ids)


def test_gqa_replay_includes_reflip(tiny, tmp_path):
    fp, q, res = _run(tiny, "tiny-random-llama", "awq_gqa")
    _, q_js, res_js = _run(tiny, "tiny-random-llama", "awq_js")
    qn = "self_attn.q_proj"
    blk, blk_js = blocks(q, resolve_spec(q))[0], blocks(q_js, resolve_spec(q_js))[0]
    assert not torch.equal(get_module(blk, qn).weight, get_module(blk_js, qn).weight)
    assert torch.equal(get_module(blk, "self_attn.k_proj").weight, get_module(blk_js, "self_attn.k_proj").weight)
    assert res.layers[0].replay[qn]["idx"].numel() != res_js.layers[0].replay[qn]["idx"].numel()
    res.save(tmp_path / "r")
    replayed = pipeline.apply(copy.deepcopy(fp), pipeline.QuantResult.load(tmp_path / "r.json"))
    for p1, p2 in zip(q.parameters(), replayed.parameters()):
        assert torch.equal(p1, p2)


def test_switches_off_give_plain_awq_and_awq_js(tiny):
    _, q_awq, _ = _run(tiny, "tiny-random-gemma3", "awq")
    _, q_off, res = _run(tiny, "tiny-random-gemma3", "awq_sh", {"use_heuristic": False})
    assert all(torch.equal(a, b) for a, b in zip(q_awq.parameters(), q_off.parameters()))
    assert not res.layers[0].replay
    _, q_js, _ = _run(tiny, "tiny-random-gemma3", "awq_js")
    _, q_g, res_g = _run(tiny, "tiny-random-gemma3", "awq_gqa", {"apply_gqa_reflip": False})
    assert all(torch.equal(a, b) for a, b in zip(q_js.parameters(), q_g.parameters()))
    assert "gqa" not in res_g.layers[0].evidence


def test_params_validated_and_subsampled_mean(tiny):
    with pytest.raises(AwqnbError, match="outlier_percent"):
        get_method("awq_dh")(_cfg("awq_dh", {"outlier_percent": 5}))
    with pytest.raises(AwqnbError, match="outlier_percent"):
        get_method("awq_sh")(_cfg("awq_sh", {"outlier_percent": 150}))
    with pytest.raises(AwqnbError, match="flip_order"):
        get_method("awq_sh")(_cfg("awq_sh", {"flip_order": "random"}))
    with pytest.raises(AwqnbError, match="gqa_max_flip_pct"):
        get_method("awq_gqa")(_cfg("awq_gqa", {"gqa_max_flip_pct": 5}))
    _, _, res = _run(tiny, "tiny-random-llama", "awq_js", {"max_tokens_per_sample": 16, "flip_order": "boundary"})
    assert res.layers[0].evidence["flip"]["self_attn.q_proj"]["flips"] > 0


def test_input_moments_all_tokens_and_subsample():
    from awqnb.engine.capture import ChannelStats
    from awqnb.quant.methods.base import BlockContext

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 8, generator=g) + 2
    s = torch.rand(8, generator=g) + 0.5
    st = ChannelStats()
    st.update(x)
    ctx = BlockContext(0, None, None, AttnShape(1, 1, 8), {"k": [x / s]}, {"k": st}, [{}], {"k": "k"}, {"k": s})
    m, var, n = input_moments(ctx, "k", 0)
    xs = (x / s).reshape(-1, 8).double()
    assert n == 60
    torch.testing.assert_close(m, xs.mean(0))
    torch.testing.assert_close(var, xs.var(0, unbiased=False))
    m5, _, n5 = input_moments(ctx, "k", 5)
    pos = torch.linspace(0, 19, 5).round().long()
    assert n5 == 15
    torch.testing.assert_close(m5, (x / s)[:, pos].reshape(-1, 8).double().mean(0))


def test_cli_quantize_awq_sh(tmp_path, capsys):
    rc = cli.main(["quantize", "--model", "tiny-random-llama", "--method", "awq_sh", "--n-calib", "4",
                   "--calib-seqlen", "64", "--group-size", "32", "--n-grid", "4", "--outlier-percent", "2.5",
                   "--output-dir", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    meta = json.loads((out / "quantization_metadata.json").read_text())
    assert meta["method"] == "awq_sh" and meta["config"]["params"]["outlier_percent"] == 2.5
    assert meta["layers"][0]["evidence"]["flip"]["mlp.up_proj"]["flips"] > 0


def test_cli_seed_flag_no_heuristic_turns_flips_off():
    parser = cli.build_parser()
    args = parser.parse_args(["quantize", "--method", "awq_sh", "--no-heuristic"])
    assert cli._method_params(args)["use_heuristic"] is False
    args = parser.parse_args(["quantize", "--method", "awq_sh", "--no-use-heuristic"])
    assert cli._method_params(args)["use_heuristic"] is False
    args = parser.parse_args(["quantize", "--method", "awq_sh"])
    assert "use_heuristic" not in cli._method_params(args)


# --- ReFlip on the scores the model computes (after RoPE) -------------------------------------

def _hf_cos_sin(name, T):
    from awqnb.model.loading import load_model

    model, _ = load_model(name)
    pos = torch.arange(T)[None]
    x = torch.zeros(1, T, model.config.hidden_size)
    rot = model.model.rotary_emb
    try:
        return rot(x, pos)
    except TypeError:  # Gemma3: one rotary module, a layer type per call
        return rot(x, pos, "full_attention")


def test_rope_rotations_reproduce_hf_rotary_scores():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from awqnb.quant.methods.gqa import rope_offsets, rope_rotations

    T = 40
    cos, sin = _hf_cos_sin("tiny-random-llama", T)
    offsets = rope_offsets(T)
    assert offsets == [0, -1, -2, -4, -8, -16, -32]
    m = rope_rotations(cos, sin, offsets)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, T, cos.shape[-1], generator=g), torch.randn(1, 1, T, cos.shape[-1], generator=g)
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)  # HF's own RoPE at positions 0..T-1
    for i, d in enumerate(offsets):
        for t in (abs(d), T - 1):  # query at t, key at u = t + d (earlier)
            u = t + d
            hf = (qr[0, 0, t] * kr[0, 0, u]).sum().double()
            ours = q[0, 0, t].double() @ m[i] @ k[0, 0, u].double()
            torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)


def test_post_rope_score_error_formula_matches_tokens():
    from awqnb.quant.methods.gqa import rope_offsets, rope_rotations

    attn, x, wq, wk = _toy_attention(n_heads=4, n_kv=2, hd=8, H=20, seed=5)
    T = 16
    inv = 1.0 / (100.0 ** (torch.arange(0, 8, 2).double() / 8))
    ang = torch.arange(T).double()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    rot = rope_rotations(emb.cos(), emb.sin(), rope_offsets(T))
    gx, _ = gram([x[None]])
    wq_hat, wk_hat = wq + 0.02 * torch.randn_like(wq), wk + 0.02 * torch.randn_like(wk)
    j, _ = score_error(gx.double(), wq_hat, wq, wk_hat, wk, attn, rot)
    hd = attn.head_dim
    brute = []
    for h in range(attn.n_heads):
        g = h // attn.n_rep
        qh, q = x.double() @ wq_hat[h * hd:(h + 1) * hd].T.double(), x.double() @ wq[h * hd:(h + 1) * hd].T.double()
        kh, k = x.double() @ wk_hat[g * hd:(g + 1) * hd].T.double(), x.double() @ wk[g * hd:(g + 1) * hd].T.double()
        brute.append(torch.stack([(qh @ r @ kh.T - q @ r @ k.T).pow(2).mean() for r in rot]).mean())
    torch.testing.assert_close(j.double(), torch.stack(brute), rtol=1e-6, atol=1e-12)
    j_pre, _ = score_error(gx.double(), wq_hat, wq, wk_hat, wk, attn)
    assert not torch.allclose(j, j_pre, rtol=1e-3)  # RoPE changes the objective


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_reflip_lowers_the_post_rope_score_error(tiny, name):
    """awq_gqa minimises the error of the rotated scores; the pre-RoPE objective (gqa_rope=False)
    lowers it less: the post-RoPE error it leaves is higher, summed over the blocks."""
    _, _, res = _run(tiny, name, "awq_gqa")
    _, _, res_pre = _run(tiny, name, "awq_gqa", {"gqa_rope": False})
    left = {}
    for label, r in (("rope", res), ("pre", res_pre)):
        total = 0.0
        for layer in r.layers:
            ev = layer.evidence["gqa"]
            assert ev["objective"] == ("rope" if label == "rope" else "pre-rope")
            assert ev["rope_offsets"][:3] == [0, -1, -2]
            before, after = sum(ev["rope_err_before"]), sum(ev["rope_err_after"])
            assert after < before  # both lower the post-RoPE error in every block
            total += after
        left[label] = total
    assert left["rope"] < left["pre"]
    for layer in res.layers:  # the objective's own figures are the post-RoPE ones
        ev = layer.evidence["gqa"]
        assert ev["score_err_after"] == ev["rope_err_after"] and ev["rope_rel_improvement"] > 0
