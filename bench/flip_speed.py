"""Wall time of plain awq vs the flip-rounding methods (awq_sh, awq_dh, awq_js, awq_gqa), same model,
same calibration set, same device, in one run; prints each method's time as a ratio to awq.
Target (METHODS.md): awq_sh <= 1.2x awq.

    python bench/flip_speed.py [--model smollm2-135m] [--device auto] [--n-calib 128]
        [--calib-seqlen 512] [--group-size 128] [--n-grid 20] [--repeats 1]
        [--methods awq,awq_sh,awq_dh,awq_js,awq_gqa] [--json out.json]

Each timed run quantizes a fresh copy of the FP model with `pipeline.quantize` (capture, scale
search, rounding, ReFlip: everything) and synchronises the device before reading the clock.
An untimed awq run first warms the device up (disable with --no-warmup). With --repeats > 1 the
methods are interleaved and each method's fastest run is reported. 'cpu s' is the process's CPU
time (less disturbed than wall time by other jobs on a shared CPU machine; meaningless for GPU
runs, where the wall-time ratio is the one to read).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from awqnb.quant import pipeline  # noqa: E402
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig  # noqa: E402
from awqnb.model.data import load_calibration  # noqa: E402
from awqnb.model.devices import resolve_device  # noqa: E402
from awqnb.model.loading import load_model
from awqnb.model.provenance import versions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _summary(res) -> dict:
    """Flip counts and objective changes over all blocks, from the evidence."""
    flips = sum(e["flips"] for r in res.layers for e in r.evidence.get("flip", {}).values())
    eb = [e["e_before"]["mean"] for r in res.layers for e in r.evidence.get("flip", {}).values()]
    ea = [e["e_after"]["mean"] for r in res.layers for e in r.evidence.get("flip", {}).values()]
    out = {"flips": flips}
    if eb:
        out["mean|e| before->after"] = f"{sum(eb) / len(eb):.3g}->{sum(ea) / len(ea):.3g}"
    gq = [r.evidence["gqa"]["rel_improvement"] for r in res.layers if "gqa" in r.evidence]
    if gq:
        out["reflip score err -%"] = f"{100 * sum(gq) / len(gq):.1f}"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--calib-dataset", default="wikitext2")
    ap.add_argument("--calib-batch-size", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-grid", type=int, default=20)
    ap.add_argument("--methods", default="awq,awq_sh,awq_dh,awq_js,awq_gqa")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    ap.add_argument("--json", default=None, help="also write the timings here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    if "awq" not in methods:
        methods.insert(0, "awq")
    device = resolve_device(args.device)
    fp, tok = load_model(args.model)
    calib = load_calibration(tok, args.calib_dataset, n_calib=args.n_calib, seqlen=args.calib_seqlen, seed=0)

    def cfg(method):
        return MethodConfig(method, QuantConfig(4, args.group_size), SearchConfig(n_grid=args.n_grid),
                            calib_batch_size=args.calib_batch_size)

    def run(method):
        model = copy.deepcopy(fp)
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        res = pipeline.quantize(model, cfg(method), calib, device=device, progress=False)
        _sync(device)
        dt, ct = time.perf_counter() - t0, time.process_time() - c0
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return dt, ct, res

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    print(f"model={args.model} device={device} {gpu} n_calib={args.n_calib} seqlen={args.calib_seqlen} "
          f"group_size={args.group_size} n_grid={args.n_grid} repeats={args.repeats} torch={torch.__version__}")
    if args.warmup:
        run("awq")
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    info: dict[str, dict] = {}
    for _ in range(args.repeats):
        for m in dict.fromkeys(methods):
            dt, ct, res = run(m)
            best[m] = min(dt, best.get(m, float("inf")))
            cpu[m] = min(ct, cpu.get(m, float("inf")))
            info[m] = _summary(res)
    base = best["awq"]
    print(f"\n{'method':<10} {'seconds':>9} {'x awq':>7} {'cpu s':>9} {'x awq':>7}  details")
    for m in dict.fromkeys(methods):
        extra = "  ".join(f"{k}={v}" for k, v in info[m].items())
        print(f"{m:<10} {best[m]:>9.2f} {best[m] / base:>7.3f} {cpu[m]:>9.2f} {cpu[m] / cpu['awq']:>7.3f}  {extra}")
    verdict = ""
    if "awq_sh" in best:
        r = best["awq_sh"] / base
        verdict = f"awq_sh / awq = {r:.3f}x (target <= 1.2x): {'OK' if r <= 1.2 else 'SLOWER THAN TARGET'}"
        print("\n" + verdict)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(device), "gpu": gpu,
                                               "seconds": best, "cpu_seconds": cpu,
                                               "ratio_vs_awq": {m: best[m] / base for m in best},
                                               "details": info, "versions": versions()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
