"""Sweeps (`awqnb report` over a grid, awqnb.workbench.sweep) on the tiny models: a local Ray cluster
(`ray.init(num_cpus=2)`) gives the same metrics as the in-process executor; a sweep interrupted by
SIGINT to its driver, then rerun, finishes without redoing complete runs; two sweeps into one
output directory at once lose nothing; bad input is one line and exit status 2 before any run.

The runs read a 300-row slice of WikiText-2 test (AWQNB_DATA_DIR) and a local calibration text, so
each notebook takes seconds. The in-process baseline runs in a background process while the Ray
tests use the cluster."""
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from awqnb import cli
from awqnb.workbench import report, report_index, sweep
from awqnb.workbench.grid import expand, make_grid
from awqnb.core.errors import AwqnbError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2-raw-v1" / "test.parquet"
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
        "in Paris. Its base is square, measuring 125 metres on each side. ") * 20
MODELS = ["tiny-random-llama", "tiny-random-gemma3"]


def _grid(calib: Path, **kw) -> dict:
    doc = {"models": MODELS, "methods": ["rtn", "awq"], "group_sizes": [32, 64],
           "params": {"n_calib": 4, "calib_seqlen": 32, "calib_dataset": str(calib), "eval_windows": 2,
                      "eval_seqlen": 64, "n_grid": 4, "diag_samples": 0, "sample_datasets": [],
                      # executor behaviour is under test, not the report's sections: one seed, no sensitivity pass
                      "SEEDS": 1, "SENSITIVITY": False}}
    doc.update(kw)
    return doc


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of every driver and run: small data, one thread per run, a private cache."""
    import pandas as pd

    root = tmp_path_factory.mktemp("sweep")
    if not DATA.is_file():
        pytest.skip(f"no WikiText-2 test set at {DATA}")
    (root / "data" / "wikitext-2-raw-v1").mkdir(parents=True)
    pd.read_parquet(DATA).iloc[:300].to_parquet(root / "data" / "wikitext-2-raw-v1" / "test.parquet")
    (root / "calib.txt").write_text(TEXT)
    (root / "grid.yaml").write_text(yaml.safe_dump(_grid(root / "calib.txt")))
    e = {"AWQNB_DATA_DIR": str(root / "data"), "OMP_NUM_THREADS": "1", "AWQNB_DIAG_CACHE": str(root / "diag"),
         # Ray ≥ 2.59 authenticates drivers with a token; the test's cluster and its drivers share a fresh one
         "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in e.items():
            mp.setenv(k, v)  # before ray.init: the cluster's workers inherit it
        yield root, {**os.environ, **e}


@pytest.fixture(scope="module")
def baseline(env):
    """The 2 × 2 grid with the in-process executor, in a background process (started first, so it
    runs beside the Ray tests); waited for by the test that compares."""
    root, e = env
    out = root / "local"
    p = subprocess.Popen([sys.executable, "-m", "awqnb.cli", "report", "--grid", str(root / "grid.yaml"),
                          "--output-dir", str(out)], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield p, out
    if p.poll() is None:
        p.kill()


@pytest.fixture(scope="module")
def cluster(env, baseline):
    """The local cluster awqnb starts (`--executor ray` without `--ray-address`), with 2 CPUs."""
    ray = pytest.importorskip("ray")
    sweep.check_ray(None, 1.0, 0.0, num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _cli(args, e, **kw):
    return subprocess.Popen([sys.executable, "-m", "awqnb.cli", "report", *args], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _complete(out: Path) -> dict:
    """run dir → run.json of every complete run under `out`."""
    found = {}
    for d in sorted(out.glob("*/*")):
        rec = report.read_json_file(d / report.RUN_FILE)
        if rec.get("complete") and not d.name.startswith("."):
            found[d.relative_to(out).as_posix()] = rec
    return found


def _ppl(run_dir: Path) -> dict:
    return {(r["label"], r["dataset"]): r["ppl"] for r in report.read_metrics(run_dir)["results"]}


@pytest.fixture(scope="module")
def interrupted(env, cluster):
    """The 2 × 2 grid on the Ray cluster by the CLI, SIGINT to that driver once a run is complete,
    then the same grid again (in this process, on the same cluster) to finish it."""
    root, e = env
    out = root / "ray"
    args = ["--grid", str(root / "grid.yaml"), "--output-dir", str(out), "--executor", "ray", "--ray-address", cluster]
    p = _cli(args, e)
    deadline = time.time() + 240
    while time.time() < deadline and len(_complete(out)) < 1 and p.poll() is None:
        time.sleep(0.3)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    first = _complete(out)
    runs = {r["rel"]: r for r in report_index.find_runs(out)}
    index = (out / "index.html").read_text()
    mtimes = {k: (out / k / report.RUN_FILE).stat().st_mtime_ns for k in first}
    res = sweep.run_sweep(make_grid(grid_file=root / "grid.yaml"), out, "ray", bars="none")
    return dict(out=out, rc=p.returncode, stderr=err, first=first, runs=runs, index=index, mtimes=mtimes, res=res)


def test_interrupted_sweep_resumes_without_redoing_complete_runs(interrupted):
    it = interrupted
    out, first, res = it["out"], it["first"], it["res"]
    assert it["rc"] == 130 and "interrupted" in it["stderr"], it["stderr"]
    assert 1 <= len(first) < 4 and all(r["state"] == "ok" for r in first.values())
    # at the interruption: the runs not finished show as interrupted; nothing half-written shows as done
    assert {k for k, r in it["runs"].items() if r["state"] == "ok"} == set(first)
    assert any(r["state"] == "interrupted" for r in it["runs"].values())
    assert "interrupted" in it["index"]
    # the rerun: complete runs skipped and untouched, the rest done
    assert [r.state for r in res.runs] == ["ok"] * 4, [r.error for r in res.runs]
    assert {r.spec.rel for r in res.runs if r.skipped} == set(first)
    assert {k: (out / k / report.RUN_FILE).stat().st_mtime_ns for k in first} == it["mtimes"]
    assert len(_complete(out)) == 4
    assert {r["state"] for r in report_index.find_runs(out)} == {"ok"}  # no claims left behind
    html = (out / "index.html").read_text()
    assert html.count('<tr class="ok">') == 4 * 3  # fp, rtn, awq per run
    again = sweep.run_sweep(make_grid(grid_file=out.parent / "grid.yaml"), out, "ray", bars="none")
    assert all(r.skipped for r in again.runs) and not again.executed


def test_ray_sweep_gives_the_same_metrics_as_in_process(interrupted, baseline):
    out = interrupted["out"]
    p, local = baseline
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    done = _complete(out)
    assert len(done) == 4 and set(_complete(local)) == set(done)  # a run's identity does not depend on the executor
    for rel, rec in done.items():
        a, b = _ppl(out / rel), _ppl(local / rel)
        assert set(a) == {("fp", "wikitext2"), ("rtn", "wikitext2"), ("awq", "wikitext2")}
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6), (rel, k)
        assert rec["identity"]["parameters"]["group_size"] in (32, 64) and rec["identity"]["model"]["alias"] in MODELS
        assert set(rec["files"]) == {"model_report.ipynb", "model_report.html", "metrics.json"}


def test_two_sweeps_into_one_directory_lose_nothing(env, cluster):
    root, e = env
    out = root / "shared-out"
    g1, g2 = root / "g1.yaml", root / "g2.yaml"  # overlap: tiny-random-llama at group size 32
    g1.write_text(yaml.safe_dump(_grid(root / "calib.txt", models=["tiny-random-llama"], group_sizes=[32, 64],
                                       methods=["rtn"])))
    g2.write_text(yaml.safe_dump(_grid(root / "calib.txt", models=MODELS, group_sizes=[32], methods=["rtn"])))
    a = _cli(["--grid", str(g1), "--output-dir", str(out), "--executor", "ray", "--ray-address", cluster], e)
    b = _cli(["--grid", str(g2), "--output-dir", str(out)], e)
    (oa, ea), (ob, eb) = a.communicate(timeout=300), b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, (ea, eb)
    done = _complete(out)
    assert len(done) == 3 and all(r["state"] == "ok" for r in done.values())
    overlap = [k for k in done if k.startswith("tiny-random-llama/w4_g32")]
    assert len(overlap) == 1
    # computed once: one sweep ran it, the other waited for it (or found it complete)
    said = [ln for ln in (oa + ob).splitlines() if overlap[0].split("/")[1] in ln]
    assert len(said) == 2 and sum(("run by another sweep" in ln or "already complete" in ln) for ln in said) == 1
    runs = report_index.find_runs(out)
    assert sorted(r["rel"] for r in runs) == sorted(done) and {r["state"] for r in runs} == {"ok"}
    html = (out / "index.html").read_text()
    assert all(k.split("/")[1] in html for k in done)


def test_local_cluster_listens_on_loopback_only_with_a_token(cluster):
    """Every server of the local cluster (GCS, raylets, workers, agents) listens on 127.0.0.1, not
    on all interfaces, and drivers must present the cluster's token."""
    psutil = pytest.importorskip("psutil")
    import ray

    assert cluster.rpartition(":")[0] == "127.0.0.1"

    @ray.remote
    def worker_pid():
        return os.getpid()

    worker = ray.get(worker_pid.remote())  # a worker is up, with its own server
    here = psutil.Process()
    ours = {here.pid} | {p.pid for p in here.children(recursive=True)}
    assert worker in ours
    listening = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    names = {n for _, _, n in listening}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), listening
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _, _ in listening), listening
    assert os.environ.get("RAY_AUTH_MODE") == "token"


