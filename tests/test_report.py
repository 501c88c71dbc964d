"""The report notebook executed under papermill on a tiny model (through `awqnb report`, see
conftest.report_batch): metrics.json, offline HTML, the index, a failing model that does not stop
the batch but makes the command exit non-zero, and the notebooks' documented parameters."""
import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from awqnb.workbench import notebook_run, report, report_index
from awqnb.core.errors import AwqnbError

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = NOTEBOOK_DIR / "model_report.ipynb"


@pytest.fixture(scope="module")
def batch(report_batch):
    return report_batch.out, report_batch.index, report_batch.runs


def test_committed_notebook_has_no_outputs_and_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    names = set(notebook_run.notebook_parameters(NOTEBOOK))
    assert {"model", "methods", "bits", "group_size", "n_calib", "calib_seqlen", "calib_dataset", "eval_dataset",
            "eval_seqlen", "eval_windows", "device", "seed", "SEEDS", "output_dir", "SENSITIVITY", "SENS_METHOD",
            "SENS_WINDOWS", "SENS_SEQLEN"} <= names


def test_metrics_json_has_every_number_with_its_context(batch):
    out, _, runs = batch
    run = runs["tiny-random-llama"]
    assert run["state"] == "ok", run["error"]
    assert run["dir"].parent == out / "tiny-random-llama"
    doc = json.loads((run["dir"] / "metrics.json").read_text())
    rows = {r["label"]: r for r in doc["results"] if r["dataset"] == "wikitext2"}
    assert set(rows) == {"fp", "rtn", "awq"}
    sample = {r["label"]: r for r in doc["results"] if r["dataset"] == "ag_news"}  # sample perplexity
    assert set(sample) == {"fp", "rtn", "awq"} and all(r["protocol"] == "sample" for r in sample.values())
    for label, r in rows.items():
        for k in report.HEADLINE:
            assert k in r, (label, k)
        assert r["model"] == "tiny-random-llama" and r["method"] == label
        assert r["dataset"] == "wikitext2" and r["protocol"] == "gptq-token" and r["seqlen"] == 64
        assert r["n_units"] == 2
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    assert rows["fp"]["bits"] is None and rows["fp"]["verdict"] == "(baseline)"
    for label in ("rtn", "awq"):
        assert rows[label]["bits"] == 4 and rows[label]["group_size"] == 128
        assert rows[label]["ci_low"] <= rows[label]["delta_pct"] <= rows[label]["ci_high"]
    assert rows["rtn"]["calibration"] is None  # RTN uses no calibration data
    assert rows["awq"]["calibration"]["dataset"] == "wikitext2"
    assert rows["awq"]["calibration"]["n_calib"] == 4 and rows["awq"]["calibration"]["seqlen"] == 32
    assert doc["parameters"]["n_calib"] == 4 and doc["seed"] == 42 and doc["versions"]["torch"]
    assert set(doc["alphas"]) == {"awq"}
    # the default three calibration seeds: mean ± spread per method, noise-aware verdicts against RTN
    assert doc["seeds"] == [42, 43, 44] and doc["parameters"]["SEEDS"] == 3 and doc["skipped"] == {}
    summ = {(r["label"], r["dataset"]): r for r in doc["seed_summary"]}
    assert set(summ) == {(k, ds) for k in ("fp", "rtn", "awq") for ds in ("wikitext2", "ag_news")}
    assert all(r["n_seeds"] == 3 and r["ppl_min"] * (1 - 1e-12) <= r["ppl_mean"] <= r["ppl_max"] * (1 + 1e-12)
               for r in summ.values())
    assert summ[("rtn", "wikitext2")]["ppl_sd"] == 0 and summ[("awq", "wikitext2")]["ppl_sd"] > 0
    assert summ[("awq", "wikitext2")]["per_seed"].count(": ") == 3
    assert summ[("fp", "wikitext2")]["ppl_mean"] == pytest.approx(rows["fp"]["ppl"])
    verdicts = {(v["label"], v["dataset"]): v for v in doc["verdicts"]}
    assert set(verdicts) == {(k, ds) for k in ("fp", "awq") for ds in ("wikitext2", "ag_news")}
    v = verdicts[("awq", "wikitext2")]
    assert v["baseline"] == "rtn" and v["n_seeds"] == 3 and v["verdict"] in ("better", "worse", "within noise")
    assert v["ci_low"] <= v["delta_pct"] <= v["ci_high"] and "3 calibration seeds" in v["noise"]


