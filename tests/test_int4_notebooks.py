"""Evaluating on the runtime a model path gets (awqnb.export.int4.load_for_eval): a packed directory on
the INT4 runtime (Int4Linear on torch's CPU int4 kernel) with the fake-quant model's perplexity to float
rounding, dense otherwise; and the report notebook executed on a tiny packed directory, saying which
runtime and kernel ran and scoring the checkpoint on both runtimes."""
import copy
import json
from pathlib import Path

import nbformat
import pytest
import torch
from torch import nn

from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.export import int4
from awqnb.export import packed as export
from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig
from awqnb.workbench import notebook_run, report

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
        "in Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel "
        "Tower surpassed the Washington Monument to become the tallest man-made structure in the world. ") * 12


@pytest.fixture(scope="module")
def packed(tiny, tmp_path_factory):
    """(fake-quant model, calibration, packed directory) of tiny-random-llama, RTN 4-bit g32."""
    fp, tok, calib = tiny["tiny-random-llama"]
    m = copy.deepcopy(fp)
    cfg = MethodConfig("rtn", QuantConfig(4, 32), SearchConfig(n_grid=4))
    res = pipeline.quantize(m, cfg, None, progress=False)
    d = export.save_packed(m, tok, tmp_path_factory.mktemp("int4nb") / "p", cfg, res.metadata())
    return m, calib, d


def test_load_for_eval_auto_runs_a_packed_directory_as_int4(packed):
    """auto on a packed directory: Int4Linear on torch's kernel, no dense weight for those linears,
    provenance naming runtime and kernel, and the fake-quant model's perplexity to float rounding;
    dense on the same directory: plain linears, the same perplexity."""
    from awqnb.analysis.evaluate import token_perplexity

    m, calib, d = packed
    model, tok, prov = int4.load_for_eval(d, device="cpu")
    mods = [x for x in model.modules() if isinstance(x, int4.Int4Linear)]
    assert len(mods) == 14 and all(x.kernel == "torch" and not hasattr(x, "weight") for x in mods)
    assert tok is not None
    assert prov["runtime"] == "int4" and prov["requested"] == "auto" and prov["kernel"] == "auto"
    assert prov["int4"] == int4.int4_summary(model) and prov["int4"]["torch"] == 14 and prov["device"] == "cpu"
    words = int4.runtime_words(prov)
    assert "INT4" in words and "14 linears as Int4Linear (14 on torch" in words

    tokens = torch.cat(calib.samples)
    ref = token_perplexity(m, tokens, seqlen=64, max_windows=4, progress=False)
    got = token_perplexity(model, tokens, seqlen=64, max_windows=4, progress=False)
    assert got.ppl == pytest.approx(ref.ppl, rel=1e-5)
    assert max(abs(a - b) for a, b in zip(ref.nll, got.nll)) < 1e-5

    dense, _, dprov = int4.load_for_eval(d, device="cpu", runtime="dense")
    assert dprov["runtime"] == "dense" and dprov["int4"] is None and dprov["kernel"] is None
    assert not any(isinstance(x, int4.Int4Linear) for x in dense.modules())
    assert isinstance(dense.model.layers[0].mlp.down_proj, nn.Linear)
    assert "Runtime: dense" in int4.runtime_words(dprov)
    dres = token_perplexity(dense, tokens, seqlen=64, max_windows=4, progress=False)
    assert dres.ppl == pytest.approx(ref.ppl, rel=1e-5)


def test_resolve_runtime_choices_and_refusals(packed, tiny, tmp_path):
    _, _, d = packed
    assert int4.resolve_runtime(d, "auto")[0] == "int4" and int4.resolve_runtime(d, "int4")[0] == "int4"
    assert int4.resolve_runtime(d, "dense")[0] == "dense"
    assert int4.resolve_runtime("tiny-random-llama", "auto") == ("dense", "not a packed directory")
    fp, _, _ = tiny["tiny-random-llama"]
    fp.save_pretrained(tmp_path / "fp")
    assert int4.resolve_runtime(tmp_path / "fp")[0] == "dense"
    for bad, match in [(dict(path=tmp_path / "fp", runtime="int4"), "not a packed"),
                       (dict(path=d, runtime="fast"), "runtime='fast' is unknown"),
                       (dict(path=d, runtime="auto", kernel="marlin"), "kernel='marlin' is unknown")]:
        with pytest.raises(AwqnbError, match=match) as e:
            int4.resolve_runtime(**bad)
        assert len(str(e.value).splitlines()) == 1


