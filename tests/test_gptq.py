"""GPTQ on awqnb's grid (gptq, awq_gptq): layer error, grid membership, RTN limit, replay, determinism."""
import copy
import json

import pytest
import torch

from awqnb import cli
from awqnb.quant import pipeline
from awqnb.model.arch import blocks, get_module, resolve_spec
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.core.codes import recover_codes
from awqnb.quant.methods import get_method
from awqnb.quant.methods.gptq import (gptq_factor, gptq_quantize, gptq_round, hessian, layer_error, pack_codes,
                                      unpack_codes)
from awqnb.core.primitives import compute_qparams, dequantize, fake_quant, qrange, quantize

from conftest import TINY  # noqa: E402

CFGS = [QuantConfig(4, 32), QuantConfig(4, 64), QuantConfig(3, -1, symmetric=True), QuantConfig(2, 48)]


def _layer(co=40, ci=200, n=1500, seed=0, dead=()):
    """Random weight and strongly correlated inputs (x = z·A, A far from diagonal)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(ci, ci, generator=g) * 0.15 + torch.eye(ci)
    x = torch.randn(n, ci, generator=g) @ a
    x[:, list(dead)] = 0
    w = torch.randn(co, ci, generator=g) * 0.05
    return w, x


def _naive_gptq(w, h, cfg, damp=0.01):
    """Textbook GPTQ without lazy batches: after each column, update every later column at once;
    a group's qparams from its current weights when its first column comes (own column order)."""
    from dataclasses import replace

    co, ci = w.shape
    W = w.double().clone()
    H = h.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(ci, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    g = ci if cfg.group_size == -1 else cfg.group_size
    lo, hi = qrange(cfg)
    Q = torch.zeros(co, ci, dtype=torch.float64)
    W_hat = torch.zeros(co, ci, dtype=torch.float64)
    for j in range(ci):
        if j % g == 0:
            s, z = compute_qparams(W[:, j:j + g].float(), replace(cfg, group_size=-1))
            s, z = s[:, 0].double(), z[:, 0].double()
        Q[:, j] = torch.clamp(torch.round(W[:, j] / s) + z, lo, hi)
        W_hat[:, j] = (Q[:, j] - z) * s
        e = (W[:, j] - W_hat[:, j]) / U[j, j]
        W[:, j:] -= e[:, None] * U[j, j:][None, :]
    return Q.float(), W_hat.float()


def _reference_gptq(w, h, cfg, act_order, static, damp=0.01):
    """Slow and plain GPTQ in float64: dead columns H_jj := 1; act order = decreasing H_jj (stable);
    after each column every later column is updated at once (no blocks); groups are the original
    contiguous columns, their qparams from the original W (static) or from the group's current
    weights when its first column comes up (dynamic). Returns codes and Ŵ in the original order."""
    from dataclasses import replace

    co, ci = w.shape
    H = h.double().clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(ci)
    H = H[perm][:, perm]
    H += damp * H.diagonal().mean() * torch.eye(ci, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    g = ci if cfg.group_size == -1 else cfg.group_size
    one = replace(cfg, group_size=-1)
    lo, hi = qrange(cfg)
    W = w.double()[:, perm].clone()
    group = (perm // g).tolist()  # processing position → group of the original columns
    s_all, z_all = compute_qparams(w, cfg)
    qp = {}
    Q = torch.zeros(co, ci, dtype=torch.float64)
    for j in range(ci):
        gi = group[j]
        if gi not in qp:
            if static:
                qp[gi] = s_all[:, gi].double(), z_all[:, gi].double()
            else:  # the group's columns as they are now (earlier ones of it are none: j is its first)
                cols = [k for k in range(ci) if group[k] == gi]
                s, z = compute_qparams(W[:, cols].float(), one)
                qp[gi] = s[:, 0].double(), z[:, 0].double()
        s, z = qp[gi]
        Q[:, j] = torch.clamp(torch.round(W[:, j] / s) + z, lo, hi)
        e = (W[:, j] - (Q[:, j] - z) * s) / U[j, j]
        W[:, j:] -= e[:, None] * U[j, j:][None, :]
    inv = torch.argsort(perm)
    Q = Q[:, inv]
    S = torch.stack([qp[gi][0] for gi in sorted(qp)], 1)
    Z = torch.stack([qp[gi][1] for gi in sorted(qp)], 1)
    return Q.float(), dequantize(Q, S, Z, cfg).float()


@pytest.mark.parametrize("qcfg", [QuantConfig(4, -1), QuantConfig(4, 32), QuantConfig(4, 64), QuantConfig(4, 128),
                                  QuantConfig(4, 64, symmetric=True), QuantConfig(3, 128, symmetric=True)])
@pytest.mark.parametrize("act_order,static", [(False, False), (False, True), (True, True), (True, False)])
def test_fast_loop_matches_the_plain_reference(qcfg, act_order, static):
    """The batched column loop (7 ops per column, codes and losses per block, dynamic groups planned
    ahead) gives the codes of the plain float64 algorithm, up to codes on a rounding boundary; the
    factor/round split is the same computation as gptq_quantize, bit for bit."""
    w, x = _layer(co=32, ci=320, n=1500, seed=11, dead=(9,))
    h, _ = hessian([x], "cpu")
    res = gptq_quantize(w, h, qcfg, block_size=48, act_order=act_order, static_groups=static)
    q_ref, w_ref = _reference_gptq(w, h, qcfg, act_order, static)
    assert (res.q != q_ref).float().mean() <= 0.002
    err, err_ref = layer_error(w - res.weight(qcfg), h), layer_error(w - w_ref, h)
    assert abs(err - err_ref) <= 0.01 * err_ref
    f = gptq_factor(h, 0.01, act_order)
    assert f.n_dead == 1 and not f.fallback and (f.perm is not None) == act_order
    split = gptq_round(w, f, qcfg, 48, static)
    assert torch.equal(split.q, res.q) and torch.equal(split.loss, res.loss) and split.damp == res.damp
    # the caller's tensors are left as they were
    w2, h2 = w.clone(), h.clone()
    gptq_quantize(w2, h2, qcfg, act_order=act_order, static_groups=static)
    assert torch.equal(w2, w) and torch.equal(h2, h)


def test_hessian_of_bf16_chunks_is_the_float32_one():
    """bf16 activations: products are exact in float32, so H matches the float32 accumulation."""
    _, x = _layer(ci=96, n=700)
    xb = x.bfloat16()
    h, n = hessian([xb[:300], xb[300:]], "cpu")
    ref = 2 * xb.double().T @ xb.double() / 700
    assert n == 700 and h.dtype == torch.float32
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-5)


# --- the algorithm on synthetic layers ------------------------------------------------------

@pytest.mark.parametrize("qcfg", CFGS)
@pytest.mark.parametrize("act_order,static", [(False, False), (False, True), (True, True), (True, False)])
def test_gptq_lowers_layer_error_and_stays_on_the_grid(qcfg, act_order, static):
    w, x = _layer()
    h, n = hessian([x[:700], x[700:]], "cpu")
    torch.testing.assert_close(h, 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-4)
    res = gptq_quantize(w, h, qcfg, block_size=48, act_order=act_order, static_groups=static)
    wq = res.weight(qcfg)
    # exactly on an awqnb grid: integer codes in range, requantizing with its qparams is the identity
    lo, hi = qrange(qcfg)
    assert torch.equal(res.q, res.q.round()) and res.q.min() >= lo and res.q.max() <= hi
    assert torch.equal(dequantize(quantize(wq, res.scale, res.zero, qcfg), res.scale, res.zero, qcfg), wq)
    if qcfg.symmetric:
        assert not res.zero.any()
    if static:  # the same grid as round-to-nearest
        s0, z0 = compute_qparams(w, qcfg)
        assert torch.equal(res.scale, s0) and torch.equal(res.zero, z0)
    # the layer output error on correlated inputs: clearly below round-to-nearest's
    err_rtn = layer_error(w - fake_quant(w, qcfg), h)
    err = layer_error(w - wq, h)
    assert err < 0.8 * err_rtn, (err, err_rtn)
    # the GPTQ loss it reports is Σ(w − ŵ)²/U_jj²/2 ≥ 0 per row
    assert res.loss.shape == (w.shape[0],) and bool((res.loss >= 0).all()) and float(res.loss.sum()) > 0


@pytest.mark.parametrize("qcfg", CFGS + [QuantConfig(4, 192)])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, True), (True, False)])
def test_packed_export_recovers_the_codes(qcfg, act_order, static):
    """awqnb.core.codes.recover_codes finds a grid for GPTQ weights from the weights alone (whole groups:
    the packed format needs ci % group_size == 0). Many groups need its lattice search, since GPTQ
    codes need not reach both ends of the range."""
    w, x = _layer(co=128, ci=192, seed=7)
    h, _ = hessian([x], "cpu")
    wq = gptq_quantize(w, h, qcfg, act_order=act_order, static_groups=static).weight(qcfg)
    codes = recover_codes(wq, qcfg)
    assert torch.equal(dequantize(codes.q.float(), codes.scale, codes.zero, qcfg), wq)