def test_bad_input_is_one_line_before_any_run(env, tmp_path, capsys):
    root, e = env
    base = ["report", "--grid", str(root / "grid.yaml"), "--output-dir", str(tmp_path / "out")]
    cases = [(["--models", "no-such-model"], "unknown model 'no-such-model'"),
             (["--methods", "rtn,no_such_method"], "unknown method 'no_such_method'"),
             (["--param", "n_calibb=3"], "unknown notebook parameter"),
             (["--executor", "ray", "--ray-address", "127.0.0.1:9"], "cannot reach the Ray cluster at --ray-address")]
    for extra, msg in cases:
        rc = cli.main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and msg in err[0], (extra, err)
    assert not (tmp_path / "out").exists()


def test_gpu_request_no_node_can_satisfy(env, cluster, tmp_path, capsys):
    root, _ = env
    rc = cli.main(["report", "--grid", str(root / "grid.yaml"), "--output-dir", str(tmp_path / "o"),
                   "--executor", "ray", "--gpus-per-run", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no Ray node can run a report with 1 CPU(s) and 1 GPU(s)" in err[0]
    assert not (tmp_path / "o").exists()


def test_grid_expansion_and_identity(env):
    root, _ = env
    g = make_grid(grid_file=root / "grid.yaml")
    specs = expand(g)
    assert [(s.model, s.params["group_size"]) for s in specs] == [(m, gs) for m in MODELS for gs in (32, 64)]
    assert len({s.run_id for s in specs}) == 4 and all(s.name.endswith(s.run_id) for s in specs)
    # the identity is stable and covers what decides a result
    assert [s.run_id for s in expand(g)] == [s.run_id for s in specs]
    seeds = expand(make_grid(grid_file=root / "grid.yaml", seeds="1,2"))
    assert len(seeds) == 8 and not {s.run_id for s in seeds} & {s.run_id for s in specs}
    other_calib = root / "calib2.txt"
    other_calib.write_text(TEXT + " more")
    g2 = make_grid(grid_file=root / "grid.yaml", params={**g.params, "calib_dataset": str(other_calib)})
    assert not {s.run_id for s in expand(g2)} & {s.run_id for s in specs}
    # a default written out explicitly is the same run
    g3 = make_grid(grid_file=root / "grid.yaml", params={**g.params, "bits": 4})
    assert [s.run_id for s in expand(g3)] == [s.run_id for s in specs]
    ident = specs[0].identity
    assert set(ident) == {"notebook", "notebook_code", "parameters", "model", "data", "versions", "data_files"}
    calib_file = ident["parameters"]["calib_dataset"]  # the user's own text file, by content
    assert ident["data_files"] == {calib_file: hashlib.sha256(Path(calib_file).read_bytes()).hexdigest()}
    assert ident["data"]["wikitext2-test"]["sha256"] and ident["versions"]["awqnb"]
    assert ident["parameters"]["seed"] == 42 and ident["parameters"]["methods"] == ["rtn", "awq"]
    assert set(make_grid("a,b", "rtn,awq;rtn,awq_sh").methods) == {("rtn", "awq"), ("rtn", "awq_sh")}
    with pytest.raises(AwqnbError, match="grid axis"):
        make_grid("a", "rtn", params={"methods": ["rtn"]})


def test_incomplete_run_is_not_shown_as_done(tmp_path):
    d = tmp_path / "m" / "run1"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"results": []}))
    (d / "a.html").write_text("x" * 10)
    (d / report.RUN_FILE).write_text(json.dumps({"state": "ok", "complete": True, "notebook": "a",
                                                 "files": {"a.html": 10, "metrics.json": 999}}))
    assert sweep.run_state(d) is None
    assert report_index.find_runs(tmp_path)[0]["state"] == "incomplete"


def test_every_alpha_explorer_trace_is_named():
    from awqnb.workbench import plots

    names = [t.name for t in plots.alpha_explorer_figure().data]
    assert all(names) and len(set(names)) == len(names)


def test_claim_released_twice_across_a_ctrl_c_closes_once(tmp_path, monkeypatch):
    """Ctrl-C landing just after a claim's file descriptor is closed: the sweep's interrupt handler
    releases the claim again, which must not close that descriptor a second time (EBADF, or
    someone else's descriptor by then)."""
    from awqnb.workbench import rundir

    spec = expand(make_grid("tiny-random-llama", "rtn"))[0]
    claim = rundir.Claim(tmp_path, spec)
    assert claim.try_acquire("s1")
    real_close = os.close

    def close_then_interrupt(fd):
        real_close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir.os, "close", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        claim.release(done=True)
    monkeypatch.setattr(rundir.os, "close", real_close)
    claim.release(done=False)  # the handler's release: nothing left to close
    assert claim.fd is None and not claim.path.exists()
    again = rundir.Claim(tmp_path, spec)
    assert again.try_acquire("s2")  # the lock went with the descriptor
    again.release(done=True)
