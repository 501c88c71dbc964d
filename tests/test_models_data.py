"""Models (aliases, tiny random models, atomic save) and data (calibration, evaluation, resolution)."""
import json

import pytest
import torch

from awqnb.model import data, saving, sources
from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig
from awqnb.model.data import load_calibration, load_eval_texts, load_eval_tokens
from awqnb.core.errors import AwqnbError
from awqnb.model.loading import load_model


from awqnb.model.saving import save_quantized
@pytest.fixture(scope="module")
def tiny_llama():
    return load_model("tiny-random-llama")


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_tiny_models_have_gqa_and_odd_hidden_and_are_deterministic(name):
    m1, tok = load_model(name)
    m2, _ = load_model(name)
    cfg = m1.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.hidden_size % 128 != 0 and cfg.intermediate_size % 128 != 0
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    # norms are perturbed with loud channels, so activations have outliers for AWQ to find
    norm = m1.model.layers[0].input_layernorm.weight + (1.0 if "gemma" in name else 0.0)
    assert norm.max() / norm.median() > 4
    assert len(tok) == cfg.vocab_size


def test_unknown_model_and_bad_paths_are_clear(tmp_path):
    with pytest.raises(AwqnbError, match="unknown model 'nope'.*smollm2-135m"):
        load_model("nope")
    with pytest.raises(AwqnbError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AwqnbError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(AwqnbError, match="architecture 'gpt2' is not supported"):
        sources.check_supported(m)
    with pytest.raises(AwqnbError, match="not supported"):
        pipeline.quantize(m, MethodConfig("rtn"), None, progress=False)


def test_nan_weights_are_refused_before_any_change(tiny_llama):
    import copy

    m = copy.deepcopy(tiny_llama[0])
    m.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    before = m.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(AwqnbError, match="NaN"):
        pipeline.quantize(m, MethodConfig("rtn", QuantConfig(4, 32)), None, progress=False)
    assert torch.equal(m.model.layers[0].self_attn.q_proj.weight, before)


def test_save_is_atomic_and_round_trips(tiny_llama, tmp_path):
    import copy

    model, tok = tiny_llama
    m = copy.deepcopy(model)
    cfg = MethodConfig("rtn", QuantConfig(4, 32))
    res = pipeline.quantize(m, cfg, None, model_name="tiny-random-llama", progress=False)
    dest = tmp_path / saving.model_tag("tiny-random-llama", cfg)
    assert dest.name.startswith("tiny-random-llama_rtn_w4_g32_headfp16_")  # + a hash of the whole config
    other = MethodConfig("rtn", QuantConfig(4, 32), seed=7)
    assert saving.model_tag("tiny-random-llama", other) != dest.name  # a seed of its own, a directory of its own
    assert saving.model_tag("tiny-random-llama", cfg, {"n_calib": 4}) != saving.model_tag(
        "tiny-random-llama", cfg, {"n_calib": 8})
    save_quantized(m, tok, dest, res.metadata())
    meta = json.loads((dest / "quantization_metadata.json").read_text())
    assert meta["method"] == "rtn" and meta["config"]["quant"]["group_size"] == 32
    assert meta["versions"]["torch"] and meta["calibration"] is None and len(meta["layers"]) == 2
    m2, _ = load_model(str(dest))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    # an existing destination is kept unless overwrite is asked for
    with pytest.raises(AwqnbError, match="already exists"):
        save_quantized(m, tok, dest, {})
    assert json.loads((dest / "quantization_metadata.json").read_text())["method"] == "rtn"

    class Broken:
        def save_pretrained(self, d):
            (d / "half-written").write_text("x")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_quantized(Broken(), None, tmp_path / "new", {})
    assert not (tmp_path / "new").exists()
    with pytest.raises(RuntimeError):
        save_quantized(Broken(), None, dest, {}, overwrite=True)
    assert (dest / "model.safetensors").is_file()  # the old one survives a failed overwrite
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_calibration_blocks_are_deterministic_and_distinct(tiny_llama):
    tok = tiny_llama[1]
    a = load_calibration(tok, "wikitext2", n_calib=6, seqlen=64, seed=1)
    b = load_calibration(tok, "wikitext2", n_calib=6, seqlen=64, seed=1)
    c = load_calibration(tok, "wikitext2", n_calib=6, seqlen=64, seed=2)
    assert all(s.shape == (64,) and s.dtype == torch.long for s in a.samples)
    assert all(torch.equal(x, y) for x, y in zip(a.samples, b.samples))
    assert not all(torch.equal(x, y) for x, y in zip(a.samples, c.samples))
    assert len({tuple(s[:8].tolist()) for s in a.samples}) == 6  # non-overlapping blocks
    d = a.to_dict()
    assert d["dataset"] == "wikitext2" and d["n_tokens"] == 6 * 64 and d["seed"] == 1
    assert d["source"].endswith("validation.parquet")
    simple = load_calibration(tok, "wikitext2-simple", n_calib=5, seqlen=64)
    assert len(simple.samples) == 5 and all(8 <= s.numel() <= 64 for s in simple.samples)
    c4 = load_calibration(tok, "c4", n_calib=3, seqlen=128)
    assert [s.numel() for s in c4.samples] == [128] * 3


def test_calibration_bad_input(tiny_llama, tmp_path):
    tok = tiny_llama[1]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(AwqnbError, match="is empty"):
        load_calibration(tok, str(empty))
    short = tmp_path / "short.txt"
    short.write_text("just a few words here")
    with pytest.raises(AwqnbError, match="fewer than n_calib=4"):
        load_calibration(tok, str(short), n_calib=4, seqlen=64)
    with pytest.raises(AwqnbError, match="unknown"):
        load_calibration(tok, "pile")
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    mine = load_calibration(tok, str(text), n_calib=4, seqlen=32)
    assert len(mine.samples) == 4 and mine.source == str(text)
    with pytest.raises(AwqnbError, match="calibration set is empty"):
        pipeline.quantize(tiny_llama[0], MethodConfig("awq"), None, progress=False)


def test_absent_dataset_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("AWQNB_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data, "data_dirs", lambda d=None: [tmp_path])
    data._load_rows.cache_clear()
    try:
        with pytest.raises(AwqnbError, match=r"not found.*AWQNB_DATA_DIR.*shared/data.*Hub"):
            data._load_rows("c4-validation", None)
    finally:
        data._load_rows.cache_clear()


def test_explicit_data_dir_wins(tmp_path, tiny_llama):
    import pandas as pd

    (tmp_path / "ag_news").mkdir()
    pd.DataFrame({"text": ["alpha beta", "gamma delta"], "label": [0, 1]}).to_parquet(tmp_path / "ag_news/test.parquet")
    assert load_eval_texts("ag_news", 5, data_dir=tmp_path) == ["alpha beta", "gamma delta"]


def test_local_data_loads_without_the_datasets_package(tmp_path, monkeypatch):
    import sys

    import pandas as pd

    (tmp_path / "ag_news").mkdir()
    pd.DataFrame({"text": ["alpha beta", "gamma delta"], "label": [0, 1]}).to_parquet(tmp_path / "ag_news/test.parquet")
    want = data._texts("ag_news-test", tmp_path)
    data._load_rows.cache_clear()
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    try:
        assert data._texts("ag_news-test", tmp_path) == want == (str(tmp_path / "ag_news/test.parquet"),
                                                                 ["alpha beta", "gamma delta"])
    finally:
        data._load_rows.cache_clear()


def test_eval_sets(tiny_llama):
    tok = tiny_llama[1]
    ids = load_eval_tokens(tok, "wikitext2")
    assert ids.numel() == 304_986  # SmolLM2's tokenizer on the joined WikiText-2 test split
    texts = load_eval_texts("ag_news", 50, seed=3)
    assert len(texts) == 50 and texts == load_eval_texts("ag_news", 50, seed=3)
    assert len(set(texts)) == 50
    with pytest.raises(AwqnbError, match="unknown"):
        load_eval_tokens(tok, "ptb")


# --- the GGUF cache: keyed by content, in the model's dtype, the tests' own -----------------------


def test_gguf_hash_is_content_keyed_and_remembered(tmp_path, monkeypatch):
    import os

    from awqnb.model import gguf

    monkeypatch.setenv("AWQNB_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a.gguf", tmp_path / "sub" / "b.gguf"
    b.parent.mkdir()
    a.write_bytes(b"same bytes" * 1000)
    b.write_bytes(b"same bytes" * 1000)
    ha = gguf.file_sha256(a)
    assert ha == gguf.file_sha256(b)  # two paths, one content: one key
    side = json.loads((tmp_path / "cache" / gguf.HASHES_FILE).read_text())
    assert {v["sha256"] for v in side.values()} == {ha} and len(side) == 2
    calls = []
    monkeypatch.setattr(gguf.hashlib, "file_digest", lambda *a, **k: calls.append(1))
    assert gguf.file_sha256(a) == ha and not calls  # remembered: not hashed again
    monkeypatch.undo()
    monkeypatch.setenv("AWQNB_CACHE", str(tmp_path / "cache"))
    a.write_bytes(b"changed!!!" * 1000)  # same size
    os.utime(a, ns=(0, a.stat().st_mtime_ns + 10**9))
    assert gguf.file_sha256(a) not in (ha, None)  # a changed file: a new key


def test_gguf_cache_is_keyed_by_content_and_stored_in_bf16(tmp_path):
    import os
    import shutil

    from awqnb.model import gguf
    from awqnb.model.provenance import cache_dir

    src = gguf.alias_gguf("smollm2-135m")
    dest = gguf.gguf_cache("smollm2-135m")
    assert dest.parent == cache_dir() / "models" and dest.name == f"gguf-{gguf.file_sha256(src)[:16]}-bfloat16"
    assert json.loads((dest / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    other = tmp_path / "elsewhere.gguf"
    try:
        os.link(src, other)
    except OSError:
        shutil.copyfile(src, other)
    before = sorted(p.name for p in (cache_dir() / "models").iterdir())
    assert gguf.gguf_cache(str(other)) == dest  # the same bytes at another path: the same entry
    assert sorted(p.name for p in (cache_dir() / "models").iterdir()) == before
    assert gguf.storage_dtype(torch.float32) == torch.float32  # exact dequantised values for a float32 load


def test_tests_never_write_the_users_cache(tmp_path, monkeypatch):
    from awqnb.model.gguf import gguf_cache
    from awqnb.model.provenance import cache_dir

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert home not in cache_dir().parents and cache_dir().name == "awqnb"
    gguf_cache("smollm2-135m")
    load_model("tiny-random-llama")
    assert not (home / ".cache" / "awqnb").exists()


def test_old_path_keyed_entries_are_reported_not_deleted(tmp_path, monkeypatch, caplog):
    from awqnb.model import gguf

    monkeypatch.setenv("AWQNB_CACHE", str(tmp_path))
    monkeypatch.setattr(gguf, "_legacy_reported", False)
    old = tmp_path / "models" / "smollm2-135m-0b55820af4a0"
    old.mkdir(parents=True)
    (old / "awqnb_source.json").write_text("{}")
    with caplog.at_level("WARNING", logger="awqnb.model.gguf"):
        gguf._report_legacy(tmp_path / "models")
    assert "older awqnb" in caplog.text and "smollm2-135m-0b55820af4a0" in caplog.text
    assert old.is_dir()