def test_model_report_on_a_packed_directory_says_int4_and_matches_dense(packed, tmp_path, monkeypatch):
    """model_report on a packed directory (runtime auto): the report names the INT4 runtime and its
    kernel, metrics.json records it, and the checkpoint's perplexity on the INT4 runtime equals its
    dense-decoded (fp) perplexity to float rounding on the CPU."""
    _, _, d = packed
    text = tmp_path / "text.txt"  # a small local text: no WikiText-2 tokenizing
    text.write_text(TEXT)
    params = dict(n_calib=2, calib_seqlen=32, calib_dataset=str(text), eval_dataset=str(text), eval_seqlen=64,
                  eval_windows=2, sample_datasets=[], diag_samples=0, SENSITIVITY=False, SEEDS=1, device="cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("AWQNB_DIAG_CACHE", str(tmp_path / "diag-cache"))
    run = notebook_run.run_report(str(d), ["rtn"], params, output_dir=tmp_path / "out")
    rec = json.loads((run / report.RUN_FILE).read_text())
    assert rec["state"] == "ok", rec["error"]
    doc = report.read_metrics(run)
    rt = doc["runtime"]
    assert rt["runtime"] == "int4" and rt["requested"] == "auto" and rt["kernel"] == "auto"
    assert rt["int4"]["int4_linears"] == 14
    assert rt["int4"]["torch"] == 14 and doc["parameters"]["runtime"] == "auto"
    rows = {r["method"]: r for r in rt["results"]}
    assert set(rows) == {"fp", "fp (int4 runtime)"} and rows["fp (int4 runtime)"]["units"] == 2
    assert rows["fp (int4 runtime)"]["ppl"] == pytest.approx(rows["fp"]["ppl"], rel=1e-5)
    fp_row = next(r for r in doc["results"] if r["label"] == "fp")
    assert fp_row["ppl"] == pytest.approx(rows["fp"]["ppl"])  # the same number the comparison reports
    nb = nbformat.read(next(run.glob("*.ipynb")), as_version=4)
    shown = "".join(o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.outputs)
    assert "**Runtime: INT4**" in shown and "14 on torch" in shown


@pytest.mark.parametrize("name", ["model_report", "compare_methods"])
def test_committed_notebooks_have_the_runtime_parameters_and_no_outputs(name):
    """Both evaluating notebooks take runtime / int4_kernel and run the same INT4 cell (model_report's
    run above covers compare_methods' too, which differs only in the progress line)."""
    nbs = {n: nbformat.read(NOTEBOOKS / f"{n}.ipynb", as_version=4) for n in ("model_report", name)}
    nb = nbs[name]
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    params = notebook_run.notebook_parameters(NOTEBOOKS / f"{name}.ipynb")
    assert params["runtime"] == '"auto"' and params["int4_kernel"] == '"auto"'

    def cell(n):
        src = next(c.source for c in nbs[n].cells if c.get("id") == "int4-runtime")
        return [ln for ln in src.splitlines() if "progress.stage(" not in ln]

    assert cell(name) == cell("model_report") and "int4.load_for_eval(model, dev, runtime=runtime" in "\n".join(cell(name))


def test_cli_eval_runtime_auto_picks_int4_for_a_packed_directory(packed, tmp_path, capsys):
    """`awqnb eval --runtime auto`: the INT4 runtime on a packed directory (named in stdout and JSON), dense
    on an alias."""
    from awqnb.cli import main

    _, _, d = packed
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    base = ["eval", "--dataset", str(text), "--seqlen", "64", "--max-windows", "2", "--device", "cpu",
            "--runtime", "auto"]
    assert main(base + ["--model", str(d), "--json", str(tmp_path / "a.json")]) == 0
    assert "runtime=int4: " in capsys.readouterr().out
    meta = json.loads((tmp_path / "a.json").read_text())["meta"]
    assert meta["runtime"] == "int4" and meta["int4"]["int4_linears"] == 14
    assert main(base + ["--model", "tiny-random-llama"]) == 0
    assert "runtime=dense: " in capsys.readouterr().out
