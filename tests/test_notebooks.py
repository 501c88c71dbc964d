"""layer_deep_dive, alpha_explorer and compare_methods executed with papermill (through
`notebook_run.run_report`) on the tiny random models with tiny parameters; assertions on the metrics they
record. The runs share one module fixture and execute two at a time (two worker processes)."""
import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nbformat
import pytest

from awqnb.workbench import notebook_run, report

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ("layer_deep_dive", "alpha_explorer", "compare_methods")
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
        "in Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel "
        "Tower surpassed the Washington Monument to become the tallest man-made structure in the world. ") * 12
TINY_CALIB = dict(n_calib=4, calib_seqlen=32, n_grid=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name → (run dir, run.json, metrics.json or None) for every notebook run of this module."""
    out = tmp_path_factory.mktemp("nb-reports")
    calib_file = out / "calib.txt"  # a small local calibration text: no WikiText-2 tokenization per run
    calib_file.write_text(TEXT)
    cal = dict(TINY_CALIB, calib_dataset=str(calib_file))
    jobs = {
        "deep_dive": ("tiny-random-llama", ["rtn", "awq", "awq_sh"], dict(cal, LAYER=1, top_k=3), "layer_deep_dive"),
        "deep_dive_out_of_range": ("tiny-random-gemma3", ["rtn"], dict(cal, LAYER=5), "layer_deep_dive"),
        "deep_dive_most_sensitive": ("tiny-random-gemma3", ["rtn", "awq"],
                                     dict(cal, LAYER="most_sensitive", SENS_WINDOWS=2, SENS_SEQLEN=64,
                                          eval_dataset=str(calib_file), top_k=3), "layer_deep_dive"),
        "deep_dive_bad_layer": ("tiny-random-llama", ["rtn"], dict(cal, LAYER="least_sensitive"), "layer_deep_dive"),
        "explorer": ("tiny-random-gemma3", [], dict(cal, max_tokens=64), "alpha_explorer"),
        "compare": ("tiny-random-llama", ["rtn", "awq", "awq_sh", "awq_dh", "awq_gqa", "praq"],
                    dict(TINY_CALIB, eval_windows=2, eval_seqlen=64, n_samples=8, sample_max_length=48,
                         diag_samples=2, SEEDS=2), "compare_methods"),
    }

    order = ["compare", "deep_dive", "deep_dive_most_sensitive", "explorer", "deep_dive_out_of_range",
             "deep_dive_bad_layer"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the workers and their kernels inherit it
        mp.setenv("AWQNB_DIAG_CACHE", str(out / "diag-cache"))  # not the user's cache
        # processes, not threads: papermill changes the working directory of its process
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {name: ex.submit(notebook_run.run_report, jobs[name][0], jobs[name][1], jobs[name][2],
                                       output_dir=out / name, notebook=jobs[name][3]) for name in order}
            dirs = {name: f.result() for name, f in futures.items()}
    result = {}
    for name, d in dirs.items():
        rec = json.loads((d / report.RUN_FILE).read_text())
        result[name] = (d, rec, report.read_metrics(d) if (d / report.METRICS_FILE).is_file() else None)
    return result


def _ok(runs, name):
    d, rec, m = runs[name]
    assert rec["state"] == "ok", rec["error"]
    assert m is not None
    return d, rec, m


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert "output_dir" in notebook_run.notebook_parameters(NOTEBOOK_DIR / f"{name}.ipynb")


def test_alpha_explorer_leaves_the_model_where_it_was_loaded():
    """The explorer evaluates nothing: no whole-model move to the device (a 70B model need not fit),
    the salience walk takes one block at a time and only the inspected block is copied (widgets.py)."""
    nb = nbformat.read(NOTEBOOK_DIR / "alpha_explorer.ipynb", as_version=4)
    src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "fp_model.to(" not in src and "eval_placement" not in src
    assert "AlphaExplorer(fp_model" in src and "device=dev" in src


def test_layer_deep_dive_records_one_layer(runs):
    d, rec, m = _ok(runs, "deep_dive")
    assert rec["parameters"]["LAYER"] == 1 and rec["parameters"]["methods"] == ["rtn", "awq", "awq_sh"]
    assert m["notebook"] == "layer_deep_dive" and m["layer"] == 1 and m["results"] == []
    dg = m["diagnostics"]
    mse = dg["mse"]
    assert {r["method"] for r in mse} == {"rtn", "awq", "awq_sh"} and {r["layer"] for r in mse} == {1}
    assert len(mse) == 3 * 7 and all(r["mse"] > 0 and r["rel_mse"] < 1 for r in mse)
    mean = {k: sum(r["rel_mse"] for r in mse if r["method"] == k) / 7 for k in ("rtn", "awq")}
    assert mean["awq"] < mean["rtn"]  # scaling lowers the output error of the layer
    assert {(r["group"], r["metric"]) for r in dg["salience"]} == {(g, k) for g in ("qkv", "vo", "gate_up", "down")
                                                                   for k in ("l1", "l2", "praq")}
    assert all(len(r["top_channels"]) == 3 for r in dg["salience"])
    assert dg["risk"][0]["layer"] == 1 and dg["risk"][0]["n_channels"] == 224
    assert {(r["method"], r["group"]) for r in dg["alpha"]} == {(k, g) for k in ("awq", "awq_sh")
                                                                for g in ("qkv", "vo", "gate_up", "down")}
    flips = [r for r in dg["rounding"] if r["method"] == "awq_sh"]
    assert len(flips) == 7 and all(r["e_after_mean"] <= r["e_before_mean"] for r in flips)
    assert all(-1 <= r["spearman"] <= 1 for r in dg["agreement"] if r["spearman"] is not None)
    assert (d / "layer_deep_dive.html").is_file()


def test_layer_deep_dive_out_of_range_fails_with_the_valid_range(runs):
    d, rec, m = runs["deep_dive_out_of_range"]
    assert rec["state"] == "failed" and m is None
    assert "AwqnbError" in rec["error"]
    assert "layer 5 is out of range: tiny-random-gemma3 has 2 decoder layers (0–1)" in rec["error"]
    nb = nbformat.read(d / "layer_deep_dive.ipynb", as_version=4)
    err = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert len(err) == 1 and err[0].ename == "AwqnbError"


def test_layer_deep_dive_opens_on_the_most_sensitive_layer(runs):
    d, rec, m = _ok(runs, "deep_dive_most_sensitive")
    assert rec["parameters"]["LAYER"] == "most_sensitive"
    choice = m["layer_choice"]
    assert choice["asked"] == "most_sensitive" and choice["layer"] == m["layer"]
    s = choice["sensitivity"]
    assert s["method"] == "awq" and (s["windows"], s["seqlen"]) == (2, 64) and s["eval_dataset"].endswith("calib.txt")
    frame = s["frame"]
    assert sorted((r["layer"], r["family"]) for r in frame) == sorted(
        (layer, f) for layer in (0, 1) for f in ("qkv", "vo", "gate_up", "down"))
    assert {r["mode"] for r in frame} == {"only"} and all(r["kl"] >= 0 for r in frame)
    total = {layer: sum(r["kl"] for r in frame if r["layer"] == layer) for layer in (0, 1)}
    assert total[0] != total[1] and m["layer"] == max(total, key=total.get)
    assert {r["layer"] for r in m["diagnostics"]["mse"]} == {m["layer"]}  # the dive is on that layer
    html = (d / "layer_deep_dive.html").read_text(encoding="utf-8")
    assert html.count("Sensitivity: KL to FP (nats") == 1


def test_layer_deep_dive_rejects_an_unknown_layer_word(runs):
    d, rec, m = runs["deep_dive_bad_layer"]
    assert rec["state"] == "failed" and m is None
    assert rec["error"] == ("AwqnbError: LAYER='least_sensitive' must be a decoder layer index "
                            '(negative counts from the end) or "most_sensitive".')
    nb = nbformat.read(d / "layer_deep_dive.ipynb", as_version=4)
    err = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert len(err) == 1 and err[0].ename == "AwqnbError"
    assert not [c for c in nb.cells if "fp_model, tokenizer = loading.load_model" in c.source and c.outputs]


def test_alpha_explorer_records_latency_and_alphas(runs):
    d, rec, m = _ok(runs, "explorer")
    assert "methods" not in rec["parameters"]  # the notebook takes none: none injected
    ex = m["explorer"]
    assert m["layer"] == 0  # LAYER = -2 of a 2-layer model
    lat = {r["group"]: r for r in ex["latency"]}
    assert set(lat) == {"qkv", "vo", "gate_up", "down"}
    assert all(0 < r["slider_max_s"] < 1.0 for r in lat.values())
    assert lat["gate_up"]["sample_tokens"] == 64 and lat["qkv"]["sample_tokens"] == 64  # 2 sequences × 32
    assert len(ex["best_alpha"]) == 12 and all(0 <= r["best_alpha"] <= 1 for r in ex["best_alpha"])
    assert all(r["loss_gain"] >= 0 for r in ex["best_alpha"])  # α* is never worse than RTN (α = 0 is on the grid)
    assert ex["current"]["alpha"] == 0.5
    html = (d / "alpha_explorer.html").read_text(encoding="utf-8")
    assert html.count("Plotly.newPlot") >= 4  # the static snapshots, one per scale group


def test_compare_methods_records_datasets_verdicts_and_claims(runs):
    _, rec, m = _ok(runs, "compare")
    labels = {"fp", "rtn", "awq", "awq_sh", "awq_dh", "awq_gqa", "praq", "awq_l1", "awq_sym"}
    rows = m["results"]
    assert {(r["label"], r["dataset"]) for r in rows} == {(k, ds) for k in labels for ds in ("wikitext2", "ag_news")}
    for r in rows:
        assert r["protocol"] == ("gptq-token" if r["dataset"] == "wikitext2" else "sample")
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        if r["label"] != "fp":
            assert r["ci_low"] <= r["delta_pct"] <= r["ci_high"] and r["verdict"]
    sym = next(r for r in rows if r["label"] == "awq_sym")
    assert sym["method"] == "awq" and m["configs"]["awq_sym"]["quant"]["symmetric"] is True
    assert {w["dataset"] for w in m["best_per_dataset"]} == {"wikitext2", "ag_news"}
    claims = {(c["claim"], c["dataset"]): c for c in m["claims"]}
    for claim, a, b in (("heuristic rounding beats plain AWQ", "awq_sh", "awq"), ("L2 salience beats L1", "awq", "awq_l1"),
                        ("praq beats AWQ", "praq", "awq"), ("asymmetric beats symmetric", "awq", "awq_sym"),
                        ("dynamic heuristic beats plain AWQ", "awq_dh", "awq")):
        for ds in ("wikitext2", "ag_news"):
            c = claims[(claim, ds)]
            assert (c["a"], c["b"]) == (a, b) and c["verdict"] == "cannot separate seeds"  # 2 seeds
            assert c["n_seeds"] == 2 and c["ci_low"] <= c["value"] <= c["ci_high"]
    kneedle = claims[("Kneedle outlier fraction", "(evidence)")]
    assert kneedle["verdict"] == "measured" and 0 < kneedle["value"] < 50
    reflip = claims[("ReFlip attention-score error", "(evidence)")]
    assert reflip["value"] is not None and reflip["value"] > 0  # ReFlip lowers the attention-score error
    assert {r["method"] for r in m["mse"]} == labels - {"fp"}
    # mean ± spread over the two calibration seeds, and the noise-aware verdicts against rtn
    assert m["seeds"] == [42, 43] and m["parameters"]["SEEDS"] == 2
    summ = {(r["label"], r["dataset"]): r for r in m["seed_summary"]}
    assert set(summ) == {(k, ds) for k in labels for ds in ("wikitext2", "ag_news")}
    for (label, ds), r in summ.items():
        assert r["n_seeds"] == 2 and r["ppl_min"] <= r["ppl_mean"] <= r["ppl_max"]
        assert r["per_seed"].startswith("42: ") and " / 43: " in r["per_seed"]
        if label in ("fp", "rtn"):
            assert r["ppl_sd"] == 0  # no calibration: one run stands for both seeds
        else:
            assert r["ppl_sd"] > 0 and r["ppl_max"] > r["ppl_min"]  # another draw, another model
    verdicts = {(v["label"], v["dataset"]): v for v in m["verdicts"]}
    assert set(verdicts) == {(k, ds) for k in labels - {"rtn"} for ds in ("wikitext2", "ag_news")}
    for (label, ds), v in verdicts.items():
        assert v["baseline"] == "rtn"
        # 2 seeds: no verdict for a calibrated method; fp vs rtn (no calibration) is judged on the windows
        assert v["verdict"] in (("better", "worse", "within noise") if label == "fp" else ("cannot separate seeds",))
        assert v["ci_low"] <= v["delta_pct"] <= v["ci_high"]
        assert v["n_seeds"] == (1 if label == "fp" else 2) and ("seeds" in v["noise"] or label == "fp")
    assert m["skipped"] == {}


@pytest.mark.parametrize("name", sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")))
def test_a_notebook_opened_by_hand_writes_under_reports_not_notebooks(name):
    """Jupyter runs a notebook in notebooks/: its default output_dir must lead out of it, into the
    gitignored reports/ (papermill runs get their run directory injected)."""
    import ast

    from awqnb.workbench import notebook_run

    default = ast.literal_eval(notebook_run.notebook_parameters(NOTEBOOK_DIR / f"{name}.ipynb")["output_dir"])
    where = (NOTEBOOK_DIR / default).resolve()
    assert where.is_relative_to(NOTEBOOK_DIR.parent.resolve() / "reports"), where
