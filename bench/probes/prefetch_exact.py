"""The engine's block prefetch on a GPU: awq and gptq with prefetch on and off, same run, must give
bit-identical weights (the prefetch only moves tensors earlier, on a side stream). Random-init
Llama-3-8B shape with N layers (bench/scale.py's builder), 32 × 512 random token ids, W4 g128.
Prints and writes prefetch_exact.json (time with and without, all repeats, and the verdict).

  python bench/probes/prefetch_exact.py --shape llama3-8b:4 --device cuda:0 --out DIR
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

import awqnb.engine.walk as walk  # noqa: E402
from awqnb.core.config import QuantConfig, SearchConfig  # noqa: E402
from awqnb.quant import pipeline  # noqa: E402
from awqnb.quant.method_config import MethodConfig  # noqa: E402
from scale import build_spec, calibration  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b:4")
    p.add_argument("--methods", default="awq,gptq")
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    base, cfg = build_spec(args.shape)
    calib = calibration(cfg.vocab_size, args.n_calib, 512, 42)
    orig = walk.BlockEngine.__init__
    rows = []
    for method in args.methods.split(","):
        qcfg = MethodConfig(method, QuantConfig(4, 128), SearchConfig(), calib_batch_size=16)
        got = {}
        for flag in (False, True, False, True):
            def forced(self, *a, _f=flag, **kw):
                kw["prefetch"] = _f
                orig(self, *a, **kw)
            walk.BlockEngine.__init__ = forced
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            res = pipeline.quantize(m, qcfg, calib, device=args.device, progress=False)
            wall = time.perf_counter() - t0
            walk.BlockEngine.__init__ = orig
            got.setdefault(flag, []).append((wall, res.timings.get("peak_gpu_gb"), res.timings.get("engine_onload_s")))
            if flag not in got.get("model", {}):
                got.setdefault("model", {})[flag] = m
            else:
                del m
        a, b = got["model"][False], got["model"][True]
        same = all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
        row = {"shape": args.shape, "method": method, "bit_identical": same,
               "off": got[False], "on": got[True]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del got
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefetch_exact.json").write_text(json.dumps({"argv": sys.argv, "rows": rows,
                                                         "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None},
                                                        indent=1))
    return 0 if all(r["bit_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
