"""GPTQ on one Llama-3-8B-shaped block, old column loop against the current one, same run.

Random bf16 weights of one 8B block (q,k,v | o | gate,up | down; linears at one input point are
rounded together, rows stacked, as awqnb's GPTQ rounder does) and random correlated bf16
calibration activations, 128 × 512 tokens. W4 g128 asymmetric, act_order and static groups (the
GPTQ defaults). Per implementation and repeat, CUDA-synchronised wall time of each phase:

  hessian  H = 2·XᵀX/n from the activation chunks
  factor   dead columns, act-order permutation, damping, chol((H + λI)⁻¹)
  loop     the column loop (quantize, error compensation, lazy batch updates)
  evidence tr(ΔW H ΔWᵀ) of round-to-nearest and of GPTQ per linear (what `_round_joint` records)

`old` is a frozen copy of awqnb/quant/methods/gptq.py before the issue-24 rewrite (commit a89d800),
with timing marks added; `new` calls the library (eager column loop); `graph` the library with
`cuda_graph=True` (CUDA only). Repeats are interleaved (old, new, graph, old, …); the median of
the repeats is reported beside every repeat; codes, qparams, H and layer errors of each pair are
compared (first repeat). Peak memory is counted above what was allocated when a run started.

  python bench/probes/gptq_layer.py                       # one GPU (written to finish in < 90 s on an H200; not yet run there)
  python bench/probes/gptq_layer.py --cpu --small         # smoke test: dims / 8, 16 × 512 tokens

Writes gptq_layer.json (and command.txt, environment.json) to --out, else $OUT, else
bench/results/gptq/<date>_<device>_llama3-8b-shape[_small]/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench._common import run_dir, write_run_info  # noqa: E402
from awqnb.core.config import QuantConfig  # noqa: E402
from awqnb.core.primitives import compute_qparams, effective_group_size, fake_quant, qrange  # noqa: E402
from awqnb.quant.methods import gptq as lib  # noqa: E402

HIDDEN, KV, INTER = 4096, 1024, 14336  # Llama-3-8B
POINTS = [  # input point → (rows of the stacked linears, input columns)
    ("qkv", [("q_proj", HIDDEN), ("k_proj", KV), ("v_proj", KV)], HIDDEN),
    ("o", [("o_proj", HIDDEN)], HIDDEN),
    ("gate_up", [("gate_proj", INTER), ("up_proj", INTER)], HIDDEN),
    ("down", [("down_proj", HIDDEN)], INTER),
]


# -- the old implementation, frozen (a89d800), with `mark` calls between its phases -------------

def old_hessian(xs, device, dtype=torch.float32):
    c = xs[0].shape[-1]
    h = torch.zeros(c, c, device=device, dtype=dtype)
    n = 0
    for x in xs:
        f = x.to(device, non_blocking=True).reshape(-1, c).to(dtype)
        h.addmm_(f.T, f)
        n += f.shape[0]
    return h.mul_(2.0 / n), n


def _old_upper_inverse_cholesky(h, damp):
    eye = torch.arange(h.shape[0], device=h.device)
    for _ in range(4):
        hd = h.clone()
        hd[eye, eye] += damp
        low, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            hinv = torch.cholesky_inverse(low)
            del low
            up, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and bool(torch.isfinite(up.diagonal()).all()):
                return up, damp, False
        damp *= 10.0
    return torch.eye(h.shape[0], device=h.device, dtype=h.dtype), damp, True


@torch.no_grad()
def old_gptq_quantize(w, h, cfg, mark, damp_percent=0.01, block_size=128, act_order=True, static_groups=True):
    co, ci = w.shape
    dev = w.device
    g = effective_group_size(ci, cfg.group_size)
    ng = math.ceil(ci / g)
    lo, hi = qrange(cfg)
    one_group = replace(cfg, group_size=-1)
    W = w.float().clone()
    H = h.to(device=dev, dtype=torch.float32).clone()
    diag = H.diagonal()
    dead = diag == 0
    n_dead = int(dead.sum())
    if n_dead:
        diag[dead] = 1.0
    if static_groups:
        scale, zero = compute_qparams(W, cfg)
    else:
        scale = torch.zeros(co, ng, device=dev)
        zero = torch.zeros(co, ng, device=dev)
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        H = H[perm][:, perm]
    else:
        perm = torch.arange(ci, device=dev)
    Wt = W.T[perm].contiguous() if act_order else W.T.contiguous()
    del W
    st, zt = scale.T.contiguous(), zero.T.contiguous()
    damp = float(damp_percent) * float(H.diagonal().mean())
    U, damp, fallback = _old_upper_inverse_cholesky(H, damp)
    del H
    mark("factor")
    perm_cpu = perm.cpu()
    pos_of = torch.argsort(perm_cpu)
    group_at = (perm_cpu // g).tolist()
    starts = set()
    if not static_groups:
        first = {}
        for p, gi in enumerate(group_at):
            first.setdefault(gi, p)
        starts = set(first.values())
    Qt = torch.empty_like(Wt)
    losses = torch.zeros(min(ci, block_size), co, device=dev)
    loss_rows = torch.zeros(co, device=dev)
    for i1 in range(0, ci, block_size):
        i2 = min(i1 + block_size, ci)
        cnt = i2 - i1
        W1 = Wt[i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros(cnt, co, device=dev)
        L1 = losses[:cnt].zero_()
        for i in range(cnt):
            p = i1 + i
            gi = group_at[p]
            if p in starts:
                cur = _old_group_now(Wt, W1, Err1, U, pos_of, gi, g, ci, i1, i2, i)
                s_g, z_g = compute_qparams(cur.T, one_group)
                st[gi] = s_g[:, 0]
                zt[gi] = z_g[:, 0]
            s = st[gi]
            z = zt[gi]
            col = W1[i]
            q = torch.clamp(torch.round(col / s) + z, lo, hi)
            Qt[p] = q
            e = (col - (q - z) * s) / U1[i, i]
            L1[i] = e * e
            if i + 1 < cnt:
                W1[i + 1:].addr_(U1[i, i + 1:], e, alpha=-1.0)
            Err1[i] = e
        loss_rows += L1.sum(0)
        if i2 < ci:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)
    if act_order:
        Qt = Qt[pos_of.to(dev)]
    out = lib.GPTQResult(Qt.T.contiguous(), st.T.contiguous(), zt.T.contiguous(), loss_rows / 2, damp, fallback,
                         n_dead)
    mark("loop")
    return out


def _old_group_now(Wt, W1, Err1, U, pos_of, gi, g, ci, i1, i2, i):
    pos = pos_of[gi * g:min((gi + 1) * g, ci)]
    inb = pos[pos < i2]
    out = pos[pos >= i2]
    parts = []
    if inb.numel():
        parts.append(W1[(inb - i1).to(W1.device)])
    if out.numel():
        o = out.to(Wt.device)
        later = Wt[o]
        if i > 0:
            later = later - U[i1:i1 + i][:, o].T @ Err1[:i]
        parts.append(later)
    return torch.cat(parts, 0) if len(parts) > 1 else parts[0]


# -- the probe ----------------------------------------------------------------------------------

class Clock:
    """Synchronised phase marks: mark(name) adds the time since the previous mark to `name`."""

    def __init__(self, dev):
        self.dev = dev
        self.t = {}
        self.cpu = {}  # process CPU seconds per phase: on a shared CPU, less noisy than wall time
        self.sync()
        self.last = time.perf_counter()
        self.last_cpu = time.process_time()

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def mark(self, name):
        self.sync()
        now = time.perf_counter()
        now_cpu = time.process_time()
        self.t[name] = self.t.get(name, 0.0) + now - self.last
        self.cpu[name] = self.cpu.get(name, 0.0) + now_cpu - self.last_cpu
        self.last, self.last_cpu = now, now_cpu


def make_point(rows, ci, n_tok, chunk, dev, gen_seed):
    """bf16 weights `[Σ rows, ci]` (std 0.02) and activation chunks `[chunk, ci]` with channel scales
    spread over two decades and a shared rank-32 component (correlated, as real activations are)."""
    g = torch.Generator(device=dev).manual_seed(gen_seed)
    w = (torch.randn(sum(r for _, r in rows), ci, generator=g, device=dev) * 0.02).bfloat16()
    chan = torch.exp(torch.randn(ci, generator=g, device=dev) * 1.2)
    mix = torch.randn(32, ci, generator=g, device=dev) / math.sqrt(32)
    xs = []
    for _ in range(0, n_tok, chunk):
        z = torch.randn(chunk, ci, generator=g, device=dev)
        z += torch.randn(chunk, 32, generator=g, device=dev) @ mix
        xs.append((z * chan).bfloat16())
    return w, xs


def run_once(impl, w, xs, rows, qcfg, dev):
    clock = Clock(dev)
    start = 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)  # the point's inputs and earlier results: not this run's
    if impl == "old":
        h, _ = old_hessian(xs, dev)
        clock.mark("hessian")
        res = old_gptq_quantize(w.float(), h, qcfg, clock.mark)
    else:  # new: the library's eager loop; graph: its column loop as a replayed CUDA graph
        h, _ = lib.hessian(xs, dev)
        clock.mark("hessian")
        f = lib.gptq_factor(h, 0.01, True)
        clock.mark("factor")
        res = lib.gptq_round(w.float(), f, qcfg, 128, True, cuda_graph=impl == "graph")
        clock.mark("loop")
    wq = res.weight(qcfg)
    errs = {}
    row = 0
    for name, co in rows:
        wf = w[row:row + co].float()
        errs[name] = (lib.layer_error(wf - fake_quant(wf, qcfg), h), lib.layer_error(wf - wq[row:row + co], h))
        row += co
    clock.mark("evidence")
    peak = torch.cuda.max_memory_allocated(dev) - start if dev.type == "cuda" else None
    return clock, res, errs, h, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke test; CPU figures only)")
    ap.add_argument("--small", action="store_true", help="dims / 8 and 16 × 512 tokens")
    ap.add_argument("--impl", default="old,new,graph",
                    help="comma-separated, run interleaved: old (frozen pre-change loop), new (library, eager), "
                         "graph (library, column loop as a CUDA graph; CUDA only)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--points", default=",".join(p[0] for p in POINTS), help="input points to run, comma-separated")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    div = 8 if a.small else 1
    n_tok = (16 if a.small else 128) * 512
    chunk = 4 * 512  # awqnb stashes the inputs per calibration batch
    qcfg = QuantConfig(4, 128)
    impls = [i for i in a.impl.split(",") if i != "graph" or dev.type == "cuda"]
    failed = {}
    out = Path(a.out or os.environ.get("OUT") or run_dir("gptq", "llama3-8b-shape", dev, "small" if a.small else None))
    write_run_info(out, dev)
    t_start = time.perf_counter()

    # warm-up (CUDA context, cuBLAS / cuSOLVER handles), not counted
    w0, x0 = make_point([("w", 256)], 512, 2048, 1024, dev, 99)
    for impl in list(impls):
        try:
            run_once(impl, w0, x0, [("w", 256)], qcfg, dev)
        except Exception as e:  # noqa: BLE001 - a failing implementation is reported, the others still run
            failed[impl] = f"{type(e).__name__}: {e}"
            impls.remove(impl)
            print(f"{impl} failed in the warm-up: {failed[impl]}", flush=True)

    points = {}
    for k, (name, rows, ci) in enumerate(POINTS):
        if name not in a.points.split(","):
            continue
        rows = [(n, r // div) for n, r in rows]
        ci //= div
        w, xs = make_point(rows, ci, n_tok, chunk, dev, k)
        rec = {"rows": dict(rows), "ci": ci, "repeats": {i: [] for i in impls}, "peak_bytes_above_inputs": {}}
        results = {}
        for r in range(a.repeats):
            for impl in list(impls):
                try:
                    clock, res, errs, h, peak = run_once(impl, w, xs, rows, qcfg, dev)
                except Exception as e:  # noqa: BLE001 - reported; the other implementations go on
                    failed[impl] = f"{name} rep {r}: {type(e).__name__}: {e}"
                    impls.remove(impl)
                    print(f"{impl} failed: {failed[impl]}", flush=True)
                    continue
                t = clock.t
                rec["repeats"][impl].append({k2: round(v, 4) for k2, v in t.items()})
                if dev.type == "cpu":
                    rec.setdefault("repeats_cpu_time", {i: [] for i in impls})[impl].append(
                        {k2: round(v, 4) for k2, v in clock.cpu.items()})
                rec["peak_bytes_above_inputs"][impl] = max(rec["peak_bytes_above_inputs"].get(impl) or 0,
                                                           peak or 0) or None
                if r == 0:
                    results[impl] = (res, errs, h)
                print(f"{name:8s} rep {r} {impl}: " + " ".join(f"{k2} {v:.3f}s" for k2, v in t.items()), flush=True)
        rec["compare"] = {}
        for x, y in [("old", "new"), ("old", "graph"), ("new", "graph")]:
            if x not in results or y not in results:
                continue
            (r0, e0, h0), (r1, e1, h1) = results[x], results[y]
            c = rec["compare"][f"{x}_vs_{y}"] = {
                "codes_equal_fraction": float((r0.q == r1.q).float().mean()),
                "codes_bit_identical": bool(torch.equal(r0.q, r1.q)),
                "qparams_equal": bool(torch.equal(r0.scale, r1.scale) and torch.equal(r0.zero, r1.zero)),
                "hessian_max_rel_diff": float((h0 - h1).abs().max() / h0.abs().max()),
                "layer_err_gptq": {n: {x: e0[n][1], y: e1[n][1], "rtn": e0[n][0]} for n in e0},
            }
            print(f"{name:8s} {x} vs {y}: codes equal {c['codes_equal_fraction']:.6f}, "
                  f"H max rel diff {c['hessian_max_rel_diff']:.2e}, layer err "
                  + " ".join(f"{n} {v[y] / v[x]:.6f}x" for n, v in c["layer_err_gptq"].items()), flush=True)
        points[name] = rec
        del w, xs, results

    summary = {}
    for impl in impls:
        per_rep = [sum(sum(points[p]["repeats"][impl][r].values()) for p in points) for r in range(a.repeats)]
        phases = {ph: statistics.median(sum(points[p]["repeats"][impl][r].get(ph, 0.0) for p in points)
                                        for r in range(a.repeats))
                  for ph in ["hessian", "factor", "loop", "evidence"]}
        summary[impl] = {"block_seconds_median": statistics.median(per_rep), "block_seconds_repeats": per_rep,
                         "phase_seconds_median": phases,
                         "peak_bytes_above_inputs": max((points[p]["peak_bytes_above_inputs"].get(impl) or 0)
                                                        for p in points) or None}
        if dev.type == "cpu":
            cpu_rep = [sum(sum(points[p]["repeats_cpu_time"][impl][r].values()) for p in points)
                       for r in range(a.repeats)]
            summary[impl]["block_cpu_seconds_median"] = statistics.median(cpu_rep)
            summary[impl]["block_cpu_seconds_repeats"] = cpu_rep
            summary[impl]["phase_cpu_seconds_median"] = {
                ph: statistics.median(sum(points[p]["repeats_cpu_time"][impl][r].get(ph, 0.0) for p in points)
                                      for r in range(a.repeats)) for ph in ["hessian", "factor", "loop", "evidence"]}
    for y in ["new", "graph"]:
        if "old" in summary and y in summary:
            summary[f"old_over_{y}"] = summary["old"]["block_seconds_median"] / summary[y]["block_seconds_median"]
            summary[f"loop_old_over_{y}"] = (summary["old"]["phase_seconds_median"]["loop"]
                                             / summary[y]["phase_seconds_median"]["loop"])
    doc = {"what": "GPTQ, one Llama-3-8B-shaped block" + (" (dims / 8)" if a.small else ""),
           "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
           "quant": "W4 g128 asym, act_order, static groups, damp 0.01, block 128",
           "tokens": n_tok, "repeats": a.repeats, "order": "interleaved per point: " + ", ".join(impls),
           "summary": summary, "failed": failed, "points": points, "wall_seconds": time.perf_counter() - t_start}
    (out / "gptq_layer.json").write_text(json.dumps(doc, indent=1) + "\n")
    for impl in impls:
        s = summary[impl]
        print(f"{impl}: block {s['block_seconds_median']:.3f}s median of {[round(x, 3) for x in s['block_seconds_repeats']]}"
              f"; phases " + " ".join(f"{k} {v:.3f}" for k, v in s["phase_seconds_median"].items()))
        if "block_cpu_seconds_median" in s:
            print(f"{impl}: process CPU time, block {s['block_cpu_seconds_median']:.3f}s median of "
                  f"{[round(x, 3) for x in s['block_cpu_seconds_repeats']]}; phases "
                  + " ".join(f"{k} {v:.3f}" for k, v in s["phase_cpu_seconds_median"].items()))
    for y in ["new", "graph"]:
        if f"old_over_{y}" in summary:
            print(f"old/{y}: block {summary[f'old_over_{y}']:.2f}x, loop {summary[f'loop_old_over_{y}']:.2f}x")
    print(f"wrote {out / 'gptq_layer.json'} in {doc['wall_seconds']:.1f}s")


if __name__ == "__main__":
    main()
