"""Deployment numbers of awqnb's INT4 runtime: a packed checkpoint loaded with `load_int4` (its linears
on gemlite's or torch's 4-bit kernel, no dense copy) against the bf16 model, in ONE run on one device.

Steps (each writes OUT/deploy.json and OUT/deploy.md again, so a cut run keeps what it finished):
  1. bf16: the shape (--shape 8b: Llama-3-8B, 32 layers, hidden 4096, MLP 14336, 32/8 heads, vocab
     128256; --shape tiny: the same family at a CPU size) random-initialised directly on --device in
     bf16 (values do not change speed or memory). Measured: memory after load, prefill, decode.
  2. The same model quantized in place with rtn (W4 asymmetric, --group-size 128; calibration-free:
     the codes' values do not change speed; lm_head too when --lm-head has 'quantize') and saved
     packed with awqnb's exporter into a temp dir — once with the lm_head kept bf16 ('keep'), once with
     it packed ('quantize', written with allow_unservable=True: vLLM does not serve a packed lm_head,
     only awqnb's own runtime and transformers load it); the bf16 model is freed.
  3. For each --kernels (gemlite, torch): `load_int4(dir, device, kernel=..., prefill_rows=...)` of the
     'keep' export, the same measurements; the 'quantize' export runs on the first kernel that loads
     (its point is the memory; its speed differs only in the lm_head's matmul). The bf16 model is
     measured once for both. A gemlite / dequant linear runs its 4-bit kernel up to --prefill-rows
     rows (128) and above that dequantizes its one packed copy with one torch.compile'd kernel and
     runs F.linear (cuBLAS); the compile happens in the warm-up calls (not timed).
Measurements (median of --repeats, every repeat kept):
  memory     torch.cuda.memory_allocated after load (less what was allocated before it), and the bytes
             of the quantizable linears (bf16 weights, or the Int4Linear modules' codes + scales + zeros)
  prefill    tokens/s of one forward of batch 1 × --prefill-tokens (2048) with no cache, logits of the
             last position only (as generate computes them)
  decode     tokens/s of --decode-steps (32) greedy steps after a --prompt-len (128) prompt, at each
             --batches (1, 8, 32), with transformers' StaticCache; one step = forward + argmax, the
             token, position and cache updated on the device. Two ways, the SAME step code:
               eager   each step launched op by op from Python (HF eager: launch-bound at batch 1)
               graph   the step captured once in a torch.cuda.CUDAGraph and replayed (CUDA only)
             A failed capture is recorded with its error line; the eager numbers stand.
Targets (reported, pass/fail): memory after load ≤ 0.35× bf16; decode at batch 1 ≥ 1.6× bf16's
tokens/s; no batch where INT4 is slower than bf16 by more than 10% (each of eager and graph).

  H200 (< 4 min):  python bench/deploy.py --shape 8b --device cuda:0 --out bench/results/deploy/<dir>
  CPU smoke test:  python bench/deploy.py --shape tiny --device cpu --out /tmp/deploy_smoke
                   (CPU times of a tiny model: they check the script, they say nothing about a GPU)
Failures of one kernel (gemlite not installed, say) are recorded with one line and the run goes on.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: awqnb without installing it

from awqnb.core.config import QuantConfig, SearchConfig  # noqa: E402
from awqnb.export import int4  # noqa: E402
from awqnb.export import packed as export  # noqa: E402
from awqnb.quant import pipeline  # noqa: E402
from awqnb.quant.method_config import MethodConfig  # noqa: E402

from _common import write_run_info  # noqa: E402 — bench/ is on sys.path when run as a script

log = logging.getLogger("bench.deploy")

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=False),
}
SHAPE_NAMES = {"8b": "Llama-3-8B shape (random)", "tiny": "tiny Llama (random, CPU smoke test)"}
HEAD_NOTE = ("The 4-bit lm_head variant is for awqnb's own runtime (load_int4) only: vLLM does not serve a packed "
             "lm_head (its compressed-tensors path quantizes linear layers, never lm_head), so the export needs "
             "allow_unservable=True; the 'keep' variant (bf16 lm_head) is what vLLM can load.")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Timer:
    """Seconds of a region: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            self.s = self.a.elapsed_time(self.b) / 1e3
        else:
            self.s = time.perf_counter() - self.t