def test_html_embeds_plotly_offline(batch):
    _, _, runs = batch
    run = runs["tiny-random-llama"]
    html = run["html"].read_text(encoding="utf-8")
    assert "plotly.js v" in html and "window.Plotly = Plotly" in html  # the library itself, inline
    assert 'src="https://cdn.plot.ly' not in html and "import \"https://cdn.plot.ly" not in html
    assert not re.findall(r'<script[^>]*\bsrc="https?://[^"]*"', html)  # no require.js / MathJax from a CDN
    first_plot = html.index("Plotly.newPlot")
    assert html.index("window.Plotly = Plotly") < first_plot
    assert html.count("Plotly.newPlot") >= 3  # perplexity bars, α curves, α map
    nb = nbformat.read(run["ipynb"], as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


def test_sensitivity_section_is_recorded_and_rendered(batch):
    """The Sensitivity section on tiny-random-llama (SENS_WINDOWS=2, SENS_SEQLEN=64): ranked on WikiText-2
    validation, the plans scored on the same slice as the evaluation above, so the scoring slice's FP and
    fully quantized perplexities must match the report's."""
    _, _, runs = batch
    run = runs["tiny-random-llama"]
    assert run["state"] == "ok", run["error"]
    doc = json.loads((run["dir"] / "metrics.json").read_text())
    p = doc["parameters"]
    assert (p["SENSITIVITY"], p["SENS_METHOD"], p["SENS_WINDOWS"], p["SENS_SEQLEN"]) == (True, "awq", 2, 64)
    s = doc["sensitivity"]
    assert s["method"] == "awq" and (s["windows"], s["seqlen"]) == (2, 64)
    assert s["provenance"]["eval"]["n_windows"] == 2 and s["provenance"]["group_size"] == 128
    ppl = {r["label"]: r["ppl"] for r in doc["results"] if r["dataset"] == "wikitext2"}
    assert s["rank_slice"].startswith("WikiText-2 validation, first 2 × 64 tokens; evaluation: WikiText-2 test")
    assert s["score_slice"] == "WikiText-2 test, first 2 × 64 tokens" and s["same_slice"] is False
    assert s["score_fp_ppl"] == pytest.approx(ppl["fp"], rel=1e-4)
    assert s["score_quant_ppl"] == pytest.approx(ppl["awq"], rel=1e-4)  # awq's own QuantResult, replayed
    frame = s["frame"]
    families = ("qkv", "vo", "gate_up", "down")
    assert sorted((r["layer"], r["family"], r["mode"]) for r in frame) == sorted(
        (layer, f, m) for layer in (0, 1) for f in families for m in ("only", "except"))
    for r in frame:
        assert r["kl"] >= 0 and math.isfinite(r["ppl"]) and r["n_params"] > 0
        expect = r["ppl"] - s["fp_ppl"] if r["mode"] == "only" else s["quant_ppl"] - r["ppl"]
        assert r["dppl"] == pytest.approx(expect, rel=1e-6, abs=1e-6)
    only_kl = {}
    for r in frame:
        if r["mode"] == "only":
            only_kl[r["layer"]] = only_kl.get(r["layer"], 0.0) + r["kl"]
    assert s["most_sensitive_layer"] == max(only_kl, key=only_kl.get)
    front = s["pareto"]
    assert {r["strategy"] for r in front} == {"sensitivity", "recovery", "mse", "random"}
    for strat in ("sensitivity", "recovery", "mse", "random"):
        rows = sorted((r for r in front if r["strategy"] == strat), key=lambda r: r["k"])
        assert [r["k"] for r in rows] == [0, 1, 2, 4, 8]
        assert rows[0]["avg_bits"] == pytest.approx(4.0) and rows[0]["ppl"] == pytest.approx(s["score_quant_ppl"], rel=1e-6)
        assert rows[-1]["avg_bits"] == pytest.approx(8.0)  # every family kept at 8 bit
        assert all(a["avg_bits"] < b["avg_bits"] for a, b in zip(rows, rows[1:]))
    best = next(r for r in front if r["strategy"] == "sensitivity" and r["k"] == 1)
    top = max((r for r in frame if r["mode"] == "only"), key=lambda r: r["kl"])
    assert best["plan"] == f'{top["layer"]}.{top["family"]}:8'  # k = 1 keeps the part with the largest KL
    be = doc["block_errors"]
    assert set(be) == {"rtn", "awq"} and [r["layer"] for r in be["awq"]] == [0, 1]
    assert all(r["rel_err"] is not None and 0 < r["rel_err"] < 1 for r in be["awq"])
    html = run["html"].read_text(encoding="utf-8")
    for title in ("Sensitivity: KL to FP (nats", "most sensitive parts", "Mixed precision: perplexity vs average bits",
                  "Where the error enters: block output error vs FP"):
        assert html.count(title) == 1, title
    nb = nbformat.read(run["ipynb"], as_version=4)
    sens_cells = {c.id: c for c in nb.cells if c.get("id", "").startswith("sens-") and c.cell_type == "code"}
    assert set(sens_cells) == {"sens-check", "sens-run", "sens-pareto", "sens-blocks"}
    for cid in ("sens-run", "sens-pareto", "sens-blocks"):
        assert any("text/html" in (o.get("data") or {}) for o in sens_cells[cid].outputs), cid


def test_failed_notebook_is_kept_and_does_not_stop_the_batch(batch):
    _, _, runs = batch
    bad = runs["no-such-model"]
    assert bad["state"] == "failed" and bad["error"]
    nb = nbformat.read(bad["ipynb"], as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors and bad["error"].startswith(errors[0].ename)  # the run records the cell's own error
    assert not (bad["dir"] / "metrics.json").exists()
    assert runs["tiny-random-llama"]["state"] == "ok"  # ran after the failure
    assert not [p for p in bad["dir"].parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_index_links_every_run(batch):
    out, index, runs = batch
    assert index == out / "index.html"
    html = index.read_text(encoding="utf-8")
    ok = runs["tiny-random-llama"]
    assert f'href="{ok["html"].relative_to(out).as_posix()}"' in html
    assert f'href="{runs["no-such-model"]["html"].relative_to(out).as_posix()}"' in html
    assert "failed" in html and "gptq-token" in html and "W4" in html
    assert f'{json.loads((ok["dir"] / "metrics.json").read_text())["results"][2]["ppl"]:.3f}' in html


def test_user_errors_before_any_work(tmp_path):
    with pytest.raises(AwqnbError, match="unknown notebook"):
        notebook_run.run_report("tiny-random-llama", ["rtn"], output_dir=tmp_path, notebook="no_such_notebook")
    with pytest.raises(AwqnbError, match="unknown notebook parameter"):
        notebook_run.run_report("tiny-random-llama", ["rtn"], params={"n_calibb": 4}, output_dir=tmp_path)
    with pytest.raises(AwqnbError, match="no methods"):
        notebook_run.run_report("tiny-random-llama", "", output_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_kernel_is_this_environment():
    assert notebook_run.kernel_name() == "python3"


def test_index_of_an_empty_dir(tmp_path):
    index = report_index.write_index(tmp_path / "reports")
    assert "no runs yet" in index.read_text()


def _kernel_dir(root: Path, exe: str) -> Path:
    d = root / "kernels" / "python3"
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps({"argv": [exe, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                               "display_name": "x", "language": "python"}))
    return root


def test_kernel_of_another_python_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_dir(tmp_path / "other", "/opt/elsewhere/bin/python3")))
    with pytest.raises(AwqnbError, match="ipykernel install --sys-prefix"):
        notebook_run.kernel_name()
    # a bare 'python' is run by jupyter_client with this interpreter: fine
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_dir(tmp_path / "bare", "python")))
    assert notebook_run.kernel_name() == "python3"


