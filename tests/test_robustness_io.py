"""Writing under trouble (issue 21: 5, 9, 10 and the small --keep cases): a disk that fills up while
`quantize` saves or a sweep commits is one line (exit status 2) leaving nothing new and losing
nothing that was there; temporaries of killed processes are removed by the next run, a live
writer's never; packed and fake outputs of one configuration get directories of their own.

A full disk is simulated: writes under the output directory fail the way they do on a full disk
(Python's with OSError ENOSPC at write, safetensors' writer with its SafetensorError, the words
it uses then); the write probe before the work still passes, as it does when the disk fills up
during a run. (These cases belong in tests/test_robustness.py's table; they live here until merged.)"""
import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from awqnb import files, models, report, sweep
from awqnb.errors import AwqnbError

REPO = Path(__file__).resolve().parents[1]
# what safetensors' writer raises on a full disk (seen on a full tmpfs)
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """tiny-random-llama saved as a plain HF directory (config, safetensors, tokenizer)."""
    model, tok = models.load_model("tiny-random-llama")
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


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


def _report(tmp, *extra):
    return ["report", "--models", "tiny-random-llama", "--methods", "rtn", "--output-dir", str(tmp / "rep"), *extra]


def _report_disk_full(tmp, tiny, mp):
    full = []  # the disk fills up while the notebook runs: the index and the claim were written
    _fake_run(mp, on_call=lambda: full.append(True))
    fill_disk(mp, tmp / "rep", when=lambda: bool(full))
    return _report(tmp)


def _report_disk_full_keeps_earlier_runs(tmp, tiny, mp):
    from awqnb.cli import main

    _fake_run(mp)
    assert main(_report(tmp, "--seeds", "1")) == 0  # a complete run and its index
    full = []
    _fake_run(mp, on_call=lambda: full.append(True))
    fill_disk(mp, tmp / "rep", when=lambda: bool(full))
    return _report(tmp, "--seeds", "1,2")


def _plan_file(bits):
    def setup(tmp, tiny, mp):
        (tmp / "plan.json").write_text(json.dumps({"keep": [{"layer": 0, "family": "down", "bits": bits}]}))
        return _quantize(tmp, tiny, "--plan", str(tmp / "plan.json"))
    return setup


# (id, setup(tmp, tiny_dir, monkeypatch) -> CLI argv, regex of the one line, refused before the model loads)
CASES = [
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


@pytest.mark.parametrize("setup,pattern,before_load", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_write_trouble_is_one_line_leaves_nothing_and_loses_nothing(tmp_path, tiny_dir, monkeypatch, capsys, setup,
                                                                    pattern, before_load):
    from awqnb.cli import main

    monkeypatch.chdir(tmp_path)
    argv = setup(tmp_path, tiny_dir, monkeypatch)
    if before_load:  # the check must come before any weights are read
        def no_load(*a, **k):
            raise AssertionError("the model was loaded before the input was checked")
        monkeypatch.setattr(models, "load_model", no_load)
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
    grid = sweep.make_grid("tiny-random-llama", "rtn")
    with pytest.raises(AwqnbError, match="nothing of it was kept"):
        sweep.run_sweep(grid, tmp_path / "rep", bars="none")
    assert not (tmp_path / "rep").exists()


# --- temporaries of killed processes ----------------------------------------------------------

_WRITER = """
import sys, time
from pathlib import Path
from awqnb import models
with models.atomic_dir(Path(sys.argv[1])) as d:
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
        models.check_writable(out)  # what `awqnb quantize` does first
        left = [p.name for p in out.iterdir()]
        assert left == [n for n in temps if n.startswith(".b.tmp-")]  # the live writer's stays
        assert (out / left[0] / "model.safetensors").stat().st_size == 100_000
        with models.atomic_dir(out / "c") as d:  # and any writer into the folder does the same
            (d / "f").write_text("x")
        assert sorted(p.name for p in out.iterdir()) == sorted(left + ["c"])
    finally:
        for p in (killed, live):
            p.kill()
            p.wait()
    models.check_writable(out)
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

    monkeypatch.setattr(report, "execute_into", fake_execute_into)
    res = sweep.run_sweep(sweep.make_grid("tiny-random-llama", "rtn"), out, bars="none")
    assert [r.state for r in res.runs] == ["ok"]
    assert not stale.exists() and live.exists() and not half.exists()
    assert len(seen) == 1 and seen[0].name.startswith(files.run_prefix()) and not seen[0].exists()
    assert sorted(p.name for p in model_dir.iterdir()) == [res.runs[0].dir.name]


def test_commit_failure_keeps_the_earlier_attempt(tmp_path, monkeypatch):
    """A redo (--force) that cannot be written keeps the run it was to replace, whole."""
    _fake_run(monkeypatch)
    grid = sweep.make_grid("tiny-random-llama", "rtn")
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

    from awqnb import tensorjson

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
    from awqnb.config import MethodConfig, QuantConfig

    cfg = MethodConfig("rtn", QuantConfig(4, 32))
    packed, fake = (models.model_tag("tiny-random-llama", cfg, fmt=f) for f in ("packed", "fake"))
    assert packed.replace("_packed_", "_fake_") == fake and packed.startswith("tiny-random-llama_rtn_w4_g32_headfp16_")
    assert models.model_tag("tiny-random-llama", cfg) == fake  # what save_quantized writes, by default
    with pytest.raises(AwqnbError, match="format 'gguf' is unknown"):
        models.model_tag("tiny-random-llama", cfg, fmt="gguf")
    out = {}
    for fmt in ("packed", "fake", "fake"):
        assert main(_quantize(tmp_path, tiny_dir, "--format", fmt, "--overwrite")) == 0
        out.setdefault(fmt, []).append(Path(capsys.readouterr().out.strip().splitlines()[-1]))
    assert out["packed"][0].name.split("_")[-2] == "packed" and out["fake"][0].name.split("_")[-2] == "fake"
    assert out["fake"][0] == out["fake"][1] != out["packed"][0]  # --overwrite of one leaves the other
    assert json.loads((out["packed"][0] / "quantization_metadata.json").read_text())["export"]["format"] == "packed"
    assert json.loads((out["fake"][0] / "quantization_metadata.json").read_text())["export"]["format"] == "fake"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted({out["packed"][0].name, out["fake"][0].name})
