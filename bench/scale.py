"""Speed and peak GPU memory of awqnb at 7–70B shapes, beside llm-compressor in the same run.

Builds random-initialised models in memory from real configs (timing does not depend on the
weights' values), stored in bf16 on the CPU, and quantizes them with the block engine (each block
onloaded to the GPU in turn). Where llm-compressor is importable, its AWQ (AWQModifier +
QuantizationModifier W4A16_ASYM) runs on the same shape with the same calibration token ids,
on `--llmc-layers` layers (its cost per layer is constant), and the ratio is per layer. `--peers`
runs the peers of `awqnb.compare.reference` (AutoRound `ar`, `ar@iters=…`, HQQ `hqq`) the same way, on
`--peer-layers` layers of the first shape, the whole model on the device (as those tools run it).
Every row is the median of `--repeats` runs in this process (each on a fresh copy of the built
model), all shown.

Shapes: llama3-8b, qwen2.5-7b, llama3-70b (any with `:N` for N layers, e.g. llama3-70b:4), tiny
(CPU smoke run). Calibration: `--n-calib` random token sequences of `--seqlen`, seed `--seed`.

  python bench/scale.py --shapes llama3-8b,llama3-70b:4,llama3-70b:8 --methods awq,awq_dh \
      --group-size 128 --device cuda:0 --llmc awq
  python bench/scale.py --shapes llama3-8b:4 --methods awq_gptq --peers ar --peer-layers 4
Writes results.json (provenance + every row) and summary.md.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.errors import AwqnbError
from awqnb.model.data import Calibration
from awqnb.model.provenance import versions

log = logging.getLogger("bench.scale")

# The public configs' shapes (hidden, intermediate, layers, heads, kv heads, vocab, rope theta).
SHAPES = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, vocab_size=1024, rope_theta=10000.0,
                 max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def build(shape: str, n_layers: int | None, dtype: torch.dtype, seed: int = 0):
    """A random-init causal LM of `shape` on the CPU: one block drawn from N(0, 0.02²) and copied
    into every block (fast at 70B; values do not change the timing), norms 1, RoPE exact."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(SHAPES[shape])
    mt = kw.pop("model_type")
    if n_layers:
        kw["num_hidden_layers"] = n_layers
    cfg = AutoConfig.for_model(mt, **kw)
    cfg.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    layers = model.model.layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.layers.") and not name.startswith("model.layers.0."):
                continue
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
        src = dict(layers[0].named_parameters())
        for blk in layers[1:]:
            for name, p in blk.named_parameters():
                p.copy_(src[name])
        # meta-initialised buffers (RoPE inv_freq) must be recomputed, not left as garbage
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    model.eval()
    return model, cfg


def build_spec(spec: str, dtype: torch.dtype = torch.bfloat16):
    """`build` from a shape spec 'llama3-8b' or 'llama3-70b:8' (N layers)."""
    shape, _, nl = spec.partition(":")
    return build(shape, int(nl) if nl else None, dtype)


def calibration(vocab: int, n: int, seqlen: int, seed: int) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seqlen), generator=g)
    return Calibration("random-ids", n, seqlen, seed, f"uniform random token ids, seed {seed}", list(ids))


