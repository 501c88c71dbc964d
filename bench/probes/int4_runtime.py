"""Int4Linear (awqnb.export.int4, torch's built-in int4 kernel) against a bf16 nn.Linear, single
matmuls of Llama-3-8B's linear shapes (K→N: 4096→4096 q/o, 4096→14336 gate/up, 14336→4096 down,
4096→1024 k/v), random W4 g128 asymmetric codes (q, z uniform in [0, 15], scales in [0.005, 0.025]),
M = 1, 8, 32, 128, 2048 rows of x ~ N(0, 1) in bf16. Three implementations per (shape, M):
    bf16      nn.Linear with the dequantized weight W = (q − z)·s in bf16
    int4      Int4Linear on torch's int4 kernel (tinygemm layout; the runtime's path)
    dequant   Int4Linear's fallback: nibble codes dequantized to bf16 at every call, then a bf16 matmul
              (a candidate for prefill / large M, where the int4 kernel was seen slower than bf16)
Correctness: relative error ‖y − y_ref‖/‖y_ref‖ against the float32 product of the same codes (y_ref =
x·Wᵀ in float32), and int4's against the bf16 linear's output. Timing: CUDA events around `iters` back-
to-back calls (iters chosen for ~20 ms a repeat), 5 repeats, median; every repeat is kept. The weights
are not flushed from L2 between calls (a 4096×4096 bf16 weight, 32 MiB, fits the H200's L2).

  python bench/probes/int4_runtime.py                 # the H200: JSON to $OUT/int4_runtime.json, < 60 s
  python bench/probes/int4_runtime.py --cpu --small   # CPU smoke test: shapes / 16; its times are CPU
                                                      # times of tiny shapes and say nothing about the GPU

Reads nothing outside the repo; writes only the JSON (to --out, default $OUT, else the current directory).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: awqnb without installing it

from awqnb.export.int4 import Int4Linear  # noqa: E402

SHAPES = [("q_o", 4096, 4096), ("gate_up", 4096, 14336), ("down", 14336, 4096), ("k_v", 4096, 1024)]  # name, K, N
ROWS = [1, 8, 32, 128, 2048]
GROUP = 128
REPEATS = 5
TARGET_S = 0.02  # seconds of calls per repeat (GPU; the CPU smoke test: 2 ms)


def codes(n: int, k: int, group: int, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, device=device, dtype=torch.int32)
    z = torch.randint(0, 16, (n, k // group), generator=g, device=device).float()
    s = torch.rand(n, k // group, generator=g, device=device) * 0.02 + 0.005
    return q, s, z


def dense_weight(q, s, z, group: int) -> torch.Tensor:
    return (q.float() - z.repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)


class Clock:
    """Seconds of `fn()` × iters: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, iters: int) -> float:
        self.sync()
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return time.perf_counter() - t


