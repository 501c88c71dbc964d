"""A report states the model's size (parameters, bytes in its dtype) and where it ran (device,
dtype), and says so when the weights are random (bench/make_shaped_model.py's marker)."""
import json

import torch

from awqnb.workbench import report


def test_size_and_place_of_a_model(tiny, tmp_path):
    model = tiny["tiny-random-llama"][0]
    setup = report.run_setup(model, "cpu")
    n = sum(p.numel() for p in model.parameters())
    assert setup["parameters"] == n == model.num_parameters()
    assert setup["bytes"] == 4 * n and setup["dtype"] == "float32" and setup["layers"] == 2
    assert setup["device_name"].startswith("CPU (") and setup["compute_dtype"] == "float32"
    assert setup["random_weights"] is False
    words = report.run_setup_words(setup)
    assert f"({n:,})" in words and f"{4 * n / 1e9:.2f} GB in float32" in words and "2 layers" in words
    assert "**Ran on** CPU (" in words and "computing in float32" in words and "random" not in words
    # mixed dtypes are listed, the compute dtype as given
    mixed = dict(setup, dtypes={"bfloat16": n - 10, "float32": 10}, compute_dtype="bfloat16")
    assert "in bfloat16 " in report.run_setup_words(mixed) and "float32 " in report.run_setup_words(mixed)


def test_random_weights_are_stated(tiny, tmp_path):
    model = tiny["tiny-random-llama"][0]
    (tmp_path / "random_weights.json").write_text(json.dumps({"random_weights": True}))
    old = model.config._name_or_path
    try:
        model.config._name_or_path = str(tmp_path)
        setup = report.run_setup(model, torch.device("cpu"))
    finally:
        model.config._name_or_path = old
    assert setup["random_weights"] is True
    assert "The weights are random" in report.run_setup_words(setup)


def test_headline_carries_the_setup(tiny):
    rows = [{"label": "rtn", "dataset": "wikitext2", "protocol": "gptq-token", "seqlen": 64, "ppl_mean": 30.0,
             "ppl_sd": 0.0, "n_seeds": 1, "quantize_s": 1.0}]
    setup = report.run_setup(tiny["tiny-random-llama"][0], "cpu")
    text = report.headline(rows, None, dataset="wikitext2", setup=setup, layers=False)
    assert text.endswith(report.run_setup_words(setup))
    assert "Ran on" not in report.headline(rows, None, dataset="wikitext2", layers=False)


def test_the_report_states_size_and_place(report_batch):
    run = report_batch.runs["tiny-random-llama"]
    doc = json.loads((run["dir"] / "metrics.json").read_text())
    setup = doc["run_setup"]
    assert setup["parameters"] > 0 and setup["bytes"] == 4 * setup["parameters"] and setup["dtype"] == "float32"
    assert setup["device"] == "cpu" and setup["device_name"].startswith("CPU (")
    assert "**Ran on** CPU (" in doc["headline"]  # the first screen
    html = run["html"].read_text(encoding="utf-8")
    assert html.count(f"{setup['parameters']:,}") >= 2  # the first screen and the FP section
