"""The whole workbench on one model directory (awqnb report, layer deep dive, α explorer): time and peak GPU memory per section.

GB = 10⁹ bytes (torch.cuda.max_memory_allocated).

Steps (`--steps`, default all, in this order; each writes `<step>.json` into the results directory and
is skipped when that file exists, so a run stopped midway — a GPU machine taken back — resumes):
  report      `awqnb report --models DIR --methods rtn,awq,awq_gptq` (3 calibration seeds, WikiText-2
              full test, the Sensitivity section on), run as a user runs it (a subprocess of the CLI);
  deep28      `awqnb report --notebook layer_deep_dive --param LAYER=28` (`--layer` changes the 28);
  deepsens    the same with `LAYER="most_sensitive"`;
  alpha       the α explorer through the widgets' API (as bench/widgets_latency.py): time to build
              `AlphaExplorer` on layer 28 (cold diagnostics cache), then per MLP group (gate_up, down)
              the curve time and the slider moves of `AlphaExplorer.timings()`.
  walk        not in the default steps: the two block walks whose memory must not grow with depth, in
              this process with the model loaded on the CPU: WikiText-2 token perplexity streamed block
              by block (placement 'stream', forced even where the whole model would fit, `--eval-windows`)
              and the sensitivity pass of `rtn` (the report's settings: 8 windows × 512, float32, no
              cache). Run it on two depths of a shape (llama3-70b:2 and :4) and compare the peaks.

Where the time goes inside a notebook: the kernel gets an IPython startup file (through `$IPYTHONDIR`,
no library change) that records each cell's wall time and peak GPU memory, and, from the library's
progress events, each evaluation ("ppl …"), sensitivity and pareto bar's time and peak memory (the
peak is reset when such a bar opens; every reset — the library's own too — first folds the peak into
every open cell and bar, so no peak is lost). Per method and seed the quantize time and peak come from
the runner's own records (`comp.runs`: quantize_s, peak_mem_gb). HTML export: the bench exports the
executed notebook once more and times that (the CLI's own export is inside "outside cells").

  python bench/make_shaped_model.py --shape llama3-8b --out /data/llama3-8b-random
  python bench/workbench.py --model-dir /data/llama3-8b-random --device cuda:0 --budget-s 3000
  # CPU smoke test (a random tiny model; minutes):
  python bench/make_shaped_model.py --shape tiny --layers 30 --out /tmp/wb-tiny30
  python bench/workbench.py --model-dir /tmp/wb-tiny30 --device cpu --smoke

Writes run_info.json (command, environment, device, dtype, the model's random_weights.json), one JSON
per step and summary.md (the table printed at the end). Notebooks, HTML and logs go to `--work-dir`
(default /tmp/awqnb-workbench/<results dir name>), not into the results.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment, run_dir, write_run_info  # noqa: E402

STEPS = ("report", "deep28", "deepsens", "alpha")
ALL_STEPS = STEPS + ("walk",)
CELL_LOG_ENV = "AWQNB_BENCH_CELL_LOG"

# The smallest slices that still run every section (CPU smoke test on a tiny random model).
SMOKE_REPORT = dict(n_calib=2, calib_seqlen=64, n_grid=2, eval_seqlen=128, eval_windows=1, sample_datasets=[],
                    diag_samples=1, SENS_WINDOWS=1, SENS_SEQLEN=64)
SMOKE_DEEP = dict(n_calib=2, calib_seqlen=64, n_grid=2, SENS_WINDOWS=1, SENS_SEQLEN=64, top_k=3)
SMOKE_ALPHA = dict(n_calib=2, calib_seqlen=64, n_grid=4, max_tokens=64, n_seq=1)

# Runs inside the notebook's kernel (IPython startup file). Reads and writes JSON lines only.
HOOK = r'''
import json as _j, os as _o, re as _re, time as _t
_LOG = _o.environ.get("AWQNB_BENCH_CELL_LOG")
if _LOG:
    import torch as _torch
    from awqnb.core import progress as _progress

    _ST = {"cell": 0, "t0": 0.0, "hw": 0, "open": {}, "runs": False}
    _reset0 = _torch.cuda.reset_peak_memory_stats

    def _on():
        return _torch.cuda.is_available() and _torch.cuda.is_initialized()

    def _max():
        return _torch.cuda.max_memory_allocated() if _on() else 0

    def _fold():  # the peak so far into the cell and every open bar, before anything resets it
        m = _max()
        _ST["hw"] = max(_ST["hw"], m)
        for seg in _ST["open"].values():
            seg["hw"] = max(seg["hw"], m)

    def _reset(device=None):
        _fold()
        return _reset0(device)

    _torch.cuda.reset_peak_memory_stats = _reset

    def _write(rec):
        with open(_LOG, "a") as f:
            f.write(_j.dumps(rec, default=str) + "\n")

    _emit0 = _progress._emit
    _TIMED = ("ppl ", "sensitivity", "pareto")

    def _emit(ev):
        desc = ev.get("bar")
        if desc is not None and desc.startswith(_TIMED):
            seg = _ST["open"].get(desc)
            if seg is None and not ev.get("closed"):
                if _on():
                    _reset(None)
                _ST["open"][desc] = {"t0": _t.time(), "hw": 0}
            elif seg is not None and ev.get("closed"):
                _fold()
                del _ST["open"][desc]
                _write({"kind": "bar", "cell": _ST["cell"], "desc": desc, "t0": seg["t0"], "t1": _t.time(),
                        "seconds": _t.time() - seg["t0"], "peak_bytes": seg["hw"] if _on() else None,
                        "n": ev.get("n"), "total": ev.get("total")})
        return _emit0(ev)

    _progress._emit = _emit

    def _pre(info=None):
        _ST["cell"] += 1
        _fold()
        if _on():
            _reset0()
        _ST["hw"] = 0
        _ST["src"] = getattr(info, "raw_cell", "") or ""
        _ST["t0"] = _t.time()

    def _post(result=None):
        t1 = _t.time()
        _fold()
        src = _ST.get("src", "")
        stage = _re.search(r"progress\.stage\(f?[\"']([^\"']*)", src)
        first = next((ln.strip() for ln in src.splitlines() if ln.strip() and not ln.strip().startswith("#")), "")
        ok = result is None or getattr(result, "success", True)
        _write({"kind": "cell", "cell": _ST["cell"], "t0": _ST["t0"], "t1": t1, "seconds": t1 - _ST["t0"],
                "peak_bytes": _ST["hw"] if _on() else None, "stage": stage.group(1) if stage else None,
                "first_line": first[:120], "ok": bool(ok),
                "calls": sorted(set(_re.findall(r"\b(load_model|run_comparison|salience_table|sensitivity|pareto|"
                                                r"quantize_layer|capture_layer_inputs|write_metrics|preactivation_risk|preactivation_hist|"
                                                r"rounding_error|layer_mse)\(", src)))})
        ns = get_ipython().user_ns
        comp = ns.get("comp")
        if comp is not None and not _ST["runs"]:
            _ST["runs"] = True
            _write({"kind": "runs", "runs": [
                {"label": r.label, "method": r.method, "seed": r.seed, "status": r.status, "shared": r.shared,
                 "quantize_s": r.quantize_s, "peak_mem_gb": r.peak_mem_gb,
                 "timings": (r.info or {}).get("timings"),
                 "eval": {ds: {"ppl": res.ppl, "seconds": res.seconds} for ds, res in r.results.items()}}
                for r in comp.runs]})

    get_ipython().events.register("pre_run_cell", _pre)
    get_ipython().events.register("post_run_cell", _post)
'''


def gb(b):
    return None if b is None else b / 1e9


def write_hook(work: Path) -> Path:
    """An IPython directory whose default profile runs HOOK at kernel start."""
    ipy = work / "ipython"
    start = ipy / "profile_default" / "startup"
    start.mkdir(parents=True, exist_ok=True)
    (start / "00-awqnb-bench.py").write_text(HOOK)
    return ipy


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def run_cli(step: str, args, notebook: str, methods: str, params: dict, work: Path) -> dict:
    """`awqnb report` for one notebook as a subprocess, timed, with the cell hook; its record."""
    out_dir = work / step
    out_dir.mkdir(parents=True, exist_ok=True)
    cell_log = out_dir / "cells.jsonl"
    cell_log.unlink(missing_ok=True)  # an interrupted attempt's cells are not this one's
    cmd = [sys.executable, "-m", "awqnb", "report", "--models", str(args.model_dir), "--methods", methods,
           "--notebook", notebook, "--output-dir", str(out_dir),
           "--force"]  # this step is not done: a run kept from an earlier attempt must not be skipped
    for k, v in params.items():
        cmd += ["--param", f"{k}={json.dumps(v)}"]  # JSON is YAML: the CLI reads it back as the same literal
    env = dict(os.environ, IPYTHONDIR=str(write_hook(work)), **{CELL_LOG_ENV: str(cell_log)})
    log_path = out_dir / "cli.log"
    print(f"[{step}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        rc = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    runs = sorted((out_dir).glob("*/*/run.json"), key=lambda p: p.stat().st_mtime)
    run = json.loads(runs[-1].read_text()) if runs else {}
    rdir = runs[-1].parent if runs else None
    nb = rdir / f"{notebook}.ipynb" if rdir else None
    html = nb.with_suffix(".html") if nb else None
    html_s = None
    if nb is not None and nb.is_file():  # the export `awqnb report` did, timed again on the executed notebook
        from awqnb.workbench.html_export import export_html

        t1 = time.perf_counter()
        export_html(nb, out_dir / "reexport.html", True)
        html_s = time.perf_counter() - t1
        (out_dir / "reexport.html").unlink()
    metrics = json.loads((rdir / "metrics.json").read_text()) if rdir and (rdir / "metrics.json").is_file() else {}
    events = read_jsonl(cell_log)
    rec = {"step": step, "command": cmd, "returncode": rc, "wall_s": wall, "state": run.get("state"),
           "error": run.get("error"), "notebook_s": run.get("seconds"), "html_export_s": html_s,
           "run_dir": str(rdir) if rdir else None, "run_setup": metrics.get("run_setup"),
           "cells": [e for e in events if e["kind"] == "cell"], "bars": [e for e in events if e["kind"] == "bar"],
           "runs": next((e["runs"] for e in events if e["kind"] == "runs"), None)}
    if rc != 0:
        rec["log_tail"] = log_path.read_text()[-3000:]
    rec["sections"] = sections(rec)
    return rec


def _cell_section(c: dict, bars: list[dict]) -> str:
    calls = set(c.get("calls") or [])
    if c.get("first_line", "").startswith(("import ", "from ")):
        return "setup (imports, checks)"
    if "run_comparison" in calls:
        return "quantize + evaluate (all methods, seeds)"
    if "load_model" in calls:
        ranked = any(b["cell"] == c["cell"] and b["desc"].startswith("sensitivity") for b in bars)
        return "load + sensitivity ranking" if ranked else "load"
    if "pareto" in calls:
        return "plans (pareto)"
    if "sensitivity" in calls:
        return "sensitivity pass"
    if calls & {"salience_table", "preactivation_risk", "preactivation_hist"}:
        return "diagnostics (salience, risk)"
    if calls & {"quantize_layer", "capture_layer_inputs"}:
        return "quantize layer"
    if calls & {"rounding_error", "layer_mse"}:
        return "layer error"
    return "figures, tables, metrics"


def sections(rec: dict) -> list[dict]:
    """(section, seconds, peak GB) rows: cells grouped by what they call, the runner's per-method/seed
    quantize records, the evaluation / sensitivity / pareto bars, HTML export and the rest."""
    rows: dict[str, dict] = {}
    for c in rec["cells"]:
        s = _cell_section(c, rec["bars"])
        r = rows.setdefault(s, {"section": s, "seconds": 0.0, "peak_gb": None, "cells": 0})
        r["seconds"] += c["seconds"]
        r["cells"] += 1
        if c.get("peak_bytes") is not None:
            r["peak_gb"] = max(r["peak_gb"] or 0.0, gb(c["peak_bytes"]))
    out = list(rows.values())
    bars = list(rec["bars"])
    for run in rec.get("runs") or []:
        if run.get("quantize_s") is not None:
            out.append({"section": f"quantize {run['label']} seed {run['seed']}", "seconds": run["quantize_s"],
                        "peak_gb": run.get("peak_mem_gb")})
        for ds, ev in (run.get("eval") or {}).items():
            bar = next((b for b in bars if b["desc"].startswith(f"ppl {ds}")), None)
            if bar is not None:
                bars.remove(bar)
            out.append({"section": f"evaluate {run['label']} seed {run['seed']} {ds}", "seconds": ev["seconds"],
                        "peak_gb": gb(bar["peak_bytes"]) if bar else None})
    comp_cell = [c for c in rec["cells"] if "run_comparison" in (c.get("calls") or [])]
    if comp_cell and rec.get("runs"):
        q = sum(r.get("quantize_s") or 0.0 for r in rec["runs"])
        e = sum(ev["seconds"] for r in rec["runs"] for ev in (r.get("eval") or {}).values())
        out.append({"section": "rest of quantize + evaluate (deep copies, layer MSE of the first seed, calibration "
                               "loading)", "seconds": comp_cell[0]["seconds"] - q - e, "peak_gb": None})
    for b in bars:  # sensitivity, pareto, and evaluations outside the comparison
        out.append({"section": f"bar {b['desc']}", "seconds": b["seconds"], "peak_gb": gb(b["peak_bytes"])})
    if rec.get("html_export_s") is not None:
        out.append({"section": "HTML export (timed again by the bench)", "seconds": rec["html_export_s"], "peak_gb": None})
    cells_s = sum(c["seconds"] for c in rec["cells"])
    out.append({"section": "outside cells (CLI and kernel start, papermill, HTML export, index)", "seconds": rec["wall_s"] - cells_s,
                "peak_gb": None})
    peaks = [c["peak_bytes"] for c in rec["cells"] if c.get("peak_bytes") is not None]
    out.append({"section": "TOTAL (CLI wall)", "seconds": rec["wall_s"], "peak_gb": gb(max(peaks)) if peaks else None})
    return out


def alpha_step(args, params: dict) -> dict:
    """The α explorer through the widgets' API (bench/widgets_latency.py's way), in this process."""
    import tempfile

    import torch

    from awqnb.analysis.statcache import DiagnosticsCache
    from awqnb.model.data import load_calibration
    from awqnb.model.devices import resolve_device
    from awqnb.model.loading import load_model
    from awqnb.workbench.widgets import AlphaExplorer

    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    peak = (lambda: torch.cuda.max_memory_allocated(dev) / 1e9) if cuda else (lambda: None)
    t0 = time.perf_counter()
    model, tok = load_model(str(args.model_dir))
    calib = load_calibration(tok, "wikitext2", n_calib=params["n_calib"], seqlen=params["calib_seqlen"], seed=42)
    load_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    rec = {"step": "alpha", "layer": args.layer, "device": str(dev), "load_s": load_s, "params": params,
           "calibration": calib.to_dict(), "groups": {}}
    with tempfile.TemporaryDirectory() as cache_dir:
        t0 = time.perf_counter()
        ex = AlphaExplorer(model, calib, layer=args.layer, group="gate_up", n_grid=params["n_grid"],
                           max_tokens=params["max_tokens"], n_seq=params["n_seq"], device=dev,
                           model_name=str(args.model_dir), cache=DiagnosticsCache(cache_dir), widget=False)
        rec["build_s"] = time.perf_counter() - t0
        rec["build_peak_gb"] = peak()
        for g in ("gate_up", "down"):  # layer 28's MLP
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            if ex.widgets["group"].value != g:
                ex.widgets["group"].value = g  # recomputes the curve, as a user's click does
            t = ex.timings()
            rec["groups"][g] = {**t, "peak_gb": peak(), "curve_includes_build": g == "gate_up"}
    rec["sections"] = ([{"section": "load model + calibration", "seconds": load_s, "peak_gb": None},
                        {"section": f"build AlphaExplorer (layer {args.layer}, cold cache)", "seconds": rec["build_s"],
                         "peak_gb": rec["build_peak_gb"]}]
                       + [{"section": f"slider move {g} (max of {len(t['per_alpha_s'])})", "seconds": t["max_s"],
                           "peak_gb": t["peak_gb"]} for g, t in rec["groups"].items()]
                       + [{"section": "curve down (group change)", "seconds": rec["groups"]["down"]["curve_s"],
                           "peak_gb": None}])
    return rec


def walk_step(args, params: dict) -> dict:
    """Streamed evaluation and the sensitivity pass on the model as loaded (on the CPU): time and peak."""
    import torch

    from awqnb.analysis.evaluate import token_perplexity
    from awqnb.analysis.sensitivity import sensitivity
    from awqnb.compare.claims import method_configs
    from awqnb.core.config import QuantConfig, SearchConfig
    from awqnb.model.data import load_calibration, load_eval_tokens, ranking_tokens
    from awqnb.model.devices import resolve_device
    from awqnb.model.loading import load_model

    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"

    def timed(fn):
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(dev)
        return out, time.perf_counter() - t0, (torch.cuda.max_memory_allocated(dev) / 1e9 if cuda else None)

    t0 = time.perf_counter()
    model, tok = load_model(str(args.model_dir))
    tokens = load_eval_tokens(tok, "wikitext2")
    calib = load_calibration(tok, "wikitext2", n_calib=params["n_calib"], seqlen=params["calib_seqlen"], seed=42)
    rank, slice_name = ranking_tokens(tok, "wikitext2", n_windows=params["sens_windows"], seqlen=params["sens_seqlen"],
                                      calib_dataset="wikitext2")
    load_s = time.perf_counter() - t0
    where = sorted({str(p.device) for p in model.parameters()})
    ppl, eval_s, eval_peak = timed(lambda: token_perplexity(model, tokens, seqlen=params["eval_seqlen"],
                                                            max_windows=params["eval_windows"], device=dev,
                                                            placement="stream", progress=False))
    cfg = method_configs(["rtn"], None, QuantConfig(bits=4, group_size=128), SearchConfig())["rtn"]
    sens, sens_s, sens_peak = timed(lambda: sensitivity(model, cfg, calib, rank, device=dev, seqlen=params["sens_seqlen"],
                                                        n_windows=params["sens_windows"], progress=False, cache=False,
                                                        model_name=str(args.model_dir), slice_name=slice_name))
    n_layers = model.config.num_hidden_layers
    rec = {"step": "walk", "device": str(dev), "model_on": where, "num_hidden_layers": n_layers, "params": params,
           "load_s": load_s, "eval": {"ppl": ppl.ppl, "windows": len(ppl.nll), "tokens": sum(ppl.n_tokens),
                                      "placement": ppl.meta.get("placement"), "seconds": eval_s, "peak_gb": eval_peak},
           "sensitivity": {"method": "rtn w4 g128", "rows": len(sens), "slice": slice_name, "seconds": sens_s,
                           "peak_gb": sens_peak, "dtype": "float32"}}
    rec["wall_s"] = load_s + eval_s + sens_s
    rec["sections"] = [{"section": "load model (CPU) + data", "seconds": load_s, "peak_gb": None},
                       {"section": f"evaluate WikiText-2 streamed ({n_layers} layers, {rec['eval']['windows']} windows)",
                        "seconds": eval_s, "peak_gb": eval_peak},
                       {"section": f"sensitivity pass rtn ({n_layers} layers, {len(sens)} rows)", "seconds": sens_s,
                        "peak_gb": sens_peak}]
    return rec


def table(results: dict) -> str:
    lines = ["| step | section | seconds | peak GPU GB |", "|---|---|---:|---:|"]
    for step, rec in results.items():
        for r in rec.get("sections", []):
            p = "—" if r.get("peak_gb") is None else f"{r['peak_gb']:.2f}"
            lines.append(f"| {step} | {r['section']} | {r['seconds']:.2f} | {p} |")
    return "\n".join(lines)


def parse_kv(items) -> dict:
    import yaml

    out = {}
    for kv in items or []:
        k, _, v = kv.partition("=")
        out[k.strip()] = yaml.safe_load(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, type=Path, help="an HF directory (bench/make_shaped_model.py's)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(ALL_STEPS)}")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="soft limit: no new step starts after this many seconds (a running one finishes)")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default bench/results/workbench/...)")
    ap.add_argument("--work-dir", type=Path, default=None, help="notebooks, HTML, logs (default /tmp/awqnb-workbench/<out>)")
    ap.add_argument("--methods", default="rtn,awq,awq_gptq")
    ap.add_argument("--seeds", type=int, default=3, help="calibration seeds of the report (its SEEDS)")
    ap.add_argument("--eval-windows", type=int, default=None, help="WikiText-2 windows (default: the full test set)")
    ap.add_argument("--layer", type=int, default=28)
    ap.add_argument("--report-param", action="append", metavar="K=V", help="extra model_report parameter")
    ap.add_argument("--deep-param", action="append", metavar="K=V", help="extra layer_deep_dive parameter")
    ap.add_argument("--smoke", action="store_true", help="the smallest slices (CPU smoke test on a tiny model)")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in ALL_STEPS]
    if bad:
        ap.error(f"unknown step(s) {bad}; use {', '.join(ALL_STEPS)}")
    if not (args.model_dir / "config.json").is_file():
        ap.error(f"{args.model_dir} has no config.json: write one with bench/make_shaped_model.py")
    out = args.out or run_dir("workbench", args.model_dir.name, args.device, "smoke" if args.smoke else None)
    work = args.work_dir or Path("/tmp/awqnb-workbench") / out.name
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    write_run_info(out, args.device)
    cfg = json.loads((args.model_dir / "config.json").read_text())
    rw = args.model_dir / "random_weights.json"
    info = {"command": "python " + " ".join(sys.argv), "device": args.device, "environment": environment(args.device),
            "model_dir": str(args.model_dir), "checkpoint_dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
            "num_hidden_layers": cfg.get("num_hidden_layers"),
            "random_weights": json.loads(rw.read_text()) if rw.is_file() else None,
            "smoke": args.smoke, "steps": steps, "budget_s": args.budget_s,
            "note": ("smoke test on a random tiny model: CPU timings of the smallest slices, not workbench figures"
                     if args.smoke else "random weights: diagnostics meaningless; time and memory real")}
    prev = out / "run_info.json"
    if prev.is_file():  # a resumed run: keep every invocation's command
        info["earlier_commands"] = (lambda d: d.get("earlier_commands", []) + [d["command"]])(json.loads(prev.read_text()))
    prev.write_text(json.dumps(info, indent=1) + "\n")

    report_p = dict(SEEDS=args.seeds, SENSITIVITY=True, eval_windows=args.eval_windows, device=args.device)
    deep_p = dict(device=args.device)
    alpha_p = dict(n_calib=16, calib_seqlen=512, n_grid=20, max_tokens=512, n_seq=2)  # the notebook's defaults
    walk_p = dict(eval_seqlen=2048, eval_windows=args.eval_windows, n_calib=128, calib_seqlen=512, sens_windows=8,
                  sens_seqlen=512)  # the report's
    if args.smoke:
        report_p.update(SMOKE_REPORT)
        deep_p.update(SMOKE_DEEP)
        alpha_p.update(SMOKE_ALPHA)
        walk_p.update(eval_seqlen=128, eval_windows=1, n_calib=2, calib_seqlen=64, sens_windows=1, sens_seqlen=64)
    if args.eval_windows is not None:
        report_p["eval_windows"] = args.eval_windows
    report_p.update(parse_kv(args.report_param))
    deep_p.update(parse_kv(args.deep_param))

    t_start = time.perf_counter()
    results = {}
    for step in ALL_STEPS:
        path = out / f"{step}.json"
        if path.is_file():
            results[step] = json.loads(path.read_text())
            if step in steps:
                print(f"[{step}] done earlier: {path}", flush=True)
            continue
        if step not in steps:
            continue
        spent = time.perf_counter() - t_start
        if args.budget_s is not None and spent > args.budget_s:
            print(f"[{step}] not started: {spent:.0f} s spent of the {args.budget_s:.0f} s budget; run again to resume",
                  flush=True)
            continue
        if step == "report":
            rec = run_cli(step, args, "model_report", args.methods, report_p, work)
        elif step in ("deep28", "deepsens"):
            layer = args.layer if step == "deep28" else "most_sensitive"
            rec = run_cli(step, args, "layer_deep_dive", args.methods, {**deep_p, "LAYER": layer}, work)
        elif step == "walk":
            rec = walk_step(args, walk_p)
        else:
            rec = alpha_step(args, alpha_p)
        rec["smoke"] = args.smoke
        if rec.get("state", "ok") != "ok" or rec.get("returncode", 0) != 0:
            print(f"[{step}] FAILED ({rec.get('error')}); not recorded as done. See {work / step / 'cli.log'}",
                  flush=True)
            (out / f"{step}.failed.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")
            continue
        path.write_text(json.dumps(rec, indent=1, default=str) + "\n")
        results[step] = rec
        print(f"[{step}] {rec.get('wall_s', rec.get('build_s', 0)):.1f} s -> {path}", flush=True)
    md = table(results)
    head = (f"# workbench: {args.model_dir.name} on {args.device}\n\n{info['note']}.\n\n"
            f"Command: `{info['command']}`\n\n")
    (out / "summary.md").write_text(head + md + "\n")
    print(md)
    missing = [s for s in steps if s not in results]
    if missing:
        print(f"not done: {', '.join(missing)}", flush=True)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
