"""Int4Linear's kernels (awqnb.export.int4) against a bf16 nn.Linear, single matmuls of Llama-3-8B's
linear shapes (K→N: 4096→4096 q/o, 4096→14336 gate/up, 14336→4096 down, 4096→1024 k/v), random W4
g128 asymmetric codes (q, z uniform in [0, 15], scales in [0.005, 0.025]), M = 1, 8, 32, 128, 2048
rows of x ~ N(0, 1) in bf16. Implementations per (shape, M):
    bf16      nn.Linear (F.linear) with the dequantized weight W = (q − z)·s in bf16
    torch     Int4Linear on torch's int4pack kernel (`_weight_int4pack_mm`; called "int4" in the
              2026-12-03 results)
    gemlite   Int4Linear on gemlite's Triton kernels (GEMV_REVSPLITK M ≤ 4, GEMM_SPLITK ≤ 64, GEMM
              above), (q − z)·s mode; skipped with the reason recorded when gemlite is not importable
    gemlite_fma  (--fma only) gemlite's default fma mode, q·s + (−z·s), for its speed/precision cost
    dequant   Int4Linear's fallback: nibble codes dequantized to bf16 at every call by unfused eager
              ops, then a bf16 matmul
    dequant+mm  Int4Linear's prefill path (what it runs above `prefill_rows`, 128 by default) at every
              M: gemlite's packed copy (the nibbles where gemlite is absent) dequantized to bf16 by
              ONE torch.compile'd kernel, then F.linear (cuBLAS); the compile happens at the first
              call (warm-up, not timed; its seconds are recorded per shape as `compile_s`), and the
              dequantization alone is timed per shape (`dequant_only_ms`). On the CPU smoke test the
              dequantization runs as eager ops (awqnb compiles it on CUDA only).
The 4-bit columns (torch, gemlite, dequant) are their kernels at every M (prefill_rows None).
Correctness: relative error ‖y − y_ref‖/‖y_ref‖ against the float32 product of the same codes (y_ref =
x·Wᵀ, the dequantized product), and against the bf16 linear's output. Timing: CUDA events around
`iters` back-to-back calls (iters chosen for ~15 ms a repeat), 3 repeats, median; every repeat is
kept; on CUDA also the same calls captured in a CUDA graph and replayed (`graph_ms_*`: kernel
time without Python's launch overhead, which dominates eager calls at small M). The weights are
not flushed from L2 between calls (a 4096×4096 bf16 weight, 32 MiB, fits the H200's L2). gemlite's autotune config: an H200 matches none of its shipped GPU names, so the H100
file is loaded (recorded as `gemlite_config`); the first call per (M bucket, shape) still compiles
the Triton kernel (warm-up, not timed). A time budget (--budget-s, 45 s: the run stays under 60 s) stops the loop early, and
the JSON + markdown are rewritten after every (shape, M): a cut run keeps what it finished.

  python bench/probes/int4_runtime.py --out DIR        # the H200: DIR/int4_runtime.{json,md}, < 60 s
  python bench/probes/int4_runtime.py --cpu --small    # CPU smoke test: shapes / 16; its times are CPU
                                                       # times of tiny shapes and say nothing about the GPU

Reads nothing outside the repo; writes only the JSON and markdown (to --out, default $OUT, else .).
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

from awqnb.export import int4  # noqa: E402
from awqnb.export.int4 import Int4Linear  # noqa: E402

SHAPES = [("q_o", 4096, 4096), ("gate_up", 4096, 14336), ("down", 14336, 4096), ("k_v", 4096, 1024)]  # name, K, N
ROWS = [1, 8, 32, 128, 2048]
GROUP = 128
REPEATS = 3
TARGET_S = 0.015  # seconds of calls per repeat (GPU; the CPU smoke test: 2 ms)


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


def time_graph(fn, iters: int) -> dict:
    """CUDA only: `iters` calls captured in one CUDA graph, replayed REPEATS times: the kernels'
    time without Python's launch overhead (what a graphed decode step sees). {} if capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fn()
        g.replay()
        torch.cuda.synchronize()
        reps = []
        for _ in range(REPEATS):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            reps.append(a.elapsed_time(b) / iters)
        del g
        return {"graph_ms_median": statistics.median(reps), "graph_ms_repeats": reps, "graph_iters": iters}
    except Exception as e:  # noqa: BLE001 - a kernel that cannot be captured is a finding
        torch.cuda.synchronize()
        return {"graph_failed": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}


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