@pytest.mark.parametrize("path", sorted(NOTEBOOK_DIR.glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_notebook_parameter_has_a_type_and_help(path):
    """`papermill --help-notebook` describes every parameter: each assignment in the parameters cell
    is written `name: type = value  # help` (the form papermill parses; a line with a second '='
    is skipped by papermill, so it must not appear in a help comment either)."""
    import papermill as pm

    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    assigned = []
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.AnnAssign):
            assigned.append(node.target.id)
        elif isinstance(node, ast.Assign):
            assigned += [t.id for t in node.targets if isinstance(t, ast.Name)]
    inferred = pm.inspect_notebook(str(path))
    assert list(inferred) == assigned, f"{path.name}: papermill could not parse every parameter line"
    for name, p in inferred.items():
        assert p["inferred_type_name"] not in ("None", ""), f"{path.name}: {name} has no type (write `{name}: T = ...`)"
        assert p["help"].strip(), f"{path.name}: {name} has no help comment (`{name}: T = ...  # what it is`)"
    out = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Unknown type" not in out.stdout
    for name in inferred:
        assert f"  {name}: " in out.stdout


def test_cli_exits_nonzero_and_names_the_failed_model(report_batch):
    assert report_batch.rc == 1
    assert "no-such-model" in report_batch.stderr and "1 of 2 report(s) failed" in report_batch.stderr
    failed_lines = [ln for ln in report_batch.stderr.splitlines() if ln.startswith("  ")]
    assert len(failed_lines) == 1 and "no-such-model: " in failed_lines[0] and "model_report.ipynb" in failed_lines[0]
    assert f"index: {report_batch.index}" in report_batch.stdout
    ok = report_batch.runs["tiny-random-llama"]["dir"]
    assert f"ok       tiny-random-llama: {ok}" in report_batch.stdout


def test_cli_rejects_a_bad_params_file_before_running(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("methods: rtn\n")
    out = subprocess.run([sys.executable, "-m", "awqnb.cli", "report", "--models", "tiny-random-llama",
                          "--params", str(bad), "--output-dir", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "pass it as --methods" in out.stderr
    assert not (tmp_path / "r").exists()


# --- timeouts (issue 21, item 11) -----------------------------------------------------------

def _timeout_error(msg: str, seconds: int, source: str):
    from nbclient.exceptions import CellTimeoutError
    from nbformat.v4 import new_code_cell

    return CellTimeoutError.error_from_timeout_and_cell(msg, seconds, new_code_cell(source))


def test_a_cell_timeout_says_what_timed_out_in_which_cell():
    long_cell = "\n".join(f"x{i} = {i}" for i in range(14))  # nbclient previews it as a list of lines
    cases = [(("Timeout waiting for IOPub output", 4, "for m in methods:\n    run(m)"),
              r"^the cell starting `for m in methods:` finished, but its output did not arrive within 4 s \(the "
              r"kernel's IOPub messages: Timeout waiting for IOPub output\)"),
             (("Cell execution timed out", 30, long_cell),
              r"^the cell starting `x0 = 0` ran longer than its 30 s limit \(Cell execution timed out\); "
              r"raise --timeout")]
    for args, pattern in cases:
        e = _timeout_error(*args)
        assert str(e).strip().splitlines()[-1].startswith("-----")  # what the message used to be
        assert re.search(pattern, notebook_run._short_error(e)), notebook_run._short_error(e)
    assert notebook_run._short_error(RuntimeError("kernel died\n------")) == "kernel died"


def test_slow_output_on_a_loaded_machine_does_not_fail_the_run(tmp_path, monkeypatch):
    """The client receives a cell's output 5 s after the cell's reply (as on a machine with load
    10): nbclient's 4 s IOPub wait would fail the run; awqnb's waits. A wait that does run out
    names the IOPub timeout and the cell."""
    import asyncio

    import nbclient.client as ncc
    from nbformat.v4 import new_code_cell, new_notebook

    delay = 5
    assert ncc.NotebookClient.iopub_timeout.default_value < delay
    nb = new_notebook(cells=[new_code_cell("x: int = 1", metadata={"tags": ["parameters"]}),
                             new_code_cell("print('late output', x)  # SLOW")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "slow.ipynb"
    nbformat.write(nb, str(src))
    real = ncc.NotebookClient._async_poll_output_msg

    async def late(self, parent_msg_id, cell, cell_index):
        if "SLOW" in cell.source:
            await asyncio.sleep(delay)
        return await real(self, parent_msg_id, cell, cell_index)

    monkeypatch.setattr(ncc.NotebookClient, "_async_poll_output_msg", late)
    (tmp_path / "ok").mkdir()
    rec = notebook_run.execute_into(src, tmp_path / "ok", {"x": 2}, model="m", methods=[])
    assert rec["state"] == "ok", rec["error"]
    out = nbformat.read(str(tmp_path / "ok" / "slow.ipynb"), as_version=4)
    assert [o.get("text") for c in out.cells for o in c.get("outputs", [])] == ["late output 2\n"]  # none dropped
    monkeypatch.setattr(notebook_run, "IOPUB_TIMEOUT_S", 2)
    (tmp_path / "short").mkdir()
    rec = notebook_run.execute_into(src, tmp_path / "short", {"x": 2}, model="m", methods=[])
    assert rec["state"] == "failed"
    assert re.fullmatch(r"CellTimeoutError: the cell starting `print\('late output', x\)  # SLOW` finished, but its "
                        r"output did not arrive within 2 s \(the kernel's IOPub messages: .*", rec["error"]), rec["error"]


# --- the first screen, what FP is, the index's numbers (issue 26 items 3, 4, 6, 13) ----------

def test_baseline_description_says_what_fp_is(tmp_path):
    from awqnb.model.sources import baseline_description

    smol = baseline_description("smollm2-135m")
    assert "dequantized GGUF" in smol and "SmolLM2-135M-Instruct.Q4_1.gguf" in smol and "4 bits" in smol
    assert "not an original bf16 release" in smol
    gemma = baseline_description("gemma3-270m")
    assert "Q4_K_M" in gemma and "o_proj 4 bit" in gemma
    assert "random-initialised" in baseline_description("tiny-random-llama")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "torch_dtype": "bfloat16"}')
    assert baseline_description(str(tmp_path)) == "the checkpoint's own weights (bfloat16)"
    assert "dequantized GGUF" in baseline_description(str(tmp_path / "m.gguf"))


SEED_SUMMARY = [
    dict(label="fp", dataset="wikitext2", protocol="gptq-token", seqlen=2048, n_seeds=3, ppl_mean=21.611, ppl_sd=0.0,
         quantize_s=None),
    dict(label="rtn", dataset="wikitext2", protocol="gptq-token", seqlen=2048, n_seeds=3, ppl_mean=23.5, ppl_sd=0.0,
         quantize_s=0.42),
    dict(label="awq", dataset="wikitext2", protocol="gptq-token", seqlen=2048, n_seeds=3, ppl_mean=22.957,
         ppl_sd=0.143, quantize_s=31.0),
    dict(label="awq", dataset="ag_news", protocol="sample", seqlen=512, n_seeds=3, ppl_mean=40.0, ppl_sd=1.0,
         quantize_s=31.0),
]
VERDICTS = [dict(label="fp", baseline="rtn", dataset="wikitext2", delta_pct=-8.0, ci_low=-9.0, ci_high=-7.0,
                 verdict="better"),
            dict(label="awq", baseline="rtn", dataset="wikitext2", delta_pct=-2.31, ci_low=-3.10, ci_high=-1.52,
                 verdict="better")]


def test_headline_says_who_wins_by_how_much_beyond_noise_which_layer_and_cost():
    worst = [dict(method="rtn", layer=3, module="o_proj", rel_mse=0.5),
             dict(method="awq", layer=5, module="down_proj", rel_mse=0.0123)]
    text = report.headline(SEED_SUMMARY, VERDICTS, dataset="wikitext2", baseline="rtn", fp_description="the GGUF",
                           worst=worst)
    assert "Lowest perplexity on wikitext2 (gptq-token, seqlen 2048): `awq`" in text
    assert "22.957 ± 0.143 (mean ± sd over 3 calibration seeds)" in text
    assert "Against `rtn` (23.500 ± 0.000): `awq` 22.957 ± 0.143, -2.31 % [95% CI -3.10, -1.52]: **better**, beyond the noise" in text
    assert "`fp`" not in text.split("Against", 1)[1].split("\n")[0]  # FP is not a method against RTN
    assert "FP, the baseline (the GGUF): 21.611" in text
    assert "layer 5 `down_proj`** under `awq`" in text and "Sensitivity section" in text  # the winner's worst, and which measure
    assert "`rtn` 0.4 s, `awq` 31.0 s" in text
    sens = report.headline(SEED_SUMMARY, VERDICTS, dataset="wikitext2", sensitive_layer=4, sens_method="awq", worst=worst)
    assert "Layer that hurts most: 4" in sens and "down_proj" not in sens
    noise = [dict(VERDICTS[1], verdict="within noise")]
    assert "within the noise" in report.headline(SEED_SUMMARY, noise, dataset="wikitext2")
    assert "hurt" not in report.headline(SEED_SUMMARY, VERDICTS, dataset="wikitext2", layers=False)
    assert "No perplexity results" in report.headline([], None)


def test_sensitivity_skipped_once_with_how_to_turn_it_on():
    text = report.sensitivity_skipped("smollm2-135m", ["rtn", "awq"])
    assert "--param SENSITIVITY=true" in text and "--models smollm2-135m --methods rtn,awq" in text
    src = "\n".join(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells)
    assert src.count("report.sensitivity_skipped(") == 1 and "SENSITIVITY = False: skipped" not in src


def test_report_first_screen_and_fp_baseline(batch):
    _, _, runs = batch
    run = runs["tiny-random-llama"]
    doc = json.loads((run["dir"] / "metrics.json").read_text())
    assert doc["baseline"] == "a random-initialised tiny model (float32)"
    assert doc["headline"].startswith("**Lowest perplexity on wikitext2 (gptq-token, seqlen 64): `")
    html = run["html"].read_text(encoding="utf-8")
    assert "Loading weights" not in html
    first = html.index("Lowest perplexity on wikitext2")
    assert first < html.index("Parameters in effect") < html.index("Provenance")  # the first screen
    assert first < html.index("Plotly.newPlot")  # the one figure, under the words
    assert "mean ± sd over 3 calibration seeds" in html and "Layer that hurts most" in html
    nb = nbformat.read(run["ipynb"], as_version=4)
    top = next(c for c in nb.cells if c.get("id") == "summary-top")
    words, figure = [o["data"] for o in top.outputs if o.output_type == "display_data"][-2:]  # after plotly.js
    assert words["text/markdown"] == doc["headline"]  # the placeholder was replaced by the final words
    assert "Plotly.newPlot" in figure["text/html"]
    assert html.count("a random-initialised tiny model (float32)") >= 2  # the FP section and the provenance table
    assert "injected-parameters" in html and "SENS_WINDOWS" in html


def test_index_shows_units_mean_sd_and_verdict(batch):
    out, index, runs = batch
    html_text = index.read_text(encoding="utf-8")
    doc = json.loads((runs["tiny-random-llama"]["dir"] / "metrics.json").read_text())
    summ = {(r["label"], r["dataset"]): r for r in doc["seed_summary"]}
    awq = summ[("awq", "wikitext2")]
    assert f'{awq["ppl_mean"]:.3f} ± {awq["ppl_sd"]:.3f}<br><small>over 3 seeds' in html_text
    assert "2 windows" in html_text and "8 texts" in html_text
    v = next(v for v in doc["verdicts"] if (v["label"], v["dataset"]) == ("awq", "wikitext2"))
    assert f'{v["delta_pct"]:+.2f} % [95% CI {v["ci_low"]:+.2f}, {v["ci_high"]:+.2f}]: ' in html_text
    assert report.delta_words(v).replace("**", "") in html_text  # the report's own words for its verdict
    assert "vs rtn" in html_text and "(baseline)" in html_text
    assert "a random-initialised tiny model (float32)" in html_text
