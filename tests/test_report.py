"""The report notebook executed under papermill on a tiny model: metrics.json, offline HTML,
the index, and a failing model that does not stop the batch."""
import json
import math
from pathlib import Path

import nbformat
import pytest

from awqnb import report
from awqnb.errors import AwqnbError

TINY = dict(n_calib=4, calib_seqlen=32, eval_windows=2, eval_seqlen=64, n_grid=4)
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "model_report.ipynb"


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One batch: a model that fails first, then tiny-random-llama."""
    out = tmp_path_factory.mktemp("reports")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: tiny tensors, no thread contention
        index = report.run_batch(["no-such-model", "tiny-random-llama"], "rtn,awq", params=TINY, output_dir=out)
    runs = {r["model"]: r for r in report.find_runs(out)}
    return out, index, runs


def test_committed_notebook_has_no_outputs_and_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    names = set(report.notebook_parameters(NOTEBOOK))
    assert {"model", "methods", "bits", "group_size", "n_calib", "calib_seqlen", "calib_dataset", "eval_dataset",
            "eval_seqlen", "eval_windows", "device", "seed", "output_dir"} <= names


def test_metrics_json_has_every_number_with_its_context(batch):
    out, _, runs = batch
    run = runs["tiny-random-llama"]
    assert run["state"] == "ok", run["error"]
    assert run["dir"].parent == out / "tiny-random-llama"
    doc = json.loads((run["dir"] / "metrics.json").read_text())
    rows = {r["label"]: r for r in doc["results"]}
    assert set(rows) == {"fp", "rtn", "awq"}
    for label, r in rows.items():
        for k in report.HEADLINE:
            assert k in r, (label, k)
        assert r["model"] == "tiny-random-llama" and r["method"] == label
        assert r["dataset"] == "wikitext2" and r["protocol"] == "gptq-token" and r["seqlen"] == 64
        assert r["n_units"] == 2
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    assert rows["fp"]["bits"] is None and rows["fp"]["winner"] == "(baseline)"
    for label in ("rtn", "awq"):
        assert rows[label]["bits"] == 4 and rows[label]["group_size"] == 128
        assert rows[label]["ci_low"] <= rows[label]["delta_pct"] <= rows[label]["ci_high"]
    assert rows["rtn"]["calibration"] is None  # RTN uses no calibration data
    assert rows["awq"]["calibration"]["dataset"] == "wikitext2"
    assert rows["awq"]["calibration"]["n_calib"] == 4 and rows["awq"]["calibration"]["seqlen"] == 32
    assert doc["parameters"]["n_calib"] == 4 and doc["seed"] == 42 and doc["versions"]["torch"]
    assert set(doc["alphas"]) == {"awq"}


def test_html_embeds_plotly_offline(batch):
    _, _, runs = batch
    run = runs["tiny-random-llama"]
    html = run["html"].read_text(encoding="utf-8")
    assert "plotly.js v" in html and "window.Plotly = Plotly" in html  # the library itself, inline
    assert 'src="https://cdn.plot.ly' not in html and "import \"https://cdn.plot.ly" not in html
    first_plot = html.index("Plotly.newPlot")
    assert html.index("window.Plotly = Plotly") < first_plot
    assert html.count("Plotly.newPlot") >= 3  # perplexity bars, α curves, α map
    nb = nbformat.read(run["ipynb"], as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


def test_failed_notebook_is_kept_and_does_not_stop_the_batch(batch):
    _, _, runs = batch
    bad = runs["no-such-model"]
    assert bad["state"] == "failed" and "unknown model" in bad["error"]
    nb = nbformat.read(bad["ipynb"], as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors and errors[0].ename == "AwqnbError"
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
        report.run_report("tiny-random-llama", ["rtn"], output_dir=tmp_path, notebook="no_such_notebook")
    with pytest.raises(AwqnbError, match="unknown notebook parameter"):
        report.run_report("tiny-random-llama", ["rtn"], params={"n_calibb": 4}, output_dir=tmp_path)
    with pytest.raises(AwqnbError, match="no methods"):
        report.run_report("tiny-random-llama", "", output_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_kernel_is_this_environment():
    assert report.kernel_name() == "python3"


def test_index_of_an_empty_dir(tmp_path):
    index = report.write_index(tmp_path / "reports")
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
        report.kernel_name()
    # a bare 'python' is run by jupyter_client with this interpreter: fine
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_dir(tmp_path / "bare", "python")))
    assert report.kernel_name() == "python3"
