"""Every failure a user can reach is one clear line (AwqnbError; exit status 2 from the CLI) and
leaves nothing half-written; two writers never replace each other; outputs get the user's umask;
nothing awqnb reads executes code; the user's own evaluation text works under both protocols."""
import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from awqnb.core import files
from awqnb.model import loading, saving
from awqnb.workbench import notebook_run, sweep
from awqnb.workbench.grid import make_grid
from awqnb.core.errors import AwqnbError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """tiny-random-llama saved as a plain HF directory (config, safetensors, tokenizer)."""
    model, tok = loading.load_model("tiny-random-llama")
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _results_file(tmp: Path) -> dict:
    return {"dataset": "wikitext2", "protocol": "gptq-token", "seqlen": 64, "ppl": 10.0, "nll": [2.3, 2.2],
            "n_tokens": [63, 63], "meta": {"method": "rtn"}}


# --- the table of bad inputs ---------------------------------------------------------------
# Each case: (id, setup(tmp, tiny_dir) -> CLI argv, regex the one-line message must match,
# whether the model must never be loaded (the check happens before any work)).

def _corrupt_safetensors(tmp, tiny):
    d = _copy_model(tiny, tmp / "m")
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    return ["quantize", "--model", str(d), "--method", "rtn", "--group-size", "32", "--output-dir", str(tmp / "out")]


def _truncated_safetensors(tmp, tiny):
    d = _copy_model(tiny, tmp / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ["eval", "--model", str(d), "--seqlen", "32", "--max-windows", "1", "--device", "cpu"]


def _config_not_json(tmp, tiny):
    d = _copy_model(tiny, tmp / "m")
    (d / "config.json").write_text('{"model_type": "llama", ')
    return ["quantize", "--model", str(d), "--method", "rtn", "--output-dir", str(tmp / "out")]


def _config_not_object(tmp, tiny):
    d = _copy_model(tiny, tmp / "m")
    (d / "config.json").write_text("[1, 2]")
    return ["eval", "--model", str(d), "--device", "cpu"]


def _truncated_gguf(tmp, tiny):
    f = tmp / "model.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 10) + b"\x00" * 5)
    return ["quantize", "--model", str(f), "--method", "rtn", "--output-dir", str(tmp / "out")]


def _fused_arch(tmp, tiny):
    d = tmp / "phi3"
    d.mkdir()  # config only: were weights read, it would fail differently
    (d / "config.json").write_text(json.dumps({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}))
    return ["quantize", "--model", str(d), "--method", "rtn", "--output-dir", str(tmp / "out")]


def _unknown_arch(tmp, tiny):
    d = tmp / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return ["quantize", "--model", str(d), "--method", "awq", "--output-dir", str(tmp / "out")]


def _output_is_file(tmp, tiny):
    (tmp / "out").write_text("not a directory")
    return ["quantize", "--model", str(tiny), "--method", "rtn", "--output-dir", str(tmp / "out" / "sub")]


def _output_unwritable(tmp, tiny):
    # /proc refuses new files even for root (chmod would not stop a root test run)
    return ["quantize", "--model", str(tiny), "--method", "rtn", "--output-dir", "/proc/awqnb-out"]


def _eval(*extra):
    return lambda tmp, tiny: ["eval", "--model", str(tiny), "--device", "cpu", *extra]


def _eval_file(name, content, *extra):
    def setup(tmp, tiny):
        f = tmp / name
        f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
        return ["eval", "--model", str(tiny), "--device", "cpu", "--dataset", str(f), *extra]
    return setup


def _parquet_without_text(tmp, tiny):
    f = tmp / "t.parquet"
    pd.DataFrame({"body": ["a b c", "d e f"]}).to_parquet(f)
    return ["eval", "--model", str(tiny), "--device", "cpu", "--dataset", str(f)]


def _json_under_file(tmp, tiny):
    (tmp / "f").write_text("x")
    f = tmp / "t.txt"
    f.write_text("some text " * 50)
    return ["eval", "--model", str(tiny), "--device", "cpu", "--dataset", str(f), "--seqlen", "16",
            "--json", str(tmp / "f" / "r.json")]


def _compare(content):
    def setup(tmp, tiny):
        good = tmp / "good.json"
        good.write_text(json.dumps(_results_file(tmp)))
        bad = tmp / "bad.json"
        if content is not None:
            bad.write_text(content)
        return ["compare", str(good), str(bad)]
    return setup


def _report(*extra):
    return lambda tmp, tiny: ["report", "--models", "tiny-random-llama", "--output-dir", str(tmp / "rep"), *extra]


CASES = [
    ("corrupt safetensors", _corrupt_safetensors, r"corrupt or truncated", False),
    ("truncated safetensors (eval)", _truncated_safetensors, r"corrupt or truncated", False),
    ("config.json not JSON", _config_not_json, r"config\.json is unreadable or not valid JSON", True),
    ("config.json not an object", _config_not_object, r"not a JSON object", False),
    ("truncated GGUF", _truncated_gguf, r"not a readable GGUF file", True),
    ("fused qkv/gate_up family", _fused_arch, r"'phi3' Phi3ForCausalLM is not supported \(it fuses.*llama.*gemma3", True),
    ("unknown architecture", _unknown_arch, r"'gpt2' is not supported; awqnb quantizes llama", True),
    ("output dir under a file", _output_is_file, r"is a file, not a directory", True),
    ("output dir unwritable", _output_unwritable, r"cannot write to /proc", True),
    ("seqlen 0", _eval("--seqlen", "0"), r"seqlen=0 must be a whole number of at least 2", True),
    ("seqlen negative", _eval("--seqlen", "-8"), r"seqlen=-8 must be", True),
    ("max windows 0", _eval("--max-windows", "0"), r"max_windows=0 must be", True),
    ("n samples negative", _eval("--dataset", "ag_news", "--n-samples", "-1"), r"n_samples=-1 must be", True),
    ("unknown eval set", _eval("--dataset", "imdb"), r"--dataset 'imdb' is unknown.*\.txt", True),
    ("no token protocol", _eval("--dataset", "ag_news", "--protocol", "token"), r"no token protocol", True),
    ("missing text file", _eval("--dataset", "nope.txt"), r"nope\.txt does not exist", True),
    ("empty text file", _eval_file("e.txt", "\n \n"), r"holds no text", True),
    ("text file not UTF-8", _eval_file("b.txt", b"\xff\xfe\x00bad"), r"not UTF-8", True),
    ("jsonl bad line", _eval_file("t.jsonl", '{"text": "ok"}\n{oops\n'), r"line 2 is not JSON", True),
    ("jsonl no text field", _eval_file("t.jsonl", '{"body": "x"}\n'), r"line 1 has no string 'text' field", True),
    ("parquet no text column", _parquet_without_text, r"no column 'text' \(columns: body\)", True),
    ("parquet corrupt", _eval_file("t.parquet", b"PAR1garbage"), r"not a readable parquet file", True),
    ("text file too short for a window", _eval_file("s.txt", "hi"), r"fewer than one window", False),
    ("--json under a file", _json_under_file, r"is a file, not a directory", True),
    ("compare: missing file", _compare(None), r"bad\.json does not exist", True),
    ("compare: not JSON", _compare("{nope"), r"bad\.json is not JSON", True),
    ("compare: other schema", _compare('{"results": []}'), r"is not an `awqnb eval --json` result", True),
    ("compare: empty units", _compare(json.dumps({**_results_file(None), "nll": [], "n_tokens": []})),
     r"not an `awqnb eval --json` result", True),
    ("report: output under a file", lambda tmp, tiny: (tmp / "f").write_text("x") and [
        "report", "--models", "tiny-random-llama", "--methods", "rtn", "--output-dir", str(tmp / "f" / "rep")],
     r"is a file, not a directory", True),
    ("report: unknown method", _report("--methods", "rtn,no_such_method"), r"unknown method .no_such_method.", True),
    ("report: int parameter as string", _report("--param", "n_calib='16'"), r"n_calib='16' \(str\) must be int", True),
    ("report: list parameter as string", _report("--param", "sample_datasets=ag_news"),
     r"sample_datasets='ag_news' \(str\) must be list\[str\]", True),
    ("report: zero windows", _report("--param", "eval_windows=0"), r"eval_windows=0 must be at least 1", True),
    ("report: negative calibration", _report("--param", "n_calib=-4"), r"n_calib=-4 must be at least 1", True),
    ("quantize: zero calibration samples", lambda tmp, tiny: ["quantize", "--model", str(tiny), "--method", "awq",
                                                              "--n-calib", "0", "--group-size", "32",
                                                              "--output-dir", str(tmp / "out")],
     r"n_calib=0 must be a whole number of at least 1", True),
    ("report: grid file of random bytes", lambda tmp, tiny: ((tmp / "g.yaml").write_bytes(bytes(range(128, 256)) * 3),
                       ["report", "--grid", str(tmp / "g.yaml"), "--output-dir", str(tmp / "rep")])[1], r"g\.yaml is not UTF-8 text", True),
    ("quantize: calibration length 1", lambda tmp, tiny: ["quantize", "--model", str(tiny), "--method", "awq",
                                                          "--calib-seqlen", "1", "--output-dir", str(tmp / "out")],
     r"calib_seqlen=1 must be", True),
]


@pytest.mark.parametrize("setup,pattern,before_load", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, tiny_dir, monkeypatch, capsys, setup, pattern,
                                                  before_load):
    from awqnb.cli import main

    monkeypatch.chdir(tmp_path)
    argv = setup(tmp_path, tiny_dir)
    if before_load:  # the check must come before any weights are read
        def no_load(*a, **k):
            raise AssertionError("the model was loaded before the input was checked")
        monkeypatch.setattr(loading, "load_model", no_load)
    _refused_in_one_line(tmp_path, capsys, argv, pattern)


def _refused_in_one_line(tmp_path, capsys, argv, pattern):
    """Exit status 2, stderr exactly one `awqnb: error:` line matching `pattern` (transformers' load
    report and bars go to the DEBUG log), and no new file under tmp_path."""
    from awqnb.cli import main

    before = {p for p in tmp_path.rglob("*")}
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("awqnb: error: "), err
    assert re.search(pattern, lines[0]), err
    new = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in new if p.is_file()], new  # nothing half-written (no temp files, no outputs)


