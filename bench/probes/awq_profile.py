"""Where `awq`'s time goes at 8B: one warm-up run, then `pipeline.quantize` under torch.profiler on
a random-init shape with N layers (bench/scale.py's builder), 128 × 512 random token ids, W4 g128.
Writes profile.json (the run's phase timings, the top ops by device time and by host time) and
profile.md (the same as tables). A probe for the next speed change, not a benchmark: the profiler
itself slows the host side.

  python bench/probes/awq_profile.py --shape llama3-8b:2 --method awq --device cuda:0 --out DIR
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from awqnb.core.config import QuantConfig, SearchConfig  # noqa: E402
from awqnb.quant import pipeline  # noqa: E402
from awqnb.quant.method_config import MethodConfig  # noqa: E402
from scale import build_spec, calibration  # noqa: E402


def _table(events, key: str, top: int) -> list[dict]:
    rows = sorted(events, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count,
             "device_total_ms": round((getattr(e, "device_time_total", 0) or 0) / 1e3, 2),
             "host_self_ms": round(e.self_cpu_time_total / 1e3, 2),
             "host_total_ms": round(e.cpu_time_total / 1e3, 2)} for e in rows]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b:2")
    p.add_argument("--method", default="awq")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    base, cfg = build_spec(args.shape)
    calib = calibration(cfg.vocab_size, args.n_calib, 512, 42)
    qcfg = MethodConfig(args.method, QuantConfig(4, 128), SearchConfig(), calib_batch_size=16)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    warm = pipeline.quantize(copy.deepcopy(base), qcfg, calib, device=dev, progress=False)
    warm_s = time.perf_counter() - t0
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        res = pipeline.quantize(base, qcfg, calib, device=dev, progress=False)
        prof_s = time.perf_counter() - t0
    ev = prof.key_averages()
    out = {"shape": args.shape, "method": args.method, "bits": 4, "group_size": 128,
           "calibration": f"{args.n_calib} x 512 random token ids, seed 42", "device": str(dev),
           "gpu": torch.cuda.get_device_name(dev) if cuda else None, "torch": torch.__version__,
           "warm_run_s": round(warm_s, 3), "warm_timings": {k: v for k, v in warm.timings.items()
                                                           if isinstance(v, (int, float))},
           "profiled_run_s": round(prof_s, 3),
           "profiled_timings": {k: v for k, v in res.timings.items() if isinstance(v, (int, float))},
           "by_device_time": _table(ev, "device_time_total", args.top),
           "by_host_self_time": _table(ev, "self_cpu_time_total", args.top)}
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "profile.json").write_text(json.dumps(out, indent=1))
    md = [f"# {args.method} on {args.shape}: warm run {warm_s:.2f} s, profiled run {prof_s:.2f} s ({out['gpu']})", ""]
    for key in ("by_device_time", "by_host_self_time"):
        md += [f"## {key}", "", "| op | calls | device total ms | host self ms | host total ms |", "|---|---:|---:|---:|---:|"]
        md += [f"| {r['op']} | {r['calls']} | {r['device_total_ms']} | {r['host_self_ms']} | {r['host_total_ms']} |"
               for r in out[key]] + [""]
    (d / "profile.md").write_text("\n".join(md))
    sys.stdout.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