def build_bf16(shape: str, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def linear_bytes(model, names: list[str]) -> int:
    mods = dict(model.named_modules())
    out = 0
    for n in names:
        m = mods[n]
        out += m.nbytes() if isinstance(m, int4.Int4Linear) else sum(
            t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    return out


@torch.no_grad()
def prefill(model, device, n_tokens: int, repeats: int, vocab: int) -> dict:
    ids = torch.randint(10, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(1)).to(device)
    model(ids, use_cache=False, logits_to_keep=1)  # warm-up: kernels compiled / chosen
    secs = []
    for _ in range(repeats):
        with Timer(device) as t:
            model(ids, use_cache=False, logits_to_keep=1)
        secs.append(t.s)
    med = statistics.median(secs)
    return {"tokens": n_tokens, "seconds_repeats": secs, "seconds_median": med, "tokens_per_s": n_tokens / med,
            "tokens_per_s_repeats": [n_tokens / s for s in secs]}


def make_cache(model, batch: int, max_len: int, device, dtype):
    from transformers import StaticCache

    try:  # transformers ≥ 5: shapes from the first update
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # 4.x
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=device, dtype=dtype)


class Decoder:
    """Greedy decode steps on a StaticCache, every state on the device: the step reads `ids` and
    `pos`, writes the argmax token back into `ids` and advances `pos` — no host sync, so the same
    step runs eagerly or replayed from a CUDA graph."""

    def __init__(self, model, batch: int, prompt_len: int, steps: int, device, dtype, vocab: int):
        self.model, self.device, self.prompt_len = model, device, prompt_len
        self.cache = make_cache(model, batch, prompt_len + steps + 16, device, dtype)
        self.prompt = torch.randint(10, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)).to(device)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)

    @torch.no_grad()
    def start(self):
        """Reset the cache in place (its tensors keep their addresses: a captured graph stays valid)
        and prefill the prompt into it (eager). cache_position is passed for transformers 4.x;
        5.x ignores it and keeps the write position on the device (the cache's cumulative_length)."""
        self.cache.reset()
        cp = torch.arange(self.prompt_len, device=self.device)
        out = self.model(self.prompt, past_key_values=self.cache, cache_position=cp, position_ids=cp[None],
                         use_cache=True, logits_to_keep=1)
        self.ids.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.first = self.ids.clone()
        self.pos.fill_(self.prompt_len)

    @torch.no_grad()
    def rewind(self):
        """Back to just after the prompt without prefilling it again (a 32 × 128-token prompt on a
        slow kernel costs seconds): the write position goes back in place, later entries are
        overwritten before they are attended to. transformers 5 keeps that position per layer
        (cumulative_length, a tensor); 4.x takes it from cache_position (our `pos`)."""
        for layer in getattr(self.cache, "layers", None) or []:
            cl = getattr(layer, "cumulative_length", None)
            if isinstance(cl, torch.Tensor):
                cl.fill_(self.prompt_len)
            elif cl is not None:  # a layout this script does not know: prefill again
                self.start()
                return
        self.ids.copy_(self.first)
        self.pos.fill_(self.prompt_len)

    @torch.no_grad()
    def step(self):
        out = self.model(self.ids, past_key_values=self.cache, cache_position=self.pos, position_ids=self.pos[None],
                         use_cache=True)
        self.ids.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(1)


