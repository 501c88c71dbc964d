"""Perplexity protocols against direct computations, bootstrap comparisons, and the CLI."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awqnb.analysis import stats
from awqnb.analysis.evaluate import (PerplexityResult, bootstrap_delta, comparison_table, sample_perplexity,
                                     token_perplexity)
from awqnb.core.errors import AwqnbError
from awqnb.model.loading import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random-gemma3")  # soft-capped logits, tied 49k-vocab head


def test_token_perplexity_matches_hf_loss(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (3 * 40 + 7,), generator=g)
    r = token_perplexity(model, tokens, seqlen=40, logit_chunk=16, batch_size=2, progress=False)
    assert r.n_units == 3 and r.n_tokens == [39, 39, 39]  # remainder dropped
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in tokens[:120].view(3, 40)]
    assert r.ppl == pytest.approx(math.exp(sum(losses) / 3), rel=1e-4)
    assert r.nll == pytest.approx(losses, rel=1e-4)
    with pytest.raises(AwqnbError, match="fewer than one window"):
        token_perplexity(model, tokens[:10], seqlen=40, progress=False)


def test_sample_perplexity_matches_per_text_loss(tiny):
    model, tok = tiny
    texts = ["The cat sat on the mat.", "Stocks fell sharply on Monday after the report.", "x", "Hello world"]
    r = sample_perplexity(model, tok, texts, max_length=64, batch_size=3, progress=False)
    tot, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt").input_ids
            if ids.shape[1] < 2:
                continue
            tot += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert r.protocol == "sample" and sum(r.n_tokens) == n
    assert r.ppl == pytest.approx(math.exp(tot / n), rel=1e-4)


def _res(nll, n=None, ds="wikitext2", method=None):
    n = n or [10] * len(nll)
    ppl = math.exp(sum(a * b for a, b in zip(nll, n)) / sum(n))
    return PerplexityResult(ds, "gptq-token", 2048, ppl, list(nll), list(n), meta={"method": method} if method else {})


def test_bootstrap_is_paired_and_covers_the_delta():
    base = _res([2.0, 3.0, 2.5, 4.0, 3.5, 2.2, 2.8, 3.1])
    same = _res(base.nll)
    assert bootstrap_delta(same, base) == (0.0, 0.0, 0.0)
    better = _res([x - 0.05 for x in base.nll])  # uniformly better: every resample agrees
    d, lo, hi = bootstrap_delta(better, base)
    assert d == pytest.approx((math.exp(-0.05) - 1) * 100)
    assert lo == pytest.approx(d) and hi == pytest.approx(d)
    noisy = _res([x + (0.3 if i % 2 else -0.3) for i, x in enumerate(base.nll)])
    d, lo, hi = bootstrap_delta(noisy, base)
    assert lo < d < hi and lo < 0 < hi
    with pytest.raises(AwqnbError, match="different units"):
        bootstrap_delta(_res([1.0, 2.0]), base)


def test_comparison_table_verdicts_of_one_run_per_method():
    """One result per method: fp against rtn (no calibration on either side) is judged on the windows;
    anything calibrated (awq) or unknown gets 'cannot separate seeds', however large the difference."""
    base = _res([2.0, 3.0, 2.5, 4.0], method="rtn")
    t = comparison_table({"rtn": {"wikitext2": base},
                          "fp": {"wikitext2": _res([x - 0.1 for x in base.nll], method="fp")},
                          "worse_fp": {"wikitext2": _res([x + 0.1 for x in base.nll], method="fp")},
                          "awq": {"wikitext2": _res([x - 0.3 for x in base.nll], method="awq")},
                          "unknown": {"wikitext2": _res([x - 0.3 for x in base.nll])}}, baseline="rtn")
    v = dict(zip(t.method, t.verdict))
    assert v == {"rtn": "(baseline)", "fp": "better", "worse_fp": "worse", "awq": "cannot separate seeds",
                 "unknown": "cannot separate seeds"}
    assert set(v.values()) <= set(stats.VERDICTS) | {stats.BASELINE}
    rows = t.set_index("method")
    assert rows.delta_pct["fp"] < 0 and rows.delta_pct["awq"] == pytest.approx((math.exp(-0.3) - 1) * 100)
    assert "neither side uses calibration" in rows.noise["fp"] and "ONE calibration seed" in rows.noise["awq"]
    with pytest.raises(AwqnbError, match="baseline"):
        comparison_table({"a": {}}, baseline="b")
    r = _res([1.0])
    assert PerplexityResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_perplexity_past_the_float_range_is_inf(tmp_path, capsys, caplog):
    """A model whose mean NLL exceeds ~709 nats: `awqnb eval` reports ppl inf (math.exp would raise
    OverflowError), and the result file still reads back and compares."""
    from awqnb.cli import main
    from awqnb.analysis.evaluate import exp_nll

    assert exp_nll(709.0) == pytest.approx(math.exp(709.0)) and exp_nll(710.0) == math.inf
    model, tok = load_model("tiny-random-llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e5)  # logits in the 1e4–1e5 range: NLL far past 709
    d = tmp_path / "broken"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    with caplog.at_level("WARNING", logger="awqnb.analysis.evaluate"):
        assert main(["eval", "--model", str(d), "--seqlen", "32", "--max-windows", "2", "--json",
                     str(tmp_path / "broken.json")]) == 0
    out = capsys.readouterr().out
    assert "units=2 runtime=dense: inf" in out and any("inf" in r.message for r in caplog.records)
    r = PerplexityResult.read(tmp_path / "broken.json")
    assert r.ppl == math.inf and min(r.nll) > 709 and all(math.isfinite(x) for x in r.nll)
    t = comparison_table({"broken": {r.dataset: r}, "copy": {r.dataset: r}}, baseline="broken")
    assert t.set_index("method").delta_pct["copy"] == 0.0


def test_compare_baseline_by_bare_method_name(tmp_path, capsys):
    """`awqnb compare rtn.json awq.json --baseline rtn`: names are method:stem; a bare method (or
    stem) that matches one result is that result; one matching several is refused, naming them."""
    from awqnb.cli import main

    base = [2.0, 3.0, 2.5, 4.0, 3.5, 2.2]
    for name, method, shift in (("rtn", "rtn", 0.0), ("awq", "awq", -0.1), ("awq2", "awq", -0.2)):
        _res([x + shift for x in base], method=method).to_json(tmp_path / f"{name}.json")
    assert main(["compare", str(tmp_path / "awq.json"), str(tmp_path / "rtn.json"), "--baseline", "rtn"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith(("rtn:", "awq:"))}
    assert "(baseline)" in lines["rtn:rtn"] and "cannot separate seeds" in lines["awq:awq"]
    assert "evaluation windows' sampling noise only" in out and "Calibration-seed noise is not measured" in out
    assert main(["compare", str(tmp_path / "awq.json"), str(tmp_path / "rtn.json"), "--baseline", "rtn:rtn"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "awq.json"), str(tmp_path / "awq2.json"), str(tmp_path / "rtn.json"),
                 "--baseline", "awq2"]) == 0  # a file stem names one result too
    assert "(baseline)" in next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("awq:awq2"))
    assert main(["compare", str(tmp_path / "awq.json"), str(tmp_path / "awq2.json"), "--baseline", "awq"]) == 2
    err = capsys.readouterr().err
    assert "matches several results ['awq:awq', 'awq:awq2']" in err
    assert main(["compare", str(tmp_path / "awq.json"), str(tmp_path / "rtn.json"), "--baseline", "gptq"]) == 2
    assert "is not one of ['awq:awq', 'rtn:rtn']" in capsys.readouterr().err


def _cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "awqnb", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_quantize_eval_compare(tmp_path):
    out = tmp_path / "q"
    for method in ("rtn", "awq"):
        p = _cli("quantize", "--model", "tiny-random-llama", "--method", method, "--group-size", "32", "--n-calib", "4",
                 "--calib-seqlen", "32", "--output-dir", str(out), cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        d = Path(p.stdout.strip().splitlines()[-1])  # the directory name carries a config hash
        assert d.parent == out and d.name.startswith(f"tiny-random-llama_{method}_w4_g32_headfp16_")
        assert (d / "quantization_metadata.json").is_file() and (d / "quant_result.json").is_file()
        assert (d / "quant_result.safetensors").is_file() and not list(d.glob("*.pt")) and not list(d.glob("*.bin"))
        p = _cli("eval", "--model", str(d), "--seqlen", "64", "--max-windows", "3", "--json", str(tmp_path / f"{method}.json"),
                 cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert f"[{method}] wikitext2 gptq-token ppl seqlen=64 units=3" in p.stdout
    meta = json.loads((d / "quantization_metadata.json").read_text())  # d: the awq run's directory
    assert meta["calibration"]["n_calib"] == 4 and len(meta["layers"]) == 2
    assert set(meta["layers"][0]["alpha"]) == {"qkv", "vo", "gate_up", "down"}
    p = _cli("compare", str(tmp_path / "rtn.json"), str(tmp_path / "awq.json"), "--csv", str(tmp_path / "c.csv"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "delta_pct" in p.stdout and (tmp_path / "c.csv").is_file()
    assert "cannot separate seeds" in p.stdout and "Calibration-seed noise is not measured" in p.stdout


@pytest.mark.parametrize("args,msg", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "tiny-random-llama", "--method", "no_such_method"], "unknown method 'no_such_method'"),
    (["--model", "tiny-random-llama", "--method", "rtn", "--group-size", "4096"], "larger than a layer"),
    (["--model", "tiny-random-llama", "--method", "awq", "--group-size", "32", "--n-calib", "100000"], "fewer than n_calib"),
    (["--model", "tiny-random-llama", "--method", "awq", "--group-size", "32", "--calib-dataset", "missing.txt"], "unknown"),
    (["--model", "tiny-random-llama", "--method", "rtn", "--bits", "5"], "bits=5 is not supported"),
    (["--model", "tiny-random-llama", "--method", "rtn", "--param", "outlier_percent=3"], "has no parameter"),
])
def test_cli_bad_input_is_one_clear_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, args, msg):
    from awqnb.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["quantize", *args, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.startswith("awqnb: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_process_exit_status(tmp_path):
    p = _cli("quantize", "--model", "nope", "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert p.returncode == 2 and "unknown model 'nope'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
