"""Fixtures shared by several test modules."""
import copy
import contextlib
import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

# The tests' own model cache (converted GGUFs, diagnostics), set before anything loads: never the
# user's ~/.cache/awqnb. Repo-local and git-ignored (.pytest_cache/) rather than a per-session temp
# dir, so a session does not re-convert SmolLM2's GGUF (its tokenizer serves the tiny models) each
# time; entries are keyed by the GGUF's sha256, so a stale one is never reused.
# AWQNB_TEST_CACHE overrides the place (a CI cache directory, say).
TEST_CACHE = Path(os.environ.get("AWQNB_TEST_CACHE") or Path(__file__).resolve().parents[1] / ".pytest_cache" / "awqnb")
os.environ["AWQNB_CACHE"] = str(TEST_CACHE)

TINY = ["tiny-random-llama", "tiny-random-gemma3"]


def random_calibration(vocab):
    """seed → a Calibration of 4 × 32 random token ids (a different set per seed)."""
    import torch

    from awqnb.model.data import Calibration

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return Calibration("random", 4, 32, seed, "test ids", list(torch.randint(0, vocab, (4, 32), generator=g)))
    return draw


@pytest.fixture(scope="module")
def tiny():
    """Each tiny random model with its tokenizer and a 4 × 64 WikiText-2 calibration set (seed 0);
    one copy per test module, so in-place quantization in one module cannot leak into another."""
    from awqnb.model.data import load_calibration
    from awqnb.model.loading import load_model

    out = {}
    for name in TINY:
        model, tok = load_model(name)
        out[name] = (model, tok, load_calibration(tok, "wikitext2", n_calib=4, seqlen=64, seed=0))
    return out


def quantize_each(tiny, cfg):
    """Per tiny model: (fp model, calibration, a quantized copy, its QuantResult) under `cfg`."""
    from awqnb.quant import pipeline

    out = {}
    for name, (fp, _tok, calib) in tiny.items():
        q = copy.deepcopy(fp)
        out[name] = (fp, calib, q, pipeline.quantize(q, cfg, calib, progress=False))
    return out


# The report notebook on tiny-random-llama: small enough to run in ~30 s on two CPU cores.
TINY_REPORT_PARAMS = dict(n_calib=4, calib_seqlen=32, eval_windows=2, eval_seqlen=64, n_grid=4, n_samples=8,
                          sample_max_length=64, diag_samples=2, SENS_WINDOWS=2, SENS_SEQLEN=64)


@pytest.fixture(scope="session")
def report_batch(tmp_path_factory):
    """One `awqnb report` batch, run as a user runs it (the CLI with a --params YAML file): a model
    that fails inside its notebook first (a directory named no-such-model whose config.json holds no
    weights or tokenizer: it passes the checks made before any run), then tiny-random-llama. Shared by test_report and test_browser, so the
    notebooks execute once per session.

    Returns out (the output dir), index, runs (model -> `find_runs` record), rc, stdout, stderr."""
    from awqnb import cli
    from awqnb.workbench import report_index

    out = tmp_path_factory.mktemp("reports")
    params = Path(tmp_path_factory.mktemp("params")) / "tiny.yaml"
    params.write_text(yaml.safe_dump(TINY_REPORT_PARAMS))
    broken = Path(tmp_path_factory.mktemp("models")) / "no-such-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    args = cli.build_parser().parse_args(["report", "--models", f"{broken},tiny-random-llama",
                                          "--methods", "rtn,awq", "--params", str(params), "--output-dir", str(out)])
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: tiny tensors, no thread contention
        mp.setenv("AWQNB_DIAG_CACHE", str(out / ".diag-cache"))  # diagnostics cache: not the user's
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = args.fn(args)
    runs = {Path(r["model"]).name: r for r in report_index.find_runs(out)}
    return SimpleNamespace(out=out, index=out / "index.html", runs=runs, rc=rc, stdout=stdout.getvalue(),
                           stderr=stderr.getvalue())