def decode(model, device, dtype, batch: int, args, vocab: int) -> dict:
    """{'eager': ..., 'graph': ...} tokens/s at `batch`, each the median of args.repeats runs of
    args.decode_steps steps (the prompt's prefill not timed)."""
    dec = Decoder(model, batch, args.prompt_len, args.decode_steps, device, dtype, vocab)
    n = args.decode_steps
    out = {}
    dec.start()
    for _ in range(3):  # warm-up: the cache's lazy tensors, kernels compiled / autotuned for M = batch
        dec.step()
    secs = []
    for _ in range(args.repeats):
        dec.rewind()
        with Timer(device) as t:
            for _ in range(n):
                dec.step()
        secs.append(t.s)
    out["eager"] = summarize(secs, n * batch)
    last_eager = dec.ids.clone()
    if device.type != "cuda":
        out["graph"] = {"skipped": "CUDA graphs need a CUDA device"}
        return out
    try:
        dec.rewind()
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):  # the capture recipe: warm up on a side stream first
            for _ in range(2):
                dec.step()
        torch.cuda.current_stream(device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dec.step()
        secs = []
        for _ in range(args.repeats):
            dec.rewind()
            sync(device)
            with Timer(device) as t:
                for _ in range(n):
                    graph.replay()
            secs.append(t.s)
        out["graph"] = summarize(secs, n * batch)
        # same start, same steps: the last tokens agree unless a kernel is nondeterministic (split-K atomics)
        out["graph"]["last_tokens_equal_eager"] = float((dec.ids == last_eager).float().mean())
        del graph
    except Exception as e:  # noqa: BLE001 - a capture that fails is a finding, the eager numbers stand
        out["graph"] = {"failed": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
        log.warning("batch %d: CUDA graph capture failed: %s", batch, out["graph"]["failed"])
    return out


def summarize(secs: list[float], tokens: int) -> dict:
    med = statistics.median(secs)
    return {"tokens": tokens, "seconds_repeats": secs, "seconds_median": med, "tokens_per_s": tokens / med,
            "tokens_per_s_repeats": [tokens / s for s in secs]}


def measure(model, name: str, device, dtype, args, vocab: int, rec: dict, write) -> None:
    """Prefill then decode at every batch into rec (written after each)."""
    rec["prefill"] = prefill(model, device, args.prefill_tokens, args.repeats, vocab)
    log.info("%s prefill 1×%d: %.0f tok/s", name, args.prefill_tokens, rec["prefill"]["tokens_per_s"])
    write()
    rec["decode"] = {}
    for b in args.batches:
        rec["decode"][f"b{b}"] = decode(model, device, dtype, b, args, vocab)
        d = rec["decode"][f"b{b}"]
        log.info("%s decode b%d: eager %.1f tok/s, graph %s", name, b, d["eager"]["tokens_per_s"],
                 f"{d['graph']['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in d["graph"] else d["graph"])
        write()


@torch.no_grad()
def head_check(head, device, batches: list[int]) -> dict:
    """A packed lm_head's output at each decode batch (its kernel as chosen for that M: on gemlite
    perhaps a borrowed tuned config) against the float32 product with its dequantized weight:
    relative error (bf16 rounding ≈ 3e-3; a wrong layout or config ≈ 1)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(max(batches), head.in_features, generator=g).to(device, torch.bfloat16)
    ref = x.float() @ head.dequantized_weight().t()
    out = {}
    for b in batches:
        y = head(x[:b]).float()
        out[f"b{b}_rel_err"] = float((y - ref[:b]).norm() / ref[:b].norm())
    del ref
    free(device)
    return out


def prefill_compile_state(device) -> str:
    """How the INT4 prefill path's dequantization ran in this process."""
    st = int4.compile_status()
    if st["failed"]:
        return f"eager ops (torch.compile failed: {st['failed']})"
    if device.type not in st["devices"]:
        return f"eager ops (compiled on {', '.join(st['devices'])} only)"
    return f"one torch.compile'd kernel per shape ({st['compiled']} compiled)"


def rows(doc: dict) -> list[dict]:
    """One row per (variant, metric): shape, method, bits, group size, kernel, device, dtype, value,
    ratio to bf16."""
    out = []
    base = doc["variants"].get("bf16", {})

    def val(v, path):
        for p in path:
            v = (v or {}).get(p)
        return v

    metrics = [("memory after load (bytes)", ("memory", "allocated_after_load"), "lower"),
               ("quantizable linears (bytes)", ("memory", "linear_bytes"), "lower"),
               ("lm_head (bytes)", ("memory", "lm_head_bytes"), "lower"),
               (f"prefill 1×{doc['args']['prefill_tokens']} (tokens/s)", ("prefill", "tokens_per_s"), "higher")]
    for b in doc["args"]["batches"]:
        for mode in ("eager", "graph"):
            metrics.append((f"decode b{b} {mode} (tokens/s)", ("decode", f"b{b}", mode, "tokens_per_s"), "higher"))
    for vname, v in doc["variants"].items():
        if v.get("error") and not v.get("memory"):
            continue  # not loaded: listed under "Not measured"
        for label, path, _better in metrics:
            x = val(v, path)
            b0 = val(base, path)
            note = None
            if x is None and len(path) == 4:
                note = val(v, path[:3] + ("failed",)) or val(v, path[:3] + ("skipped",))
            out.append({"variant": vname, "shape": doc["shape_name"], "method": v["method"], "bits": v["bits"],
                        "group_size": v["group_size"], "kernel": v["kernel"], "device": doc["device_name"],
                        "dtype": doc["dtype"], "metric": label, "value": x,
                        "ratio_to_bf16": (x / b0) if (x is not None and b0) else None, "note": note})
    return out


def targets(doc: dict) -> dict:
    """Each INT4 variant against the issue's three targets: memory after load ≤ 0.35× bf16 (and the
    linears alone, for the reason when the whole model misses it); decode batch 1 ≥ 1.6× bf16; no
    case (prefill, each decode batch) below 0.9× bf16's tokens/s — eager and graph judged apart,
    each with the prefill."""
    base = doc["variants"].get("bf16")
    out = {}
    if not base:
        return out

    def tps(v, b, mode):
        return (((v.get("decode") or {}).get(f"b{b}") or {}).get(mode) or {}).get("tokens_per_s")

    for vname, v in doc["variants"].items():
        if vname == "bf16" or not v.get("memory"):
            continue
        t = {}
        mb, m4 = (base.get("memory") or {}).get("allocated_after_load"), v["memory"].get("allocated_after_load")
        if mb and m4 is not None:
            t["memory_after_load_ratio"] = m4 / mb
            t["memory_after_load_le_0.35"] = m4 / mb <= 0.35
        lb, l4 = (base.get("memory") or {}).get("linear_bytes"), v["memory"].get("linear_bytes")
        if lb and l4:
            t["linears_bytes_ratio"] = l4 / lb
        px, py = (v.get("prefill") or {}).get("tokens_per_s"), (base.get("prefill") or {}).get("tokens_per_s")
        if px and py:
            t["prefill_speed_ratio"] = px / py
        for mode in ("eager", "graph"):
            ratios = {f"b{b}": tps(v, b, mode) / tps(base, b, mode) for b in doc["args"]["batches"]
                      if tps(v, b, mode) and tps(base, b, mode)}
            if not ratios:
                continue
            for k, r in ratios.items():
                t[f"decode_{k}_{mode}_speed_ratio"] = r
            if "b1" in ratios:
                t[f"decode_b1_{mode}_ge_1.6"] = ratios["b1"] >= 1.6
            worst = min(list(ratios.values()) + ([t["prefill_speed_ratio"]] if "prefill_speed_ratio" in t else []))
            t[f"{mode}_worst_speed_ratio"] = worst
            t[f"{mode}_nothing_slower_than_0.9"] = worst >= 0.9
        out[vname] = t
    return out


def markdown(doc: dict) -> str:
    lines = [f"# INT4 deployment numbers — {doc['shape_name']} on {doc['device_name']}", "",
             f"torch {doc['torch']}, transformers {doc['transformers']}, gemlite {doc.get('gemlite') or 'absent'} "
             f"(autotune config: {doc.get('gemlite_config')}); dtype {doc['dtype']}; median of {doc['args']['repeats']} "
             f"repeats; decode: {doc['args']['decode_steps']} steps after a {doc['args']['prompt_len']}-token prompt, "
             "StaticCache; 'eager' = step launched from Python, 'graph' = the same step replayed from a CUDA graph. "
             f"INT4 prefill path: above {doc['args'].get('prefill_rows')} rows a gemlite linear dequantizes its packed "
             "copy with one torch.compile'd kernel and runs F.linear (cuBLAS); torch's kernel keeps its own at every M "
             f"(fused dequantization: {doc.get('prefill_compile') or 'not run'})."]
    if any(v.get("lm_head") == "quantize" for v in doc["variants"].values()):
        lines += ["", f"**{HEAD_NOTE}**"]
    if doc["smoke_test"]:
        lines += ["", "**CPU smoke test of a tiny model: CPU times, they say nothing about a GPU.**"]
    lines += ["", "| shape | method | bits | group | kernel | device | dtype | metric | value | × bf16 | repeats / note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows(doc):
        v = r["value"]
        vs = "—" if v is None else (f"{v / 1e9:.3f} GB" if "bytes" in r["metric"] else f"{v:,.1f}")
        rs = "—" if r["ratio_to_bf16"] is None else f"{r['ratio_to_bf16']:.3f}"
        note = r["note"] or reps_of(doc, r)
        lines.append(f"| {r['shape']} | {r['method']} | {r['bits']} | {r['group_size'] or '—'} | {r['kernel']} | "
                     f"{r['device']} | {r['dtype']} | {r['metric']} | {vs} | {rs} | {note} |")
    t = doc.get("targets") or {}
    if t:
        lines += ["", "## Targets", ""]
        for vname, x in t.items():
            lines.append(f"- **{vname}**: " + ", ".join(
                f"{k} = {v:.3f}" if isinstance(v, float) else f"{k}: {'PASS' if v else 'FAIL'}" for k, v in x.items()))
    checks = {k: v["lm_head_check"] for k, v in doc["variants"].items() if v.get("lm_head_check")}
    if checks:
        lines += ["", "Packed lm_head vs its dequantized float32 product (relative error per decode batch): " +
                  "; ".join(f"{k}: " + ", ".join(f"{b} {e:.1e}" for b, e in c.items()) for k, c in checks.items())]
    errs = {k: v["error"] for k, v in doc["variants"].items() if v.get("error")}
    if errs:
        lines += ["", "## Not measured", ""] + [f"- {k}: {v}" for k, v in errs.items()]
    lines += ["", f"Steps' seconds: {json.dumps(doc['seconds'])}"]
    return "\n".join(lines) + "\n"


def reps_of(doc: dict, r: dict) -> str:
    """The repeats behind a tokens/s row, as a short list."""
    v = doc["variants"].get(r["variant"])
    if v is None or "tokens/s" not in r["metric"]:
        return ""
    if r["metric"].startswith("prefill"):
        reps = (v.get("prefill") or {}).get("tokens_per_s_repeats")
    else:
        b, mode = r["metric"].split()[1], r["metric"].split()[2]
        reps = (((v.get("decode") or {}).get(b) or {}).get(mode) or {}).get("tokens_per_s_repeats")
    return ", ".join(f"{x:,.1f}" for x in reps) if reps else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--kernels", default="gemlite,torch", help="INT4 kernels to load with, comma-separated")
    ap.add_argument("--lm-head", default="keep,quantize",
                    help="'keep' (bf16 lm_head, what vLLM serves), 'quantize' (a packed 4-bit lm_head: awqnb's runtime "
                         "only, vLLM does not serve it), or both comma-separated (the default)")
    ap.add_argument("--prefill-rows", default=str(int4.PREFILL_ROWS),
                    help="rows above which an INT4 linear dequantizes (one compiled kernel) and runs cuBLAS; 'none': never")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None, help="where the packed checkpoint goes (default: a temp dir, removed)")
    ap.add_argument("--out", required=True, help="directory for deploy.json and deploy.md")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    kernels = [k for k in args.kernels.split(",") if k]
    heads = [h for h in args.lm_head.split(",") if h]
    if not heads or any(h not in ("keep", "quantize") for h in heads):
        sys.stderr.write(f"deploy: --lm-head {args.lm_head!r}: use keep, quantize, or keep,quantize\n")
        return 2
    try:
        args.prefill_rows = None if args.prefill_rows.lower() == "none" else int(args.prefill_rows)
    except ValueError:
        sys.stderr.write(f"deploy: --prefill-rows {args.prefill_rows!r}: a row count, or none\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("deploy: no CUDA device here; for a smoke test use --shape tiny --device cpu\n")
        return 2
    bad = [k for k in kernels if k not in int4.KERNELS]
    if bad:
        sys.stderr.write(f"deploy: unknown kernel(s) {bad}; use {', '.join(int4.KERNELS)}\n")
        return 2
    dtype = torch.bfloat16
    out = write_run_info(args.out, device, None if argv is None else ["bench/deploy.py", *argv])
    import transformers

    gl, gl_why = int4.gemlite_import() if device.type == "cuda" else (None, "CUDA only")
    doc = {"what": "bf16 vs awqnb INT4 (load_int4) in one run: memory after load, prefill, decode eager and graphed",
           "shape": args.shape, "shape_name": SHAPE_NAMES[args.shape], "config": SHAPES[args.shape],
           "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
           (platform.processor() or "cpu"), "dtype": "bfloat16", "smoke_test": device.type != "cuda",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "gemlite": getattr(gl, "__version__", None), "gemlite_import": gl_why,
           "gemlite_config": int4.gemlite_config(device) if gl is not None else None,
           "args": {k: v for k, v in vars(args).items() if k not in ("out", "work")} | {"kernels": kernels,
                                                                                        "lm_head": heads},
           "lm_head_note": HEAD_NOTE if "quantize" in heads else None,
           "command": "python " + " ".join(sys.argv if argv is None else ["bench/deploy.py", *argv]),
           "variants": {}, "seconds": {}}
    t_all = time.perf_counter()

    def write():
        doc["seconds"]["total"] = time.perf_counter() - t_all
        doc["targets"] = targets(doc)
        tmp = out / "deploy.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(out / "deploy.json")
        (out / "deploy.md").write_text(markdown(doc))

    # 1. bf16
    t0 = time.perf_counter()
    base = allocated(device) or 0
    model = build_bf16(args.shape, device, dtype)
    sync(device)
    doc["seconds"]["build_bf16"] = time.perf_counter() - t0
    vocab = model.config.vocab_size
    cfg = MethodConfig("rtn", QuantConfig(4, args.group_size), SearchConfig(), calib_batch_size=16)
    names = list(export.quantized_linears(model, cfg))
    head_name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    rec = doc["variants"]["bf16"] = {"method": "bf16", "bits": 16, "group_size": None, "kernel": "bf16 F.linear",
                                     "lm_head": "bf16"}
    rec["memory"] = {"allocated_after_load": None if base is None or device.type != "cuda" else allocated(device) - base,
                     "linear_bytes": linear_bytes(model, names), "linears": len(names),
                     "lm_head_bytes": linear_bytes(model, [head_name])}
    write()
    t0 = time.perf_counter()
    measure(model, "bf16", device, dtype, args, vocab, rec, write)
    doc["seconds"]["measure_bf16"] = time.perf_counter() - t0

    # 2. quantize (rtn; lm_head too when a variant packs it) and save packed, once per lm_head mode
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="awqnb_deploy_"))
    cfg_q = dataclasses.replace(cfg, lm_head="quantize")
    t0 = time.perf_counter()
    res = pipeline.quantize(model, cfg_q if "quantize" in heads else cfg, None, device=device,
                            model_name=args.shape, progress=False)
    doc["seconds"]["quantize_rtn"] = time.perf_counter() - t0
    dirs = {}
    for h in heads:
        hcfg = cfg_q if h == "quantize" else cfg
        meta = copy.deepcopy(res.metadata())
        meta.setdefault("config", {})["lm_head"] = hcfg.lm_head  # what this directory holds
        dirs[h] = work / f"{args.shape}_rtn_w4_g{args.group_size}_{'headq' if h == 'quantize' else 'headbf16'}"
        t0 = time.perf_counter()
        # keep: the lm_head saved dense (its rounded values: speed and memory do not depend on them)
        export.save_packed(model, None, dirs[h], hcfg, meta, overwrite=True, dtype=dtype,
                           allow_unservable=h == "quantize")
        doc["seconds"][f"save_packed_{h}"] = time.perf_counter() - t0
        doc.setdefault("packed_file_bytes", {})[h] = sum(f.stat().st_size for f in dirs[h].glob("*.safetensors"))
    del model, res
    free(device)
    write()

    # 3. INT4, one variant at a time: each kernel on the bf16-head export, the packed head on the first that loads
    plan = []
    for k in kernels:
        if "keep" in heads:
            plan.append((k, "keep"))
        if "quantize" in heads:
            plan.append((k, "quantize"))
    head_done = False
    try:
        for k, h in plan:
            if h == "quantize" and head_done:
                continue
            vname = f"int4_{k}" + ("_headq" if h == "quantize" else "")
            rec = doc["variants"][vname] = {
                "method": "rtn", "bits": 4, "group_size": args.group_size, "lm_head": h,
                "kernel": k + (" + 4-bit lm_head (vLLM: not served)" if h == "quantize" else "")}
            t0 = time.perf_counter()
            base = allocated(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                m4, _ = int4.load_int4(dirs[h], device=device, dtype=dtype, kernel=k, prefill_rows=args.prefill_rows)
            except Exception as e:  # noqa: BLE001 - e.g. gemlite missing: one line, the next kernel runs
                rec["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                log.warning("int4 %s: not loaded: %s", vname, rec["error"])
                write()
                continue
            head_done = head_done or h == "quantize"
            sync(device)
            doc["seconds"][f"load_{vname}"] = time.perf_counter() - t0
            gc.collect()  # the loader's temporaries (codes unpacked per linear) are not counted as the model
            s = int4.int4_summary(m4)
            rec["int4_summary"] = s
            head = m4.get_output_embeddings()
            rec["lm_head_module"] = f"{type(head).__name__}" + (f" ({head.kernel})" if hasattr(head, "kernel") else "")
            rec["memory"] = {"allocated_after_load": None if base is None else allocated(device) - base,
                             "peak_during_load": None if base is None else torch.cuda.max_memory_allocated(device) - base,
                             "linear_bytes": linear_bytes(m4, names), "linears": len(names),
                             "lm_head_bytes": linear_bytes(m4, [head_name])}
            if isinstance(head, int4.Int4Linear):
                rec["lm_head_check"] = head_check(head, device, args.batches)
            write()
            t0 = time.perf_counter()
            try:
                measure(m4, f"int4 {vname}", device, dtype, args, vocab, rec, write)
            except Exception as e:  # noqa: BLE001 - keep what was measured, say what broke
                rec["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                rec["traceback"] = traceback.format_exc()[-2000:]
                log.warning("int4 %s: measurement failed: %s", vname, rec["error"])
            doc["seconds"][f"measure_{vname}"] = time.perf_counter() - t0
            doc["prefill_compile"] = prefill_compile_state(device)
            del m4
            free(device)
            write()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    write()
    print(f"wrote {out / 'deploy.json'} and deploy.md ({doc['seconds']['total']:.0f} s)")
    for v, t in doc["targets"].items():
        print(v, json.dumps(t))
    if doc.get("lm_head_note"):
        print(doc["lm_head_note"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
