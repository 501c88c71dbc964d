"""bench/make_shaped_model.py: a random model of a bench shape, written as a user's HF directory,
loads through awqnb's own loader and runs a forward."""
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def shaped():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shaped_model", BENCH / "make_shaped_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_shape_writes_shards_and_loads_like_a_checkpoint(shaped, tmp_path):
    from awqnb.core.errors import AwqnbError
    from awqnb.model.loading import load_model

    dest = tmp_path / "tiny-2L"
    # shards of 20 MB: the 25 MB embedding and head each get their own, the layers share one
    shaped.main(["--shape", "tiny", "--layers", "2", "--out", str(dest), "--shard-gb", "0.02"])
    shards = sorted(p.name for p in dest.glob("*.safetensors"))
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary was moved, not left
    facts = json.loads((dest / "random_weights.json").read_text())
    assert facts["random_weights"] is True and facts["num_hidden_layers"] == 2
    assert "random" in (dest / "README.md").read_text().lower()
    assert (dest / "generation_config.json").is_file()

    model, tok = load_model(str(dest))
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok)
    assert model.num_parameters() == facts["n_params"]
    assert index["metadata"]["total_size"] == facts["n_bytes"] == 2 * facts["n_params"]
    q0 = model.model.layers[0].self_attn.q_proj.weight.float()
    assert not torch.equal(q0, model.model.layers[1].self_attn.q_proj.weight.float())  # layers drawn apart
    assert abs(q0.std().item() - 0.02) < 2e-3
    assert torch.all(model.model.norm.weight == 1)
    ids = tok("A random model of a real shape.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()

    # an existing directory is refused without --overwrite
    with pytest.raises(AwqnbError, match="already exists"):
        shaped.write_shaped_model("tiny", dest, layers=2)


def test_tokenizer_is_padded_to_the_shape_vocab(shaped):
    tok = shaped.padded_tokenizer(49152 + 7)
    assert len(tok) == 49152 + 7
    assert tok.convert_ids_to_tokens(49152 + 6) == "<|reserved_special_token_6|>"
    ids = tok("plain text never hits a reserved id").input_ids
    assert max(ids) < 49152
    cfg = shaped.shape_config("llama3-70b:3")
    assert cfg.num_hidden_layers == 3 and cfg.hidden_size == 8192 and cfg.vocab_size == 128256
    assert shaped.shape_config("llama3-8b", layers=4).num_hidden_layers == 4


def test_unknown_shape_is_one_clear_error(shaped, tmp_path):
    from awqnb.core.errors import AwqnbError

    with pytest.raises(AwqnbError, match="unknown shape 'llama9'"):
        shaped.write_shaped_model("llama9", tmp_path / "x")
    assert shaped.main(["--shape", "llama9", "--out", str(tmp_path / "x")]) == 2


def test_tokenizer_from_a_saved_directory(shaped, tmp_path):
    """--tokenizer DIR: a machine without the SmolLM2 GGUF (the GPU machine) writes the same model
    from a tokenizer saved elsewhere; a directory without one is one clear line."""
    from awqnb.core.errors import AwqnbError

    shaped.base_tokenizer().save_pretrained(tmp_path / "tok")
    tok = shaped.padded_tokenizer(49152 + 3, tmp_path / "tok")
    assert len(tok) == 49152 + 3
    text = "The same ids from the saved tokenizer."
    assert tok(text).input_ids == shaped.padded_tokenizer(49152 + 3)(text).input_ids
    assert shaped.main(["--shape", "tiny", "--layers", "1", "--out", str(tmp_path / "m"),
                        "--tokenizer", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    with pytest.raises(AwqnbError, match="no tokenizer_config.json"):
        shaped.base_tokenizer(tmp_path)
    assert shaped.main(["--shape", "tiny", "--out", str(tmp_path / "n"), "--tokenizer", str(tmp_path)]) == 2
    assert not (tmp_path / "n").exists()


def test_workbench_walk_step_on_a_shaped_directory(shaped, tmp_path):
    """bench/workbench.py --steps walk (the 70B depth check), on CPU: streamed evaluation and the
    sensitivity pass of the directory as loaded, each with its time; every (layer, family, mode)."""
    import importlib.util

    dest = tmp_path / "tiny-3L"
    shaped.main(["--shape", "tiny", "--layers", "3", "--out", str(dest)])
    spec = importlib.util.spec_from_file_location("workbench", BENCH / "workbench.py")
    wb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wb)
    out = tmp_path / "res"
    assert wb.main(["--model-dir", str(dest), "--device", "cpu", "--smoke", "--steps", "walk", "--out", str(out),
                    "--work-dir", str(tmp_path / "work")]) == 0
    rec = json.loads((out / "walk.json").read_text())
    assert rec["model_on"] == ["cpu"] and rec["num_hidden_layers"] == 3
    assert rec["eval"]["placement"] == "stream"  # forced, though the model would fit
    assert rec["eval"]["windows"] == 1 and rec["eval"]["ppl"] > 1 and rec["eval"]["seconds"] > 0
    assert rec["sensitivity"]["rows"] == 3 * 4 * 2 and rec["sensitivity"]["seconds"] > 0
    assert "walk | sensitivity pass rtn (3 layers, 24 rows)" in (out / "summary.md").read_text()