@pytest.mark.parametrize("qcfg", [QuantConfig(4, 32), QuantConfig(3, 64), QuantConfig(4, -1, symmetric=True)])
@pytest.mark.parametrize("block_size", [1, 37, 128, 1000])
def test_lazy_batches_match_textbook_gptq(qcfg, block_size):
    """Blocks (any size, groups straddling blocks) give the codes of the column-by-column algorithm
    with dynamic groups; float noise may move a code sitting on a rounding boundary, nothing more."""
    w, x = _layer(co=24, ci=160, n=800, seed=3)
    h, _ = hessian([x], "cpu")
    res = gptq_quantize(w, h, qcfg, block_size=block_size, act_order=False, static_groups=False)
    q_ref, w_ref = _naive_gptq(w, h, qcfg)
    assert (res.q != q_ref).float().mean() <= 0.002
    err, err_ref = layer_error(w - res.weight(qcfg), h), layer_error(w - w_ref, h)
    assert abs(err - err_ref) <= 0.01 * err_ref


@pytest.mark.parametrize("qcfg", CFGS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_uncorrelated_equal_variance_inputs_give_rtn(qcfg, act_order, static):
    """H ∝ I: no error is passed on, so GPTQ is round-to-nearest, bit for bit."""
    ci = 200
    x = torch.eye(ci).repeat(3, 1) * 1.7  # every channel the same energy, no correlation
    h, _ = hessian([x], "cpu")
    w, _ = _layer(ci=ci)
    res = gptq_quantize(w, h, qcfg, block_size=64, act_order=act_order, static_groups=static)
    assert torch.equal(res.weight(qcfg), fake_quant(w, qcfg))
    assert torch.equal(res.q, quantize(w, *compute_qparams(w, qcfg), qcfg))


def test_dead_columns_kept_and_rounded_to_nearest():
    w, x = _layer(dead=(5, 77))
    h, _ = hessian([x], "cpu")
    qcfg = QuantConfig(4, 32)
    res = gptq_quantize(w, h, qcfg, act_order=True, static_groups=True)
    assert res.n_dead == 2 and not res.fallback
    wq = res.weight(qcfg)
    # not zeroed (evaluation inputs may use them): exactly the round-to-nearest of the column
    assert torch.equal(wq[:, [5, 77]], fake_quant(w, qcfg)[:, [5, 77]])
    assert wq[:, [5, 77]].abs().sum() > 0
    assert layer_error(w - wq, h) < 0.8 * layer_error(w - fake_quant(w, qcfg), h)


def test_cholesky_failure_falls_back_to_rtn():
    w, _ = _layer(ci=64)
    h = -torch.eye(64)  # negative definite: no damping of the form λ·mean(diag) can fix it
    qcfg = QuantConfig(4, 32)
    res = gptq_quantize(w, h, qcfg, static_groups=True)
    assert res.fallback
    assert torch.equal(res.weight(qcfg), fake_quant(w, qcfg))


def test_same_input_same_codes_and_device_passed_in():
    w, x = _layer(seed=5)
    h, _ = hessian([x], torch.device("cpu"))
    qcfg = QuantConfig(4, 64)
    a = gptq_quantize(w, h, qcfg)
    b = gptq_quantize(w.clone(), h.clone(), qcfg)
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and torch.equal(a.loss, b.loss)
    with pytest.raises(AwqnbError, match="Hessian"):
        gptq_quantize(w, h[:10, :10], qcfg)


@pytest.mark.parametrize("qcfg", [QuantConfig(4, 32), QuantConfig(3, 32, symmetric=True), QuantConfig(2, 32),
                                  QuantConfig(8, 32), QuantConfig(8, 32, symmetric=True)])
@pytest.mark.parametrize("ci", [64, 65])
def test_pack_codes_roundtrip(qcfg, ci):
    lo, hi = qrange(qcfg)
    q = torch.randint(lo, hi + 1, (7, ci)).float()
    p = pack_codes(q, qcfg)
    assert p.dtype == torch.uint8 and p.shape[1] == ((ci + 1) // 2 if qcfg.bits <= 4 else ci)
    assert torch.equal(unpack_codes(p, ci, qcfg), q)


# --- the methods in the pipeline on the tiny models -----------------------------------------

def _run(tiny, name, method, params=None, gs=32):
    fp, _, calib = tiny[name]
    q = copy.deepcopy(fp)
    cfg = MethodConfig(method, QuantConfig(4, gs), SearchConfig(n_grid=10), calib_batch_size=2, params=params or {})
    res = pipeline.quantize(q, cfg, calib if method != "rtn" else None, progress=False)
    return fp, q, res


def _logit_mse(model, fp, ids):
    with torch.no_grad():
        return (model(input_ids=ids).logits - fp(input_ids=ids).logits).pow(2).mean().item()


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", ["gptq", "awq_gptq"])
def test_pipeline_evidence_exact_replay_and_determinism(tiny, name, method, tmp_path):
    fp, q, res = _run(tiny, name, method)
    spec = resolve_spec(fp)
    meta = json.loads(json.dumps(res.metadata()))  # evidence is JSON-able
    assert meta["method"] == method
    assert bool(res.layers[0].groups) == (method == "awq_gptq")
    for rec in res.layers:
        ev = rec.evidence["gptq"]
        assert set(ev) == set(spec.linears) == set(rec.replay)
        for lin_name, e in ev.items():
            assert e["layer_err_gptq"] < e["layer_err_rtn"], (rec.index, lin_name)
            assert 0 < e["rel_err"] < 1 and e["gptq_loss"] > 0 and not e["fallback_rtn"]
        assert set(ev["self_attn.q_proj"]["joint_with"]) == {"self_attn.k_proj", "self_attn.v_proj"}
        # every weight lies on the recorded grid
        blk = blocks(q, spec)[rec.index]
        for lin_name, rep in rec.replay.items():
            w = get_module(blk, lin_name).weight.data
            qq = unpack_codes(rep["codes"], w.shape[1], q_cfg := res.config.quant)
            assert torch.equal(dequantize(qq, rep["scale"], rep["zero"].float(), q_cfg).to(w.dtype), w)
    # replay from the saved record on a fresh FP copy: bit for bit, no calibration
    res.save(tmp_path / "r")
    replayed = pipeline.apply(copy.deepcopy(fp), pipeline.QuantResult.load(tmp_path / "r.json"))
    for (n1, p1), (_, p2) in zip(q.named_parameters(), replayed.named_parameters()):
        assert torch.equal(p1, p2), n1
    # same seed, same device: bit-identical weights
    _, q2, _ = _run(tiny, name, method)
    for (n1, p1), (_, p2) in zip(q.named_parameters(), q2.named_parameters()):
        assert torch.equal(p1, p2), n1


@pytest.mark.parametrize("name", TINY)
def test_gptq_beats_rtn_and_awq_gptq_beats_awq_on_logits(tiny, name):
    """Output error of the whole tiny model vs FP (logits MSE on calibration samples)."""
    fp, _, calib = tiny[name]
    ids = torch.stack(calib.samples[:4])
    err = {m: _logit_mse(_run(tiny, name, m)[1], fp, ids) for m in ["rtn", "awq", "gptq", "awq_gptq"]}
    assert err["gptq"] < err["rtn"], err
    assert err["awq_gptq"] <= err["awq"], err


@pytest.mark.parametrize("params", [{"act_order": True, "static_groups": True},
                                    {"act_order": True, "static_groups": False},
                                    {"act_order": False, "static_groups": False, "block_size": 48}])
def test_act_order_and_groups_on_the_tiny_model(tiny, params):
    """gemma3 tiny at g64 (160 = 2·64 + 32 columns: a partial last group) runs and replays bit for
    bit; at g32 (whole groups, packable) the packed export recovers every linear's codes."""
    fp, q, res = _run(tiny, "tiny-random-gemma3", "gptq", params, gs=64)
    replayed = pipeline.apply(copy.deepcopy(fp), res)
    assert all(torch.equal(a, b) for a, b in zip(q.parameters(), replayed.parameters()))
    _, q, res = _run(tiny, "tiny-random-gemma3", "gptq", params, gs=32)
    spec = resolve_spec(q)
    for blk in blocks(q, spec):
        for lin_name in spec.linears:
            w = get_module(blk, lin_name).weight.data
            codes = recover_codes(w, res.config.quant)
            assert torch.equal(dequantize(codes.q.float(), codes.scale, codes.zero, res.config.quant).to(w.dtype), w)


def test_params_validated_and_cli_flags():
    for bad in [{"damp_percent": 0.0}, {"block_size": 0}]:
        with pytest.raises(AwqnbError):
            get_method("gptq")(MethodConfig("gptq", QuantConfig(4, 32), params=bad))
    with pytest.raises(AwqnbError, match="no parameter"):
        get_method("awq_gptq")(MethodConfig("awq_gptq", QuantConfig(4, 32), params={"outlier_percent": 5}))
    args = cli.build_parser().parse_args(["quantize", "--method", "awq_gptq", "--damp-percent", "0.05",
                                          "--no-act-order", "--block-size", "64", "--no-static-groups"])
    cfg = cli.method_config(args)
    assert cfg.params == {"damp_percent": 0.05, "act_order": False, "block_size": 64, "static_groups": False}
    m = get_method(cfg.method)(cfg)
    assert m.searches_scales and m.needs_calibration
    assert not get_method("gptq").searches_scales and get_method("gptq").needs_calibration