def markdown(doc: dict) -> str:
    """The results as a table: median ms per impl, its ratio to bf16, its relative error."""
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in doc["results"])]
    base = {(r["shape"], r["M"]): r["ms_median"] for r in doc["results"] if r["impl"] == "bf16"}
    cell = {(r["shape"], r["M"], r["impl"]): r for r in doc["results"]}
    lines = [f"# int4 kernels vs bf16 — {doc['device']}", "",
             f"torch {doc['torch']}, gemlite {doc.get('gemlite') or 'absent'} (config: {doc.get('gemlite_config')}), "
             f"W4 g{doc['group_size']} asymmetric, bf16 activations, median of {doc['repeats']} repeats ("
             f"{'perf_counter; CPU smoke test: CPU times of reduced shapes, not GPU figures' if doc['smoke_test'] else 'CUDA events'}). "
             "Cell: ms (× bf16 time) [rel. error vs the float32 dequantized product].", "",
             "| shape | K | N | M | " + " | ".join(impls) + " |", "|" + "---|" * (4 + len(impls))]
    for (nm, m), b in base.items():
        r0 = cell[(nm, m, "bf16")]
        row = [nm, str(r0["K"]), str(r0["N"]), str(m)]
        for i in impls:
            r = cell.get((nm, m, i))
            row.append("—" if r is None else f"{r['ms_median']:.4f} ({r['ms_median'] / b:.2f}×) [{r['rel_err_vs_fp32']:.1e}]")
        lines.append("| " + " | ".join(row) + " |")
    if any("graph_ms_median" in r for r in doc["results"]):
        gbase = {(r["shape"], r["M"]): r.get("graph_ms_median") for r in doc["results"] if r["impl"] == "bf16"}
        lines += ["", "The same calls captured in a CUDA graph (no launch overhead): ms (× bf16's graphed time).", "",
                  "| shape | M | " + " | ".join(impls) + " |", "|" + "---|" * (2 + len(impls))]
        for (nm, m), b in gbase.items():
            row = [nm, str(m)]
            for i in impls:
                r = cell.get((nm, m, i)) or {}
                g = r.get("graph_ms_median")
                row.append("—" if g is None else f"{g:.4f} ({g / b:.2f}×)" if b else f"{g:.4f}")
            lines.append("| " + " | ".join(row) + " |")
    pre = [r for r in doc.get("memory", []) if "dequant_only_ms" in r]
    if pre:
        lines += ["", "dequant+mm = Int4Linear's prefill path at every M (compile excluded). Its dequantization alone "
                  "(reading the '" + pre[0]["prefill_layout"] + "' copy, " +
                  ("one torch.compile'd kernel" if pre[0]["compiled"] else
                   f"eager ops{': compile failed: ' + pre[0]['compile_failed'] if pre[0]['compile_failed'] else ''}") +
                  "): " + ", ".join(f"{r['shape']} {r['dequant_only_ms']:.4f} ms (first call {r['compile_s']:.1f} s)"
                                    for r in pre) + "."]
    if doc.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in doc["skipped"].items())]
    if doc.get("cut"):
        lines += ["", f"Cut short: {doc['cut']}"]
    return "\n".join(lines) + "\n"


IMPL_ORDER = ["bf16", "torch", "gemlite", "gemlite_fma", "dequant", "dequant+mm"]