# --- checkpoints that are incomplete, tampered or malformed ----------------------------------
# Each case: (id, setup(tmp, dirs) -> CLI argv, regex of the one line). dirs: plain (tiny_dir), and
# tiny-random-llama packed asymmetric (asym) and symmetric (sym), RTN W4 g32.

@pytest.fixture(scope="module")
def dirs(tiny_dir, tmp_path_factory):
    from types import SimpleNamespace

    from awqnb.export import packed as export
    from awqnb.quant import pipeline
    from awqnb.quant.method_config import MethodConfig
    from awqnb.core.config import QuantConfig

    out = {"plain": tiny_dir}
    for name, sym in (("asym", False), ("sym", True)):
        model, tok = loading.load_model("tiny-random-llama")
        cfg = MethodConfig("rtn", QuantConfig(4, 32, sym))
        res = pipeline.quantize(model, cfg, None, device="cpu", progress=False)
        out[name] = export.save_packed(model, tok, tmp_path_factory.mktemp(name) / "p", cfg, res.metadata(),
                                       result=res)
        out[name + "_fake"] = saving.save_quantized(model, tok, tmp_path_factory.mktemp(name) / "f", res.metadata())
    return SimpleNamespace(**out)


def _edit_tensors(src, edit):
    def setup(tmp, dirs):
        from safetensors.torch import load_file, save_file

        d = _copy_model(getattr(dirs, src), tmp / "m")
        sd = load_file(d / "model.safetensors")
        edit(sd)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        return ["eval", "--model", str(d), "--seqlen", "32", "--max-windows", "1", "--device", "cpu"]
    return setup


def _drop(name):
    return lambda sd: sd.pop(name)