def run_awqnb(model, method: str, gs: int, calib: Calibration, device, offload: bool, dtype: str) -> dict:
    cfg = MethodConfig(method, QuantConfig(4, gs), SearchConfig(), calib_batch_size=16, dtype=dtype)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    res = pipeline.quantize(model, cfg, calib, device=device, progress=False, offload_activations=offload)
    wall = time.perf_counter() - t0
    n = len(res.layers)
    row = {"tool": "awqnb", "method": method, "layers": n, "total_s": wall, "s_per_layer": wall / n,
           "capture_s": res.timings.get("capture_s"), "peak_gpu_gb": res.timings.get("peak_gpu_gb"),
           "compute_dtype": res.timings.get("compute_dtype"), "offload_activations": offload,
           "phases": {k: round(v, 3) for k, v in res.timings.items()
                      if isinstance(v, float) and k.endswith("_s") and k != "total_s"}}
    if torch.cuda.is_available():
        row["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    return row


def _tokenizer_dir(cfg, where: Path) -> None:
    """llm-compressor wants a folder with config.json and a tokenizer: a word-level stand-in
    (calibration is passed as token ids; the tokenizer only satisfies its loader)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    cfg.save_pretrained(where)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tok.save_pretrained(where)


def run_llmc(model, cfg, which: str, calib: Calibration, device) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    ids = torch.stack(calib.samples)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    quant = dict(ignore=["lm_head"], scheme="W4A16_ASYM", targets=["Linear"])
    recipe = ([AWQModifier(), QuantizationModifier(**quant)] if which == "awq" else [GPTQModifier(**quant)])
    with tempfile.TemporaryDirectory() as d:
        _tokenizer_dir(cfg, Path(d))
        model.config.name_or_path = d
        model.name_or_path = d
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        oneshot(model=model, recipe=recipe, dataset=ds, max_seq_length=calib.seqlen,
                num_calibration_samples=len(calib.samples), tokenizer=d)
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    n = cfg.num_hidden_layers
    return {"tool": "llm-compressor", "method": which, "layers": n, "total_s": wall, "s_per_layer": wall / n,
            "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9 if cuda else None}


def run_peer(model, cfg, name: str, gs: int, calib: Calibration, device, seed: int) -> dict:
    """One peer of `awqnb.compare.reference` on `model` (moved to `device` whole, as it runs in a
    comparison); its own timing (quantization only, imports and the move excluded)."""
    from awqnb.compare import reference

    why = reference.refusal(name)
    if why:
        raise ImportError(why)
    info = reference.quantize_reference(model, name, calibration=calib, bits=4, group_size=gs, device=device,
                                        seed=seed)
    n = cfg.num_hidden_layers
    return {"tool": info["tool"], "version": info.get("version"), "method": name, "params": info.get("params"),
            "layers": n, "total_s": info["seconds"], "s_per_layer": info["seconds"] / n,
            "peak_gpu_gb": info.get("peak_gpu_gb"),
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None}


from _common import run_dir, write_run_info  # noqa: E402 — bench/ is on sys.path when run as a script


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama3-8b")
    p.add_argument("--methods", default="awq,awq_dh")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtype", default="auto", help="awqnb compute dtype (auto = the model's bf16)")
    p.add_argument("--offload-activations", default="", help="shapes (comma list) to also run with offload")
    p.add_argument("--llmc", default="", help="llm-compressor methods to run beside: awq, gptq")
    p.add_argument("--llmc-layers", type=int, default=4)
    p.add_argument("--llmc-shapes", default="", help="shapes for llm-compressor (default: the first)")
    p.add_argument("--peers", default="",
                   help="awqnb.compare.reference peers to run beside (comma list): ar, ar@iters=N, hqq")
    p.add_argument("--peer-layers", type=int, default=4, help="layers of the first shape the peers run on")
    p.add_argument("--gptq-graph", choices=("on", "off"), default="on",
                   help="GPTQ's column loop as a CUDA graph (awqnb's default on a GPU) or eager")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the row is the median, all shown")
    p.add_argument("--no-copy", action="store_true",
                   help="quantize the built model itself, once (a host that cannot hold two copies)")
    p.add_argument("--out", default=None, help="default: bench/results/scale/<date>_<device>_<shapes>/")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("awqnb").setLevel(logging.WARNING)
    from awqnb.quant.methods import gptq as gptq_mod
    gptq_mod.CUDA_GRAPH = args.gptq_graph == "on"
    out = write_run_info(args.out or run_dir("scale", args.shapes.replace(",", "-"), args.device), args.device)
    device = torch.device(args.device)
    rows = []

    def save():
        prov = {"argv": sys.argv, "versions": versions(), "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "calibration": f"{args.n_calib} x {args.seqlen} random token ids, seed {args.seed}",
                "storage_dtype": "bfloat16 on the CPU (model), blocks onloaded one at a time",
                "gptq_column_loop": "cuda graph" if args.gptq_graph == "on" else "eager"}
        (out / "results.json").write_text(json.dumps({"provenance": prov, "rows": rows}, indent=1))

    offload_shapes = set(filter(None, args.offload_activations.split(",")))

    def repeated(fn, n):
        """Run fn() n times; the row of the median total, with every repeat's total and s/layer."""
        got = []
        for _ in range(n):
            got.append(fn())
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        order = sorted(range(len(got)), key=lambda i: got[i]["total_s"])
        row = dict(got[order[len(got) // 2]])
        row["repeats_total_s"] = [round(g["total_s"], 3) for g in got]
        row["repeats_peak_gpu_gb"] = [round(g.get("peak_gpu_gb") or 0, 3) for g in got]
        row["repeats"] = len(got)
        return row

    for spec in args.shapes.split(","):
        t0 = time.perf_counter()
        base, cfg = build_spec(spec)
        build_s = time.perf_counter() - t0
        calib = calibration(cfg.vocab_size, args.n_calib, args.seqlen, args.seed)
        log.info("%s: %d layers built in %.1f s", spec, cfg.num_hidden_layers, build_s)
        methods = args.methods.split(",")
        for method in methods:
            for off in ([False, True] if spec in offload_shapes and method == methods[0] else [False]):
                def once():
                    # --no-copy (70B: two copies do not fit the host): quantize the built model itself
                    m = base if args.no_copy else copy.deepcopy(base)
                    r = run_awqnb(m, method, args.group_size, calib, device, off, args.dtype)
                    log.info("  repeat: %.1f s, peak %.2f GB", r["total_s"], r.get("peak_gpu_gb") or 0)
                    return r
                row = repeated(once, 1 if args.no_copy else args.repeats)
                row.update(shape=spec, group_size=args.group_size)
                rows.append(row)
                log.info("%s", row)
                gc.collect()
                save()
        del base
        gc.collect()
    def beside(label: str, shape: str, layers: int, run) -> bool:
        """A reference tool's row: `run(model, cfg, calib)` on a fresh `shape` of `layers` layers per
        repeat; False (logged) when the tool cannot run here."""
        def once():
            model, cfg = build(shape, layers, torch.bfloat16)
            r = run(model, cfg, calibration(cfg.vocab_size, args.n_calib, args.seqlen, args.seed))
            log.info("  repeat: %.1f s, peak %.2f GB", r["total_s"], r.get("peak_gpu_gb") or 0)
            return r
        try:
            row = repeated(once, args.repeats)
        except (ImportError, AwqnbError) as e:
            log.warning("%s skipped: %s", label, e)
            return False
        row.update(shape=f"{shape}:{layers}", group_size=args.group_size)
        rows.append(row)
        log.info("%s", row)
        gc.collect()
        save()
        return True

    first = args.shapes.split(",")[0].split(":")[0]
    llmc_shapes = args.llmc_shapes.split(",") if args.llmc_shapes else [first]
    for which in filter(None, args.llmc.split(",")):
        for shape in llmc_shapes:
            if not beside(f"llm-compressor {which}", shape, args.llmc_layers,
                          lambda m, cfg, calib: run_llmc(m, cfg, which, calib, device)):
                break
    for name in filter(None, args.peers.split(",")):
        beside(name, first, args.peer_layers,
               lambda m, cfg, calib: run_peer(m, cfg, name, args.group_size, calib, device, args.seed))
    # ratios: llm-compressor's s/layer for the same method (awq_gptq: its gptq) over awqnb's, same base shape
    ref = {(r["shape"].split(":")[0], r["method"]): r for r in rows if r["tool"] == "llm-compressor"}
    lines = ["| shape | tool | method | layers | s/layer (median) | total s (median) | repeats: total s | "
             "peak GPU GB | llm-compressor s/layer ÷ this (its layers) | peers' s/layer ÷ this (their layers) |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---|"]
    peers = [r for r in rows if r["tool"] not in ("awqnb", "llm-compressor")]
    for r in rows:
        peer = "gptq" if r["method"] in ("gptq", "awq_gptq") else "awq"
        base_ref = ref.get((r["shape"].split(":")[0], peer))
        ratio = (f"{base_ref['s_per_layer'] / r['s_per_layer']:.2f}× (llmc {peer}, {base_ref['layers']} layers)"
                 if base_ref and r["tool"] == "awqnb" else "–")
        lab = r["method"] + (" (offload acts)" if r.get("offload_activations") else "")
        reps = ", ".join(f"{x:.1f}" for x in r.get("repeats_total_s", [r["total_s"]]))
        pr = ("; ".join(f"{q['method']} {q['s_per_layer'] / r['s_per_layer']:.2f}× ({q['layers']} layers)"
                        for q in peers if q["shape"].split(":")[0] == r["shape"].split(":")[0])
              if r["tool"] == "awqnb" else "") or "–"
        tool = r["tool"] + (f" {r['version']}" if r.get("version") else "")
        lines.append(f"| {r['shape']} | {tool} | {lab} | {r['layers']} | {r['s_per_layer']:.2f} | "
                     f"{r['total_s']:.1f} | {reps} | {r.get('peak_gpu_gb') or 0:.2f} | {ratio} | {pr} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    save()
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