def build_impls(q, s, z, w, device, want: list[str], skipped: dict) -> tuple[dict, dict]:
    """{impl: module} and {impl: seconds to pack} for this shape; an impl that cannot run is left
    out and its reason put in `skipped` (once)."""
    k, n = q.shape[1], q.shape[0]
    impls, pack_s = {}, {}
    lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    lin.weight.copy_(w)
    impls["bf16"] = lin
    for name in want:
        kernel = "gemlite" if name.startswith("gemlite") else name
        if name == "dequant+mm":  # the prefill path reads gemlite's copy where gemlite runs
            kernel = "dequant" if device.type != "cuda" or "gemlite" in skipped else "gemlite"
        int4.GEMLITE_FMA = name == "gemlite_fma"
        t0 = time.perf_counter()
        try:
            impls[name] = Int4Linear.from_codes(q, s, z, GROUP, dtype=torch.bfloat16, device=device, kernel=kernel)
            impls[name].prefill_rows = 0 if name == "dequant+mm" else None  # each column one path at every M
        except Exception as e:  # noqa: BLE001 - record why (gemlite absent, shape refused) and go on
            skipped.setdefault(name, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
            continue
        finally:
            int4.GEMLITE_FMA = False
        if device.type == "cuda":
            torch.cuda.synchronize()
        pack_s[name] = time.perf_counter() - t0
    return impls, pack_s


def prefill_path(clock: Clock, mod) -> dict:
    """The prefill path's dequantization alone: which copy it reads, whether it runs compiled, the
    first call's seconds (the compile), then its median ms (CUDA events / perf_counter)."""
    t0 = time.perf_counter()
    w = mod.prefill_weight()
    clock.sync()
    st = int4.compile_status()
    out = {"prefill_layout": mod.prefill_layout(), "compile_s": time.perf_counter() - t0,
           "compiled": w.device.type in st["devices"] and st["failed"] is None,
           "compile_failed": st["failed"], "dequant_weight_shape": list(w.shape)}
    del w
    out["dequant_only_ms"] = time_impl(clock, mod.prefill_weight)["ms_median"]
    return out


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke test of this script)")
    ap.add_argument("--small", action="store_true", help="shapes divided by 16 (K 256 / 896, still g128)")
    ap.add_argument("--fma", action="store_true", help="also time gemlite's fma mode (more Triton compiles)")
    ap.add_argument("--budget-s", type=float, default=45.0, help="stop starting new (shape, M) cells after this")
    ap.add_argument("--out", default=os.environ.get("OUT") or ".", help="directory for int4_runtime.{json,md} (default $OUT)")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        sys.stderr.write("int4_runtime: no CUDA device; run with --cpu --small for a smoke test\n")
        return 2
    device = torch.device("cpu" if args.cpu else "cuda:0")
    div = 16 if args.small else 1
    shapes = [(nm, k // div, n // div) for nm, k, n in SHAPES]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dest, dest_md = out / "int4_runtime.json", out / "int4_runtime.md"
    t_start = time.perf_counter()
    want = (["torch"] + ([] if args.cpu else ["gemlite"] + (["gemlite_fma"] if args.fma else [])) + ["dequant"]
            + ["dequant+mm"])
    gl, gl_why = (None, "CPU run: gemlite is CUDA only") if args.cpu else int4.gemlite_import()
    doc = {
        "what": "Int4Linear kernels (torch int4pack, gemlite, dequant per call) vs bf16 nn.Linear, random W4 g128 "
                "asymmetric codes",
        "smoke_test": bool(args.cpu),
        "note": ("CPU smoke test: CPU times of reduced shapes, not GPU figures" if args.cpu else
                 "single matmuls, weights not flushed from L2 between calls"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "gemlite": getattr(gl, "__version__", None), "gemlite_config": None,
        "group_size": GROUP, "rows": ROWS, "repeats": REPEATS, "dtype": "bfloat16",
        "shapes": [{"name": nm, "K": k, "N": n} for nm, k, n in shapes],
        "results": [], "memory": [], "skipped": {} if gl_why is None or args.cpu else {"gemlite": gl_why},
        "cut": None,
    }
    if args.cpu:
        doc["skipped"]["gemlite"] = gl_why
    clock = Clock(device)

    def write():
        doc["seconds"] = time.perf_counter() - t_start
        base = {(r["shape"], r["M"]): r["ms_median"] for r in doc["results"] if r["impl"] == "bf16"}
        doc["ratio_to_bf16"] = [{"shape": r["shape"], "M": r["M"], "impl": r["impl"],
                                 "time_ratio": r["ms_median"] / base[(r["shape"], r["M"])]}
                                for r in doc["results"] if r["impl"] != "bf16" and (r["shape"], r["M"]) in base]
        tmp = dest.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(dest)
        dest_md.write_text(markdown(doc))

    doc["nibble_order_rel_err"] = nibble_order_check(device)
    if gl is not None and device.type == "cuda":
        doc["gemlite_config"] = int4.gemlite_config(device)
    for i, (nm, k, n) in enumerate(shapes):
        if doc["cut"]:
            break
        q, s, z = codes(n, k, GROUP, device, seed=i)
        w = dense_weight(q, s, z, GROUP)  # float32 reference weight
        impls, pack_s = build_impls(q, s, z, w, device, [x for x in want if x not in doc["skipped"]], doc["skipped"])
        doc["memory"].append({"shape": nm, "bf16_bytes": n * k * 2, "pack_seconds": pack_s,
                              **{f"{name}_bytes": mod.nbytes() for name, mod in impls.items() if name != "bf16"}})
        if "dequant+mm" in impls:
            doc["memory"][-1].update(prefill_path(clock, impls["dequant+mm"]))
            write()
        del q
        for m in ROWS:
            if time.perf_counter() - t_start > args.budget_s:
                doc["cut"] = f"time budget {args.budget_s:.0f} s reached before {nm} M={m}"
                break
            x = torch.randn(m, k, device=device, generator=torch.Generator(device=device).manual_seed(1000 + m)).bfloat16()
            ref = x.float() @ w.t()
            ys = {name: mod(x) for name, mod in impls.items()}  # also the first (compiling) call
            for name, mod in impls.items():
                row = {"shape": nm, "K": k, "N": n, "M": m, "impl": name, "kernel": getattr(mod, "kernel", "bf16"),
                       "rel_err_vs_fp32": rel(ys[name], ref), "rel_err_vs_bf16_linear": rel(ys[name], ys["bf16"])}
                row.update(time_impl(clock, lambda mod=mod: mod(x)))
                if clock.cuda:
                    row.update(time_graph(lambda mod=mod: mod(x), min(row["iters"], 50)))
                doc["results"].append(row)
                print(f"{nm:8s} M={m:5d} {name:12s} {row['ms_median']:9.4f} ms  err/fp32 {row['rel_err_vs_fp32']:.2e}",
                      flush=True)
            write()
        del w, impls
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write()
    print(f"wrote {dest} and {dest_md.name} ({doc['seconds']:.1f} s)" + (f"; {doc['cut']}" if doc["cut"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