def _edit_json(src, file, edit, cmd="eval"):
    def setup(tmp, dirs):
        d = _copy_model(getattr(dirs, src), tmp / "m")
        doc = json.loads((d / file).read_text())
        doc = edit(doc)
        (d / file).write_text(json.dumps(doc))
        if cmd == "quantize":
            return ["quantize", "--model", str(d), "--method", "rtn", "--group-size", "32",
                    "--output-dir", str(tmp / "out")]
        return ["eval", "--model", str(d), "--seqlen", "32", "--max-windows", "1", "--device", "cpu"]
    return setup


def _qc(edit):
    def f(c):
        edit(c["quantization_config"])
        return c
    return f


def _set(path, value):
    def f(doc):
        *head, last = path
        for k in head:
            doc = doc[k]
        doc[last] = value
    return f


_DOWN = "model.layers.1.mlp.down_proj"
CHECKPOINT_CASES = [
    ("fake: a weight missing", _edit_tensors("plain", _drop(f"{_DOWN}.weight")),
     rf"model\.safetensors is missing 1 tensor\(s\) the model needs \({_DOWN}\.weight\)"),
    ("fake: an extra tensor", _edit_tensors("plain", lambda sd: sd.update(extra=torch.zeros(2))),
     r"holds 1 tensor\(s\) the model does not have \(extra\)"),
    *[(f"packed: {part} missing", _edit_tensors("asym", _drop(f"{_DOWN}.{part}")),
       rf"model\.safetensors is missing 1 tensor\(s\) the model needs \({_DOWN}\.{part}\)")
      for part in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")],
    ("packed: config.json lost quantization_config",
     _edit_json("asym", "config.json", lambda c: {k: v for k, v in c.items() if k != "quantization_config"}),
     r"holds packed tensors .* but config\.json has no quantization_config"),
    ("packed: num_bits 4 -> 2 in config.json",
     _edit_json("asym", "config.json", _qc(_set(("config_groups", "group_0", "weights", "num_bits"), 2))),
     r"config\.json says bits=2, group_size=32, symmetric=False but quantization_metadata\.json says bits=4"),
    ("packed: group_size changed in config.json",
     _edit_json("sym", "config.json", _qc(_set(("config_groups", "group_0", "weights", "group_size"), 16))),
     r"the two records disagree"),
    ("quantization_config a string", _edit_json("asym", "config.json", lambda c: {**c, "quantization_config": "awq"}),
     r"config\.json is malformed: its quantization_config is a str"),
    ("config_groups a list", _edit_json("asym", "config.json", _qc(_set(("config_groups",), [1, 2]))),
     r"config_groups is not an object"),
    ("ignore: [1]", _edit_json("asym", "config.json", _qc(_set(("ignore",), [1]))),
     r"ignore is not a list of module names"),
    ("quantization_metadata.json a list", _edit_json("asym_fake", "quantization_metadata.json", lambda m: [m]),
     r"quantization_metadata\.json is malformed \(it is a JSON list"),
    ("quantization_metadata.json config a string",
     _edit_json("asym_fake", "quantization_metadata.json", lambda m: {**m, "config": "awq"}),
     r"quantization_metadata\.json is malformed \(its 'config' is not an object"),
    ("quantize from a checkpoint missing a weight",
     _edit_json("plain", "config.json", lambda c: c, cmd="quantize"), None),  # replaced below
    ("--text-column with a .txt", lambda tmp, dirs: (tmp / "t.txt").write_text("a b c " * 40) and [
        "eval", "--model", str(dirs.plain), "--device", "cpu", "--dataset", str(tmp / "t.txt"),
        "--text-column", "body"], r"--text-column applies to a \.jsonl or \.parquet file"),
]


def _quantize_missing(tmp, dirs):
    argv = _edit_tensors("plain", _drop(f"{_DOWN}.weight"))(tmp, dirs)
    return ["quantize", "--model", argv[2], "--method", "rtn", "--group-size", "32", "--output-dir", str(tmp / "out")]


CHECKPOINT_CASES = [c if c[2] is not None else (c[0], _quantize_missing, rf"is missing 1 tensor\(s\).*{_DOWN}\.weight")
                    for c in CHECKPOINT_CASES]


@pytest.mark.parametrize("setup,pattern", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_broken_checkpoint_is_refused_in_one_line(tmp_path, dirs, monkeypatch, capsys, setup, pattern):
    monkeypatch.chdir(tmp_path)
    _refused_in_one_line(tmp_path, capsys, setup(tmp_path, dirs), pattern)


def test_detect_quantization_refuses_what_the_loader_refuses(tmp_path, dirs):
    from awqnb.api import detect_quantization

    d = _edit_json("asym", "config.json", _qc(_set(("config_groups", "group_0", "weights", "num_bits"), 2)))(tmp_path, dirs)[2]
    with pytest.raises(AwqnbError, match="the two records disagree"):
        detect_quantization(d)
    for i, edit in enumerate((lambda m: [m], lambda m: {**m, "config": "x"}, lambda m: {**m, "export": 3})):
        d = _edit_json("asym", "quantization_metadata.json", edit)(tmp_path / str(i), dirs)[2] \
            if (tmp_path / str(i)).mkdir() is None else None
        with pytest.raises(AwqnbError, match="quantization_metadata.json is malformed"):
            detect_quantization(d)
    (tmp_path / "file").write_text("x")  # a file where the directory should be
    with pytest.raises(AwqnbError, match="is not a model directory"):
        detect_quantization(tmp_path / "file")
    assert detect_quantization(dirs.sym)["bits"] == 4 and detect_quantization(dirs.sym)["symmetric"] is True


@pytest.mark.parametrize("kind", ["asym", "sym"])
def test_packed_checkpoint_evaluates_like_its_fake_quant_twin(dirs, kind, capsys):
    """`awqnb eval` on a packed directory (symmetric ones crashed in compressed-tensors' forward)
    gives the perplexity of the same weights saved fake-quantized."""
    from awqnb.cli import main

    ppl = {}
    for d in (getattr(dirs, kind), getattr(dirs, kind + "_fake")):
        assert main(["eval", "--model", str(d), "--seqlen", "32", "--max-windows", "4", "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        assert "[rtn]" in out
        ppl[d] = float(out.strip().rsplit(" ", 1)[-1])
    a, b = ppl.values()
    assert math.isclose(a, b, rel_tol=1e-5), ppl


# --- library functions refuse the same things ----------------------------------------------

def test_library_functions_refuse_nonsense_settings(tiny_dir, tmp_path):
    from awqnb.model.data import load_eval_texts
    from awqnb.analysis.evaluate import PerplexityResult, sample_perplexity, token_perplexity

    model, tok = loading.load_model(str(tiny_dir))
    ids = torch.arange(100)
    for kw, msg in (({"seqlen": 0}, "seqlen=0"), ({"seqlen": 16, "max_windows": 0}, "max_windows=0"),
                    ({"seqlen": 16, "batch_size": 0}, "batch_size=0"), ({"seqlen": 2.5}, "seqlen=2.5")):
        with pytest.raises(AwqnbError, match=msg):
            token_perplexity(model, ids, progress=False, **kw)
    with pytest.raises(AwqnbError, match="max_length=1"):
        sample_perplexity(model, tok, ["a b c"], max_length=1, progress=False)
    with pytest.raises(AwqnbError, match="n_samples=0"):
        load_eval_texts("ag_news", n_samples=0)
    with pytest.raises(AwqnbError, match="does not exist"):
        PerplexityResult.read(tmp_path / "none.json")
    import awqnb

    (tmp_path / "prompts.txt").write_text("hello there\nhow are you\n")
    (tmp_path / "phi").mkdir()
    (tmp_path / "phi" / "config.json").write_text('{"model_type": "phi3"}')
    with pytest.raises(AwqnbError, match="'phi3' is not supported"):  # the seed API checks first too
        awqnb.quantize_with_awq(str(tmp_path / "phi"), str(tmp_path / "o"), str(tmp_path / "prompts.txt"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(AwqnbError, match="is a file, not a directory"):
        awqnb.quantize_with_awq(str(tiny_dir), str(tmp_path / "file" / "o"), str(tmp_path / "prompts.txt"))
    with pytest.raises(AwqnbError, match="not a JSON object"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "config.json").write_text('"x"')
        loading.load_model(str(tmp_path / "c"))


def test_disk_full_while_writing_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    real_write = os.write

    with saving.atomic_dir(tmp_path / "ok") as d:  # the probe and writes work normally
        (d / "a").write_text("x")
    assert (tmp_path / "ok" / "a").read_text() == "x"

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)  # the write probe now meets a full disk
    with pytest.raises(AwqnbError, match="No space left on device"):
        saving.check_writable(tmp_path / "new")
    monkeypatch.setattr(os, "write", real_write)
    with pytest.raises(AwqnbError, match=r"could not write .*No space left.*nothing was written"):
        with saving.atomic_dir(tmp_path / "dest") as d:
            (d / "part").write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


# --- two writers, permissions ---------------------------------------------------------------

def test_two_writers_at_once_exactly_one_wins(tmp_path):
    dest = tmp_path / "model"
    both_inside = threading.Barrier(2)
    outcome = {}

    def writer(name):
        try:
            with saving.atomic_dir(dest) as d:
                both_inside.wait(timeout=30)  # both have passed the "already exists" check
                for i in range(5):
                    (d / f"part{i}").write_text(name)
            outcome[name] = "saved"
        except AwqnbError as e:
            outcome[name] = str(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, o in outcome.items() if o == "saved"]
    assert len(winners) == 1, outcome
    loser = ({"a", "b"} - set(winners)).pop()
    assert "created by another run" in outcome[loser] and "--overwrite" in outcome[loser]
    assert {p.read_text() for p in dest.iterdir()} == set(winners)  # the winner's files, whole
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the loser's temporary directory is gone
    with pytest.raises(AwqnbError, match="already exists"):
        with saving.atomic_dir(dest):
            pass
    with saving.atomic_dir(dest, overwrite=True) as d:  # --overwrite replaces it, whole
        (d / "new").write_text("c")
    assert [p.name for p in dest.iterdir()] == ["new"]


def test_quantize_twice_is_refused_and_configs_do_not_collide(tmp_path, tiny_dir, capsys):
    from awqnb.cli import main

    base = ["quantize", "--model", str(tiny_dir), "--method", "rtn", "--group-size", "32", "--format", "fake",
            "--output-dir", str(tmp_path)]
    assert main(base) == 0
    first = Path(capsys.readouterr().out.strip().splitlines()[-1])
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert main(base) == 2
    assert "already exists" in capsys.readouterr().err
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not replaced
    assert main(base + ["--seed", "7"]) == 0  # another configuration: another directory
    second = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert second != first and second.parent == first.parent


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_users_umask(tmp_path, mask):
    from awqnb.core.files import atomic_write

    old = os.umask(mask)
    try:
        with saving.atomic_dir(tmp_path / "m") as d:
            (d / "sub").mkdir()
            (d / "sub" / "f.json").write_text("{}")
            (d / "w.bin").write_bytes(b"x")
        atomic_write(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    dmode, fmode = 0o777 & ~mask, 0o666 & ~mask
    m = tmp_path / "m"
    assert (m.stat().st_mode & 0o777) == dmode  # not mkdtemp's 0700
    assert (m / "sub").stat().st_mode & 0o777 == dmode
    assert (m / "sub" / "f.json").stat().st_mode & 0o777 == fmode
    assert (m / "w.bin").stat().st_mode & 0o777 == fmode
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == fmode


# --- nothing read executes code -------------------------------------------------------------

class _Planted:
    """Unpickling this runs `open(marker, 'w')`: the proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_planted_pickle_in_the_diagnostics_cache_is_never_run(tmp_path):
    import numpy as np

    from awqnb.analysis.statcache import DiagnosticsCache

    marker = tmp_path / "PWNED"
    cache = DiagnosticsCache(root=tmp_path / "diag", memory=False)
    parts = {"model": "m", "layers": [0]}
    key = cache.key("risk", parts)
    (tmp_path / "diag" / "risk").mkdir(parents=True)
    payload = pickle.dumps(_Planted(marker))
    (tmp_path / "diag" / "risk" / f"{key}.pkl").write_bytes(payload)  # the old format's name
    (tmp_path / "diag" / "risk" / f"{key}.json").write_bytes(payload)  # and the new one's
    frame = pd.DataFrame({"layer": [0, 0], "channel": [0, 1], "activation": ["silu", "silu"], "dead": [True, False],
                          "z": [0.5, float("nan")]})
    value = {"channels": frame, "hist": {0: np.arange(6, dtype="float32").reshape(2, 3)},
             "edges": np.linspace(-1, 1, 4), "t": torch.ones(2, dtype=torch.bfloat16), "n": (3, float("inf"))}
    got = cache.get_or_compute("risk", parts, lambda: value)
    assert cache.computed == 1 and not marker.exists()  # the planted files were not executed
    again = DiagnosticsCache(root=tmp_path / "diag", memory=False).get_or_compute(
        "risk", parts, lambda: pytest.fail("recomputed: the safe entry was not read back"))
    assert not marker.exists()
    pd.testing.assert_frame_equal(again["channels"], frame)
    assert list(again["hist"]) == [0] and np.array_equal(again["hist"][0], value["hist"][0])
    assert again["hist"][0].dtype == np.float32 and np.array_equal(again["edges"], value["edges"])
    assert again["t"].dtype == torch.bfloat16 and again["n"] == (3, math.inf)
    assert got["channels"].equals(frame)
    files = {p.suffix for p in (tmp_path / "diag" / "risk").iterdir()}
    assert files <= {".json", ".parquet", ".safetensors", ".pkl"}  # the .pkl is only the planted one


def test_no_code_executing_loader_in_the_library():
    src = Path(__file__).resolve().parents[1] / "awqnb"
    offenders = []
    for f in src.rglob("*.py"):
        text = f.read_text()
        for pat in (r"^\s*import pickle|^\s*from pickle|pickle\.load", r"weights_only\s*=\s*False",
                    r"torch\.load\(", r"(?<![.\w])eval\(", r"yaml\.load\(", r"\bdill\b", r"(?<![.\w])exec\("):
            if re.search(pat, text, re.M):
                offenders.append(f"{f.name}: {pat}")
    assert not offenders, offenders


# --- the user's own evaluation text ---------------------------------------------------------

def test_eval_on_your_own_text_both_protocols(tmp_path, tiny_dir, capsys):
    from awqnb.cli import main
    from awqnb.model.data import load_eval_texts
    from awqnb.analysis.evaluate import sample_perplexity, token_perplexity

    lines = [f"Line {i}: the quick brown fox number {i * 7} jumps over {i} lazy dogs." for i in range(24)]
    txt = tmp_path / "mine.txt"
    txt.write_text("\n".join(lines) + "\n")
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(lines)))
    pd.DataFrame({"id": range(len(lines)), "text": lines}).to_parquet(tmp_path / "mine.parquet")
    sha = hashlib.sha256(txt.read_bytes()).hexdigest()

    def run(*args):
        assert main(["eval", "--model", str(tiny_dir), "--device", "cpu", *args]) == 0
        return capsys.readouterr().out

    out = run("--dataset", str(txt), "--seqlen", "32", "--json", str(tmp_path / "tok.json"))
    assert "gptq-token" in out and sha[:12] in out
    tok_res = json.loads((tmp_path / "tok.json").read_text())
    assert tok_res["meta"]["data_file"]["file"] == "mine.txt" and tok_res["meta"]["data_file"]["sha256"] == sha
    model, tok = loading.load_model(str(tiny_dir))
    ids = tok(txt.read_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    direct = token_perplexity(model, ids, seqlen=32, progress=False)
    assert tok_res["protocol"] == "gptq-token" and math.isclose(tok_res["ppl"], direct.ppl, rel_tol=1e-9)
    assert len(tok_res["nll"]) == ids.numel() // 32

    ppl = {}
    for ext in ("txt", "jsonl", "parquet"):
        run("--dataset", str(tmp_path / f"mine.{ext}"), "--protocol", "sample", "--seqlen", "64",
            "--json", str(tmp_path / f"s_{ext}.json"))
        r = json.loads((tmp_path / f"s_{ext}.json").read_text())
        assert r["protocol"] == "sample" and len(r["nll"]) == len(lines)  # one unit per line / record
        assert r["meta"]["data_file"]["file"] == f"mine.{ext}" and len(r["meta"]["data_file"]["sha256"]) == 64
        ppl[ext] = r["ppl"]
    direct = sample_perplexity(model, tok, load_eval_texts(str(txt), n_samples=1000), max_length=64, progress=False)
    assert math.isclose(ppl["txt"], direct.ppl, rel_tol=1e-9)
    assert math.isclose(ppl["jsonl"], ppl["txt"], rel_tol=1e-9) and math.isclose(ppl["parquet"], ppl["txt"], rel_tol=1e-9)
    # the comparison runner takes them like any result
    assert main(["compare", str(tmp_path / "s_txt.json"), str(tmp_path / "s_jsonl.json")]) == 0
    assert "mine" in capsys.readouterr().out


# --- writing under trouble: a full disk, killed writers, formats in names ---------------------
# Writing under trouble (issue 21: 5, 9, 10 and the small --keep cases): a disk that fills up while
# `quantize` saves or a sweep commits is one line (exit status 2) leaving nothing new and losing
# nothing that was there; temporaries of killed processes are removed by the next run, a live
# writer's never; packed and fake outputs of one configuration get directories of their own.
# 
# A full disk is simulated: writes under the output directory fail the way they do on a full disk
# (Python's with OSError ENOSPC at write, safetensors' writer with its SafetensorError, the words
# it uses then); the write probe before the work still passes, as it does when the disk fills up
# during a run.

REPO = Path(__file__).resolve().parents[1]
# what safetensors' writer raises on a full disk (seen on a full tmpfs)
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


class _FullFile:
    """A file opened for writing on a full disk: opening works, writing does not."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, k):
        return getattr(self._f, k)


def fill_disk(mp, root: Path, python: bool = True, when=lambda: True) -> None:
    """From when `when()` holds, writes under `root` fail as on a full disk: Python's (io.open,
    so pathlib and os.fdopen too) unless python=False, and safetensors' writer (what
    save_pretrained and the packed export call)."""
    import builtins

    import safetensors.torch as st
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    root = os.path.abspath(root)
    under = lambda p: os.path.abspath(p) == root or os.path.abspath(p).startswith(root + os.sep)  # noqa: E731
    real_open, real_save = io.open, st.save_file

    def full_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        if any(c in mode for c in "wax+") and when() and under(path):
            return _FullFile(f)
        return f

    def full_save(tensors, filename, metadata=None):
        if when() and under(filename):
            raise SafetensorError(SAFETENSORS_FULL)
        return real_save(tensors, filename, metadata=metadata)

    if python:
        mp.setattr(io, "open", full_open)
        mp.setattr(builtins, "open", full_open)
    mp.setattr(st, "save_file", full_save)
    mp.setattr(mu, "safe_save_file", full_save)


def _snapshot(root: Path) -> dict:
    """path → sha256 of every file (None for a directory) under `root`, hidden ones included."""
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None) for p in root.rglob("*")}


def _quantize(tmp, tiny, *extra):
    return ["quantize", "--model", str(tiny), "--method", "rtn", "--group-size", "32",
            "--output-dir", str(tmp / "out"), *extra]


def _quantize_disk_full(fmt, python=True):
    def setup(tmp, tiny, mp):
        fill_disk(mp, tmp / "out", python=python)
        return _quantize(tmp, tiny, "--format", fmt)
    return setup


def _quantize_overwrite_disk_full(tmp, tiny, mp):
    from awqnb.cli import main

    argv = _quantize(tmp, tiny, "--format", "fake")
    assert main(argv) == 0  # the earlier result that must survive
    fill_disk(mp, tmp / "out")
    return argv + ["--overwrite"]


def _fake_run(mp, files_=None, on_call=None):
    """sweep.execute_run without a notebook: an ok run with a few files, in no time."""
    def run(payload):
        if on_call:
            on_call()
        now = "2026-01-01T00:00:00+00:00"
        rec = {"state": "ok", "model": payload["model"], "methods": payload["params"].get("methods"),
               "notebook": "model_report", "parameters": payload["params"], "started": now, "finished": now,
               "error": None, "seconds": 0.1}
        return {"record": rec, "files": files_ or {"model_report.ipynb": b"{}", "model_report.html": b"<html></html>",
                                                   "metrics.json": json.dumps({"results": []}).encode()}}
    mp.setattr(sweep, "execute_run", run)


def _report_io(tmp, *extra):
    return ["report", "--models", "tiny-random-llama", "--methods", "rtn", "--output-dir", str(tmp / "rep"), *extra]


def _report_disk_full(tmp, tiny, mp):
    full = []  # the disk fills up while the notebook runs: the index and the claim were written
    _fake_run(mp, on_call=lambda: full.append(True))
    fill_disk(mp, tmp / "rep", when=lambda: bool(full))
    return _report_io(tmp)


def _report_disk_full_keeps_earlier_runs(tmp, tiny, mp):
    from awqnb.cli import main

    _fake_run(mp)
    assert main(_report_io(tmp, "--seeds", "1")) == 0  # a complete run and its index
    full = []
    _fake_run(mp, on_call=lambda: full.append(True))
    fill_disk(mp, tmp / "rep", when=lambda: bool(full))
    return _report_io(tmp, "--seeds", "1,2")


def _plan_file(bits):
    def setup(tmp, tiny, mp):
        (tmp / "plan.json").write_text(json.dumps({"keep": [{"layer": 0, "family": "down", "bits": bits}]}))
        return _quantize(tmp, tiny, "--plan", str(tmp / "plan.json"))
    return setup


# (id, setup(tmp, tiny_dir, monkeypatch) -> CLI argv, regex of the one line, refused before the model loads)
WRITE_CASES = [
    ("quantize (packed): disk full while saving", _quantize_disk_full("packed"),
     r"could not write .*_packed_[0-9a-f]{8} \(No space left on device\); nothing was written there\. "
     r"Free some space", False),
    ("quantize (fake): disk full while saving", _quantize_disk_full("fake"),
     r"could not write .*_fake_[0-9a-f]{8} \(No space left on device\); nothing was written there", False),
    ("quantize (fake): safetensors' writer finds the disk full", _quantize_disk_full("fake", python=False),
     r"could not write .*_fake_[0-9a-f]{8} \(No space left on device\); nothing was written there", False),
    ("quantize --overwrite: disk full keeps the earlier model", _quantize_overwrite_disk_full,
     r"could not write .* \(No space left on device\); nothing was written there", False),
    ("report: disk full while committing a run", _report_disk_full,
     r"could not write run tiny-random-llama/\S+ into .*rep \(No space left on device\); nothing of it was kept",
     False),
    ("report: disk full keeps the runs completed before", _report_disk_full_keeps_earlier_runs,
     r"could not write run tiny-random-llama/\S+_s2_\S+ into .*\(No space left on device\)", False),
    ("quantize --keep ''", lambda tmp, tiny, mp: _quantize(tmp, tiny, "--keep", ""),
     r"--keep is empty; give LAYER\.FAMILY\[:BITS\] items", True),
    ("quantize --keep at the run's own bits", lambda tmp, tiny, mp: _quantize(tmp, tiny, "--keep", "1.down:4,0.qkv"),
     r"--keep 1\.down:4,0\.qkv: 1\.down at 4 bits is the run's own precision: that changes no weight", True),
    ("quantize --bits 8 --keep (8 by default)", lambda tmp, tiny, mp: _quantize(tmp, tiny, "--bits", "8", "--keep", "1.down"),
     r"1\.down at 8 bits is the run's own precision.*give other bits \(2, 3, 4, 16\)", True),
    ("quantize --plan at the run's own bits", _plan_file(4), r"--plan .*plan\.json: 0\.down at 4 bits is the run's own", True),
    ("quantize --plan ''", lambda tmp, tiny, mp: _quantize(tmp, tiny, "--plan", ""), r"the plan file name is empty", True),
]


@pytest.mark.parametrize("setup,pattern,before_load", [c[1:] for c in WRITE_CASES], ids=[c[0] for c in WRITE_CASES])
def test_write_trouble_is_one_line_leaves_nothing_and_loses_nothing(tmp_path, tiny_dir, monkeypatch, capsys, setup,
                                                                    pattern, before_load):
    from awqnb.cli import main

    monkeypatch.chdir(tmp_path)
    argv = setup(tmp_path, tiny_dir, monkeypatch)
    if before_load:  # the check must come before any weights are read
        def no_load(*a, **k):
            raise AssertionError("the model was loaded before the input was checked")
        monkeypatch.setattr(loading, "load_model", no_load)
    capsys.readouterr()
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("awqnb: error: ") and err.count("awqnb: error") == 1 and "Traceback" not in err, err
    assert re.search(pattern, last), err
    after = _snapshot(tmp_path)
    assert set(after) == set(before), sorted(map(str, set(after) ^ set(before)))  # nothing new, not even a folder
    assert after == before  # every file that was there, unchanged


def test_sweep_api_disk_full_is_an_awqnb_error(tmp_path, monkeypatch):
    """The library's sweep says the same (no OSError), and commits nothing of the failed run."""
    full = []
    _fake_run(monkeypatch, on_call=lambda: full.append(True))
    fill_disk(monkeypatch, tmp_path / "rep", when=lambda: bool(full))
    grid = make_grid("tiny-random-llama", "rtn")
    with pytest.raises(AwqnbError, match="nothing of it was kept"):
        sweep.run_sweep(grid, tmp_path / "rep", bars="none")
    assert not (tmp_path / "rep").exists()


# --- temporaries of killed processes ----------------------------------------------------------

_WRITER = """
import sys, time
from pathlib import Path
from awqnb.model import loading, saving
with saving.atomic_dir(Path(sys.argv[1])) as d:
    (d / "model.safetensors").write_bytes(b"x" * 100_000)  # a partial model
    print("writing", flush=True)
    time.sleep(120)
"""


def _writer(dest: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(dest)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout.readline().strip() == "writing"
    return p


def test_killed_writers_temporary_is_removed_by_the_next_run_a_live_ones_kept(tmp_path):
    out = tmp_path / "quantized"
    killed, live = _writer(out / "a"), _writer(out / "b")
    try:
        temps = {p.name: p for p in out.iterdir()}
        assert len(temps) == 2 and all(n.startswith((".a.tmp-", ".b.tmp-")) for n in temps)
        mine = {n for n in temps if n.startswith(".a.tmp-")}.pop()
        assert f"-{killed.pid}-" in mine and f"-{files.host_tag()}-" in mine  # whose it is, in its name
        killed.kill()
        killed.wait()
        assert (out / mine).is_dir()  # SIGKILL: nothing cleans up
        saving.check_writable(out)  # what `awqnb quantize` does first
        left = [p.name for p in out.iterdir()]
        assert left == [n for n in temps if n.startswith(".b.tmp-")]  # the live writer's stays
        assert (out / left[0] / "model.safetensors").stat().st_size == 100_000
        with saving.atomic_dir(out / "c") as d:  # and any writer into the folder does the same
            (d / "f").write_text("x")
        assert sorted(p.name for p in out.iterdir()) == sorted(left + ["c"])
    finally:
        for p in (killed, live):
            p.kill()
            p.wait()
    saving.check_writable(out)
    assert sorted(p.name for p in out.iterdir()) == ["c"]  # once it is gone, so is its temporary


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _age(p: Path, seconds: float) -> Path:
    t = time.time() - seconds
    for q in [p, *p.rglob("*")] if p.is_dir() else [p]:
        os.utime(q, (t, t), follow_symlinks=False)
    return p


def _entry(d: Path, name: str, is_dir: bool = True) -> Path:
    p = d / name
    if is_dir:
        p.mkdir()
        (p / "part").write_bytes(b"x" * 10)
    else:
        p.write_bytes(b"x")
    return p


def test_stale_temporaries_go_by_pid_and_age_never_a_live_writers(tmp_path):
    host, dead, me, day = files.host_tag(), _dead_pid(), os.getpid(), files.STALE_AGE_S
    other = "ffffff" if host != "ffffff" else "eeeeee"
    d = tmp_path / "out"
    d.mkdir()
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # started after the temp below
    try:
        gone = [_entry(d, f".m1.tmp-{host}-{dead}-abcd1234"),  # its writer is dead
                _entry(d, f".index.html.tmp-{host}-{dead}-k2_x9", is_dir=False),
                _age(_entry(d, f".m2.tmp-{host}-{later.pid}-abcd1234"), 3600),  # its pid now is another process
                _age(_entry(d, f".m3.tmp-{other}-{me}-abcd1234"), day + 60),  # another host's, a day untouched
                _age(_entry(d, ".m4.tmp-k2j4_9xq"), day + 60)]  # an older awqnb's, a day untouched
        kept = [_entry(d, f".m5.tmp-{host}-{me}-abcd1234"),  # a live writer's (this process)
                _entry(d, f".m6.tmp-{host}-1-abcd1234"),  # pid 1 runs, and ran before it
                _entry(d, f".m7.tmp-{other}-{dead}-abcd1234"),  # another host's: its pid means nothing here
                _entry(d, ".m8.tmp-k2j4_9xq"),  # an older awqnb's, fresh
                _age(_entry(d, ".m9.tmp-k2j4_9xq", is_dir=False), day + 60),  # not a directory an older awqnb made
                _entry(d, "model"), _entry(d, ".notes.tmp", is_dir=False), _entry(d, f"x.tmp-{host}-{dead}-ab")]
        # a replaced output whose replacement never arrived comes back; one whose did goes
        back = _entry(d, f".m10.old-{host}-{dead}-abcd1234")
        _entry(d, "m11")
        spent = _entry(d, f".m11.old-{host}-{dead}-abcd1234")
        removed = files.clean_stale(d, legacy=True)
        assert sorted(removed) == sorted(gone + [back, spent])
        assert sorted(p.name for p in d.iterdir()) == sorted([p.name for p in kept] + ["m10", "m11"])
        assert (d / "m10" / "part").read_bytes() == b"x" * 10
        assert files.clean_stale(d, legacy=True) == []
    finally:
        later.kill()
        later.wait()


def test_killed_sweeps_leftovers_are_removed_by_the_next_sweep(tmp_path, monkeypatch):
    host, dead, me = files.host_tag(), _dead_pid(), os.getpid()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    stale = _entry(tmp, f"awqnb-run-{host}-{dead}-abcd1234")  # a killed run's work directory
    live = _entry(tmp, f"awqnb-run-{host}-{me}-abcd1234")
    out = tmp_path / "rep"
    model_dir = out / "tiny-random-llama"
    model_dir.mkdir(parents=True)
    half = _entry(model_dir, f".w4_g128_rtn_s42_0123456789abcdef.tmp-{host}-{dead}-abcd1234")  # killed while committing
    seen = []

    def fake_execute_into(nb_in, run_dir, params, **kw):
        seen.append(Path(run_dir).parent)
        (Path(run_dir) / "metrics.json").write_text(json.dumps({"results": []}))
        return {"state": "ok", "model": kw["model"], "notebook": nb_in.stem, "parameters": dict(params), "error": None}

    monkeypatch.setattr(notebook_run, "execute_into", fake_execute_into)
    res = sweep.run_sweep(make_grid("tiny-random-llama", "rtn"), out, bars="none")
    assert [r.state for r in res.runs] == ["ok"]
    assert not stale.exists() and live.exists() and not half.exists()
    assert len(seen) == 1 and seen[0].name.startswith(files.run_prefix()) and not seen[0].exists()
    assert sorted(p.name for p in model_dir.iterdir()) == [res.runs[0].dir.name]


def test_commit_failure_keeps_the_earlier_attempt(tmp_path, monkeypatch):
    """A redo (--force) that cannot be written keeps the run it was to replace, whole."""
    _fake_run(monkeypatch)
    grid = make_grid("tiny-random-llama", "rtn")
    first = sweep.run_sweep(grid, tmp_path, bars="none").runs[0].dir
    before = _snapshot(first)
    full = []
    _fake_run(monkeypatch, on_call=lambda: full.append(True))
    fill_disk(monkeypatch, tmp_path, when=lambda: bool(full))
    with pytest.raises(AwqnbError, match="nothing of it was kept"):
        sweep.run_sweep(grid, tmp_path, force=True, bars="none")
    assert _snapshot(first) == before and sweep.run_state(first) == "ok"
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]


def test_record_and_file_writes_name_their_writer_and_fail_as_oserror(tmp_path, monkeypatch):
    import torch

    from awqnb.core import tensorjson

    tensorjson.save({"w": torch.ones(2)}, tmp_path / "r")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.safetensors"]
    stale = _entry(tmp_path, f".r.safetensors.tmp-{files.host_tag()}-{_dead_pid()}-abcd1234", is_dir=False)
    fill_disk(monkeypatch, tmp_path, python=False)
    with pytest.raises(OSError, match="No space left on device") as e:
        tensorjson.save({"w": torch.zeros(2)}, tmp_path / "r")
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.safetensors"] and not stale.exists()
    assert torch.equal(tensorjson.load(tmp_path / "r")["w"], torch.ones(2))  # the earlier record, whole


# --- the format is in the directory name -----------------------------------------------------

def test_packed_and_fake_outputs_of_one_config_have_directories_of_their_own(tmp_path, tiny_dir, capsys):
    from awqnb.cli import main
    from awqnb.quant.method_config import MethodConfig
    from awqnb.core.config import QuantConfig

    cfg = MethodConfig("rtn", QuantConfig(4, 32))
    packed, fake = (saving.model_tag("tiny-random-llama", cfg, fmt=f) for f in ("packed", "fake"))
    assert packed.replace("_packed_", "_fake_") == fake and packed.startswith("tiny-random-llama_rtn_w4_g32_headfp16_")
    assert saving.model_tag("tiny-random-llama", cfg) == fake  # what save_quantized writes, by default
    with pytest.raises(AwqnbError, match="format 'gguf' is unknown"):
        saving.model_tag("tiny-random-llama", cfg, fmt="gguf")
    out = {}
    for fmt in ("packed", "fake", "fake"):
        assert main(_quantize(tmp_path, tiny_dir, "--format", fmt, "--overwrite")) == 0
        out.setdefault(fmt, []).append(Path(capsys.readouterr().out.strip().splitlines()[-1]))
    assert out["packed"][0].name.split("_")[-2] == "packed" and out["fake"][0].name.split("_")[-2] == "fake"
    assert out["fake"][0] == out["fake"][1] != out["packed"][0]  # --overwrite of one leaves the other
    assert json.loads((out["packed"][0] / "quantization_metadata.json").read_text())["export"]["format"] == "packed"
    assert json.loads((out["fake"][0] / "quantization_metadata.json").read_text())["export"]["format"] == "fake"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted({out["packed"][0].name, out["fake"][0].name})


def test_damaged_replay_record_is_one_line(tmp_path):
    """QuantResult.load on a truncated or incomplete record: AwqnbError, not SafetensorError/KeyError."""
    from awqnb.quant import pipeline
    from awqnb.quant.method_config import MethodConfig
    from awqnb.core.config import QuantConfig

    model, _ = loading.load_model("tiny-random-llama")
    res = pipeline.quantize(model, MethodConfig("rtn", QuantConfig(4, 32)), None, device="cpu", progress=False)
    res.save(tmp_path / "r")
    assert pipeline.QuantResult.load(tmp_path / "r").config.method == "rtn"
    doc = json.loads((tmp_path / "r.json").read_text())
    del doc["data"]["layers"]
    (tmp_path / "r.json").write_text(json.dumps(doc))
    with pytest.raises(AwqnbError, match="is not a complete quantization record"):
        pipeline.QuantResult.load(tmp_path / "r")
    res.save(tmp_path / "t")
    st = tmp_path / "t.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(AwqnbError):
        pipeline.QuantResult.load(tmp_path / "t")