def time_impl(clock: Clock, fn) -> dict:
    for _ in range(3 if clock.cuda else 1):  # warm-up: kernels chosen, caches filled
        fn()
    one = max(clock(fn, 1), 1e-6)
    iters = int(min(200, max(1, (TARGET_S if clock.cuda else 0.002) / one)))
    reps = [clock(fn, iters) / iters * 1e3 for _ in range(REPEATS)]
    return {"ms_median": statistics.median(reps), "ms_repeats": reps, "iters": iters}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def nibble_order_check(device) -> dict:
    """CUDA only: the raw aten op with both nibble orders of its uint8 [N, K/2] input, against the
    float32 product. Int4Linear packs even k in the high nibble (int4mm.cu's comment, torchao's
    packing); the right order gives bf16 rounding (~3e-3), the wrong one an error near 1."""
    if device.type != "cuda":
        return {}
    n, k = 256, 512
    q, s, z = codes(n, k, GROUP, device, seed=99)
    sz = torch.stack([s, (8 - z) * s], -1).transpose(0, 1).contiguous().bfloat16()
    x = torch.randn(8, k, device=device).bfloat16()
    ref = x.float() @ dense_weight(q, s, z, GROUP).t()
    out = {}
    for name, (hi, lo) in {"even_high": (q[:, 0::2], q[:, 1::2]), "odd_high": (q[:, 1::2], q[:, 0::2])}.items():
        packed = torch.ops.aten._convert_weight_to_int4pack(((hi << 4) | lo).to(torch.uint8).contiguous(), 8)
        out[name] = rel(torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz), ref)
    return out


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke test of this script)")
    ap.add_argument("--small", action="store_true", help="shapes divided by 16 (K 256 / 896, still g128)")
    ap.add_argument("--out", default=os.environ.get("OUT") or ".", help="directory for int4_runtime.json (default $OUT)")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        sys.stderr.write("int4_runtime: no CUDA device; run with --cpu --small for a smoke test\n")
        return 2
    device = torch.device("cpu" if args.cpu else "cuda:0")
    div = 16 if args.small else 1
    shapes = [(nm, k // div, n // div) for nm, k, n in SHAPES]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "int4_runtime.json"
    t_start = time.perf_counter()
    doc = {
        "what": "Int4Linear (torch int4 kernel) vs bf16 nn.Linear, random W4 g128 asymmetric codes",
        "smoke_test": bool(args.cpu),
        "note": ("CPU smoke test: CPU times of reduced shapes, not GPU figures" if args.cpu else
                 "single matmuls, weights not flushed from L2 between calls"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "group_size": GROUP, "rows": ROWS, "repeats": REPEATS, "dtype": "bfloat16",
        "shapes": [{"name": nm, "K": k, "N": n} for nm, k, n in shapes],
        "results": [], "memory": [],
    }
    clock = Clock(device)
    doc["nibble_order_rel_err"] = nibble_order_check(device)
    for i, (nm, k, n) in enumerate(shapes):
        q, s, z = codes(n, k, GROUP, device, seed=i)
        w = dense_weight(q, s, z, GROUP)  # float32 reference weight
        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        lin.weight.copy_(w)
        clock.sync()
        t0 = time.perf_counter()
        int4 = Int4Linear.from_codes(q, s, z, GROUP, dtype=torch.bfloat16, device=device, kernel="tinygemm")
        clock.sync()
        pack_s = time.perf_counter() - t0
        impls = {"bf16": lin, "int4": int4,
                 "dequant": Int4Linear.from_codes(q, s, z, GROUP, dtype=torch.bfloat16, device=device, kernel="dequant")}
        doc["memory"].append({"shape": nm, "bf16_bytes": n * k * 2, "int4_bytes": impls["int4"].nbytes(),
                              "dequant_bytes": impls["dequant"].nbytes(), "int4_pack_seconds": pack_s})
        del q
        for m in ROWS:
            x = torch.randn(m, k, device=device, generator=torch.Generator(device=device).manual_seed(1000 + m)).bfloat16()
            ref = x.float() @ w.t()
            ys = {name: mod(x) for name, mod in impls.items()}
            for name, mod in impls.items():
                row = {"shape": nm, "K": k, "N": n, "M": m, "impl": name, "rel_err_vs_fp32": rel(ys[name], ref),
                       "rel_err_vs_bf16_linear": rel(ys[name], ys["bf16"])}
                row.update(time_impl(clock, lambda mod=mod: mod(x)))
                doc["results"].append(row)
                print(f"{nm:8s} M={m:5d} {name:8s} {row['ms_median']:9.4f} ms  err/fp32 {row['rel_err_vs_fp32']:.2e}",
                      flush=True)
        del w, impls
        if device.type == "cuda":
            torch.cuda.empty_cache()
        doc["seconds"] = time.perf_counter() - t_start
        dest.write_text(json.dumps(doc, indent=1))  # after each shape: a cut run keeps what it finished
    base = {(r["shape"], r["M"]): r["ms_median"] for r in doc["results"] if r["impl"] == "bf16"}
    doc["ratio_to_bf16"] = [{"shape": r["shape"], "M": r["M"], "impl": r["impl"],
                             "time_ratio": r["ms_median"] / base[(r["shape"], r["M"])]}
                            for r in doc["results"] if r["impl"] != "bf16"]
    doc["seconds"] = time.perf_counter() - t_start
    dest.write_text(json.dumps(doc, indent=1))
    print(f"wrote {dest} ({doc['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
