"""How fast the α explorer answers: build time, group changes and α-slider moves on a real model.

    python bench/widgets_latency.py [--model smollm2-135m | PATH] [--layer 28] [--n-calib 16]
        [--device cpu | cuda:0] [--groups qkv,vo,gate_up,down] [--alphas 0,0.25,0.5,0.75,1]
        [--threads N] [--out DIR]

The model is loaded on the CPU (`--model-device`) and left there: the explorer walks it with the
block engine and keeps only the sampled block and its token sample on `--device`. Steps: build the
`AlphaExplorer` on `--layer` (cold diagnostics cache: salience pass, token sample, the first group's
curve and first update), then for each group in `--groups` the curve time (a group change) and one
α-slider move per value of `--alphas` (at least 3; `AlphaExplorer.timings`), driven through the
widgets' own API as a user's slider would. Every move time is kept; the table shows the median
and the max against the 1 s budget. After the run the model's tensors are checked to still be
where they were loaded (`model_left_in_place`).

Writes `<out>/widgets_latency.json` (default out: bench/results/widgets_latency/<date>_<device>_<model>/)
with command.txt and environment.json beside it. A directory from bench/make_shaped_model.py has
random weights (its random_weights.json is copied into the record): the times are real, the curves
mean nothing.

  python bench/widgets_latency.py --model /data/llama3-8b-random --layer 28 --device cuda:0 --groups gate_up,down
  python bench/widgets_latency.py --model tiny-random-llama --layer 1 --device cpu   # CPU smoke, seconds
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import run_dir, write_run_info  # noqa: E402
from awqnb.core.files import atomic_write  # noqa: E402
from awqnb.model.data import load_calibration  # noqa: E402
from awqnb.model.devices import resolve_device  # noqa: E402
from awqnb.model.loading import load_model  # noqa: E402
from awqnb.model.provenance import versions  # noqa: E402
from awqnb.workbench.widgets import AlphaExplorer  # noqa: E402


def _placement(model) -> dict:
    return {n: (str(t.device), str(t.dtype)) for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="alias or HF directory (e.g. make_shaped_model.py's)")
    ap.add_argument("--layer", type=int, default=28)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-grid", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--n-seq", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the explorer computes (cuda:0, cpu)")
    ap.add_argument("--model-device", default="cpu", help="where the model is loaded and stays")
    ap.add_argument("--groups", default=None, help="comma-separated scale groups (default: all)")
    ap.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="slider positions, one move each (≥ 3)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    if len(alphas) < 3:
        ap.error("--alphas needs at least 3 slider positions (the median of ≥ 3 moves is reported).")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    out = args.out or run_dir("widgets_latency", Path(args.model).name, dev, f"layer{args.layer}")
    write_run_info(out, dev, [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv))

    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=resolve_device(args.model_device))
    calib = load_calibration(tok, "wikitext2", n_calib=args.n_calib, seqlen=args.calib_seqlen, seed=42)
    load_s = time.perf_counter() - t0
    home = _placement(model)
    rw = Path(args.model) / "random_weights.json"
    rec = {"model": args.model, "layer": args.layer, "device": str(dev), "model_device": args.model_device,
           "threads": torch.get_num_threads(), "calibration": calib.to_dict(), "group_size": args.group_size,
           "n_grid": args.n_grid, "max_tokens": args.max_tokens, "n_seq": args.n_seq, "alphas": alphas,
           "random_weights": json.loads(rw.read_text()) if rw.is_file() else None, "versions": versions(),
           "load_s": load_s, "groups": {}}
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    with tempfile.TemporaryDirectory() as cache_dir:
        from awqnb.analysis.statcache import DiagnosticsCache

        groups = args.groups.split(",") if args.groups else None
        t0 = time.perf_counter()
        ex = AlphaExplorer(model, calib, layer=args.layer, group=groups[0] if groups else None,
                           group_size=args.group_size, n_grid=args.n_grid, max_tokens=args.max_tokens,
                           n_seq=args.n_seq, device=dev, model_name=args.model,
                           cache=DiagnosticsCache(cache_dir), widget=False)
        if cuda:
            torch.cuda.synchronize(dev)
        rec["build_s"] = time.perf_counter() - t0
        smp = ex.layer_sample(ex.widgets["layer"].value)
        first = ex.last_update_s - smp.seconds  # the first update opened the layer, then drew its curve
        rec["build_parts_s"] = {"salience_pass": smp.salience_seconds, "token_sample": smp.seconds - smp.salience_seconds,
                                "first_curve_and_update": first, "rest": rec["build_s"] - ex.last_update_s}
        rec["sample_tokens"] = smp.n_tok
        rec["build_peak_gpu_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9 if cuda else None
        groups = groups or [g.name for g in ex.spec.groups]
        for g in groups:
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            if ex.widgets["group"].value != g:
                ex.widgets["group"].value = g  # recomputes the curve, as a user's click does
            t = ex.timings(tuple(alphas))
            rec["groups"][g] = {"curve_s": t["curve_s"], "curve_includes_build": g == groups[0],
                                "move_s": t["per_alpha_s"], "move_median_s": statistics.median(t["per_alpha_s"]),
                                "move_max_s": t["max_s"],
                                "peak_gpu_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if cuda else None}
    rec["model_left_in_place"] = _placement(model) == home
    rec["device_blocks_held"] = list(ex._on)
    path = atomic_write(Path(out) / "widgets_latency.json", json.dumps(rec, indent=1) + "\n")

    v = rec["versions"]
    print(f"model={args.model} layer={args.layer} device={dev} (model on {args.model_device}) "
          f"threads={rec['threads']} calibration=wikitext2 {args.n_calib}x{args.calib_seqlen} seed 42 "
          f"W4 g{args.group_size} torch={v.get('torch')}"
          + ("  RANDOM WEIGHTS: times are real, curves mean nothing" if rec["random_weights"] else ""))
    bp = rec["build_parts_s"]
    print(f"load {load_s:.2f} s; build (cold cache) {rec['build_s']:.2f} s = salience pass {bp['salience_pass']:.2f} s"
          f" + token sample {bp['token_sample']:.2f} s + first curve and update {bp['first_curve_and_update']:.2f} s"
          f" + widgets {bp['rest']:.2f} s"
          + (f"; peak GPU {rec['build_peak_gpu_gb']:.2f} GB" if cuda else ""))
    print(f"model left where it was loaded: {rec['model_left_in_place']}\n")
    print(f"{'group':9} {'curve s':>8} {'move median s':>14} {'move max s':>11} {'max / 1 s':>10}  moves (s)")
    for g, r in rec["groups"].items():
        mark = "*" if r["curve_includes_build"] else " "
        print(f"{g + mark:9} {r['curve_s']:8.3f} {r['move_median_s']:14.4f} {r['move_max_s']:11.4f} "
              f"{r['move_max_s'] / 1.0:10.3f}  " + " ".join(f"{s:.4f}" for s in r["move_s"]))
    print(f"\n* {groups[0]}'s curve time includes building the explorer (token sample, salience pass).")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
