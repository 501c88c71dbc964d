"""Same seed, same device → bit-identical quantized weights and identical records, for every method.

Issue 15's target. Every registered method quantizes two fresh copies of each tiny model with the
same calibration set and config seed (CPU); the weights (every parameter and buffer) must agree bit
for bit, and the records (α grid, losses, chosen α, scales, clip ranges, replay data, evidence) exactly.
A different calibration draw must change something, so the comparison can fail.
"""
import copy
import dataclasses
import hashlib

import pytest
import torch

from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.model.data import load_calibration
from awqnb.quant.methods import REGISTRY

from conftest import TINY  # noqa: E402

METHODS = sorted(REGISTRY)
TIMING_KEYS = {"seconds"}  # wall-clock entries inside records: they may differ run to run


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny tensors, and two shared cores (two spinning threads per process
    slow these tests tenfold when other work runs). Determinism on a GPU: bench/determinism.py."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(method: str, seed: int = 42, **search) -> MethodConfig:
    # clip on: the clip search is part of what must reproduce (methods that calibrate run it)
    return MethodConfig(method, QuantConfig(4, 32), SearchConfig(n_grid=10, clip=True, clip_grid=10, **search),
                        calib_batch_size=2, seed=seed)


def _run(model, cfg, calib):
    q = copy.deepcopy(model)
    res = pipeline.quantize(q, cfg, calib, progress=False)
    return q, res


def _bits(t: torch.Tensor) -> tuple:
    """A tensor as (dtype, shape, raw bytes): equal iff bit-identical (NaN, −0 included)."""
    t = t.detach().cpu().contiguous()
    return str(t.dtype), tuple(t.shape), bytes(t.reshape(-1).view(torch.uint8).numpy())


def _canon(o):
    """Records in a form compared exactly: tensors as raw bytes, floats as their hex, timings dropped."""
    if torch.is_tensor(o):
        return _bits(o)
    if isinstance(o, dict):
        return {k: _canon(v) for k, v in o.items() if k not in TIMING_KEYS}
    if isinstance(o, (list, tuple)):
        return [_canon(v) for v in o]
    if isinstance(o, float):
        return o.hex()
    return o


def _record(res) -> list:
    return [{"index": r.index, "clip": _canon(r.clip), "replay": _canon(r.replay), "evidence": _canon(r.evidence),
             "groups": {g: _canon(vars(s)) for g, s in r.groups.items()}} for r in res.layers]


def _state(model) -> dict:
    return {k: _bits(v) for k, v in model.state_dict().items()}


def weights_sha256(model) -> str:
    h = hashlib.sha256()
    for k, (dtype, shape, raw) in sorted(_state(model).items()):
        h.update(f"{k}|{dtype}|{shape}|".encode())
        h.update(raw)
    return h.hexdigest()


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", METHODS)
def test_same_seed_is_bit_identical(tiny, name, method):
    fp, tok, calib = tiny[name]
    before = weights_sha256(fp)
    q1, r1 = _run(fp, _cfg(method), calib)
    q2, r2 = _run(fp, _cfg(method), calib)
    assert weights_sha256(fp) == before, "quantizing a copy changed the FP model"
    s1, s2 = _state(q1), _state(q2)
    assert s1.keys() == s2.keys()
    differ = [k for k in s1 if s1[k] != s2[k]]
    assert not differ, f"{method} on {name}: weights differ between two same-seed runs: {differ[:5]}"
    assert weights_sha256(q1) != before, "quantization changed nothing"
    assert r1.alphas() == r2.alphas()
    assert _record(r1) == _record(r2), f"{method} on {name}: records differ between two same-seed runs"
    if REGISTRY[method].searches_scales:
        assert r1.alphas() and all(r.groups for r in r1.layers)


@pytest.mark.parametrize("method", ["awq", "awq_gqa", "awq_gptq"])
def test_bfloat16_search_is_bit_identical(tiny, method):
    """The same in a bfloat16 compute dtype (the GPU runs' default for bf16 checkpoints)."""
    fp, tok, calib = tiny["tiny-random-gemma3"]
    cfg = dataclasses.replace(_cfg(method), dtype="bfloat16")
    (q1, r1), (q2, r2) = _run(fp, cfg, calib), _run(fp, cfg, calib)
    assert _state(q1) == _state(q2)
    assert _record(r1) == _record(r2)


@pytest.fixture(scope="module")
def other_calib(tiny):
    """tiny-random-llama's calibration set drawn with seed 1 (the fixture's is seed 0)."""
    return load_calibration(tiny["tiny-random-llama"][1], "wikitext2", n_calib=4, seqlen=64, seed=1)


@pytest.mark.parametrize("method", METHODS)
def test_another_calibration_seed_changes_the_result(tiny, other_calib, method):
    """The comparison above can fail: a different calibration draw moves every calibrated method
    (rtn, which reads no calibration, must not move)."""
    fp, tok, calib = tiny["tiny-random-llama"]
    other = other_calib
    assert [s.tolist() for s in other.samples] != [s.tolist() for s in calib.samples]
    q1, r1 = _run(fp, _cfg(method), calib)
    q2, r2 = _run(fp, _cfg(method), other)
    if REGISTRY[method].needs_calibration:
        assert _state(q1) != _state(q2)
        assert _record(r1) != _record(r2)
    else:
        assert _state(q1) == _state(q2)


def test_robust_praq_noise_follows_the_config_seed(tiny):
    """robust_praq's only randomness is its seeded noise: another config seed gives other weights."""
    fp, tok, calib = tiny["tiny-random-llama"]
    q1, _ = _run(fp, _cfg("robust_praq", seed=42), calib)
    q2, _ = _run(fp, _cfg("robust_praq", seed=43), calib)
    assert _state(q1) != _state(q2)


def test_bench_margins_and_hashes(tmp_path):
    """bench/determinism.py, run as a script on a tiny model: two same-seed runs hash alike, and its near-tie
    margins are consistent (runner-up ≠ choice, far runner-up ≥ 2 grid steps away, summary counts the rows)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "bench" / "determinism.py"), "--model", "tiny-random-llama",
                        "--methods", "awq", "--group-size", "32", "--n-calib", "4", "--calib-seqlen", "64",
                        "--seqlen", "64", "--max-windows", "2", "--device", "cpu", "--out", str(tmp_path)],
                       cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = json.loads((tmp_path / "determinism.json").read_text())["methods"][0]
    assert m["identical"] and len({r["sha256"] for r in m["runs"]}) == 1 and len(m["runs"]) == 2
    rows = [r for r in m["margins"] if r["chosen_alpha"] is not None]
    assert rows and {r["select"] for r in rows} == set(m["margin_summary"])
    for r in rows:
        assert r["second_alpha"] != r["chosen_alpha"] and r["gap_rel"] >= 0
        assert r["d_alpha"] == pytest.approx(abs(r["second_alpha"] - r["chosen_alpha"]))
        assert r["far_gap_rel"] >= r["gap_rel"] and r["far_d_alpha"] >= 2 * 0.05 - 1e-9
    for how, s in m["margin_summary"].items():
        sub = [r for r in m["margins"] if r["select"] == how]
        assert s["groups"] == len(sub) and s["gap_lt_0.01"] == sum(r["gap_rel"] < 0.01 for r in sub)