"""Deployable packed INT checkpoints: bytes on disk, and (on a GPU) load memory and generation
throughput of the packed model loaded in plain transformers against the bf16 model; what
transformers does with the compressed-tensors format; packed-vs-fake perplexity.

Per model (--models, comma-separated):
  an alias / HF directory (smollm2-135m, tiny-random-llama, ...): loaded with awqnb, in --dtype;
  `llama3-8b-random`: the Llama-3-8B shape (32 layers, hidden 4096, MLP 14336, 32/8 heads, vocab
  128256) random-initialised with AutoModelForCausalLM.from_config directly on --device in bf16
  (16 GB; values do not matter for time and memory); `llama-random-small` is the same family at
  a CPU-sized shape, for checking the script.
Steps: measure the bf16 model (weights in memory, generation tokens/s at each --batches, peak
memory), quantize it in place with --method (rtn by default: calibration-free, the codes' values
do not change speed or size), save it packed under --work, free it, load the directory with
`AutoModelForCausalLM.from_pretrained(dir, dtype=bf16, device_map=device, quantization_config=
 CompressedTensorsConfig(dequantize=True))` (no awqnb code on the
load path), record what the loaded modules hold (packed int32 or dense weights, before and after
the first forward), and measure the same generation. Bytes: the packed safetensors file, and
bits per quantized weight (codes + scales + zero points); the bf16 figure is computed (2 bytes
per parameter, tied weights once), not written.
--ppl: for each --ppl-models model, quantize with --ppl-method at --ppl-group-size on
128 × 512 WikiText-2 validation blocks, evaluate the fake-quant model, save packed, reload it
with transformers and evaluate again (full WikiText-2 test, GPTQ protocol, seqlen 2048).

Writes OUT/export.json and OUT/export.md.
  GPU:  python bench/export.py --models smollm2-135m@64,llama3-8b-random@128 --ppl --device cuda:0 \
            --out bench/results/export
  CPU:  python bench/export.py --models tiny-random-llama@32 --ppl --ppl-models tiny-random-llama \
            --ppl-group-size 32 --ppl-max-windows 2 --n-calib 4 --gen-tokens 8 --batches 1,2 --device cpu --out /tmp/e
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from awqnb.export import packed as export
from awqnb.quant import pipeline
from awqnb.quant.method_config import MethodConfig
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.model.devices import resolve_device

from awqnb.model.loading import load_model
from awqnb.model.provenance import versions
log = logging.getLogger("bench.export")

RANDOM_SHAPES = {
    "llama3-8b-random": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                             max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                             tie_word_embeddings=False),
    "llama-random-small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512,
                               tie_word_embeddings=False),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mem(device) -> dict:
    if device.type != "cuda":
        return {"allocated_gb": None, "peak_gb": None}
    return {"allocated_gb": torch.cuda.memory_allocated(device) / 1e9,
            "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9}  # GB = 1e9 bytes


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def build(name: str, device, dtype):
    """(model, tokenizer or None) for an awqnb model name or a random shape."""
    if name in RANDOM_SHAPES:
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(**RANDOM_SHAPES[name])
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        return model.eval(), None
    model, tok = load_model(name, device=device, dtype=dtype)
    return model, tok


@torch.no_grad()
def generation(model, device, vocab: int, batches: list[int], new_tokens: int, prompt_len: int) -> dict:
    """tokens/s of greedy generation of exactly `new_tokens` after a random `prompt_len` prompt."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for b in batches:
        ids = torch.randint(10, vocab, (b, prompt_len), generator=g).to(device)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        _sync(device)
        _reset_peak(device)
        t0 = time.perf_counter()
        res = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        _sync(device)
        dt = time.perf_counter() - t0
        n = (res.shape[1] - prompt_len) * b
        out[f"b{b}"] = {"tokens": n, "seconds": dt, "tokens_per_s": n / dt, "peak_gb": _mem(device)["peak_gb"]}
    return out


def module_state(model) -> dict:
    """What the linears hold: packed (compressed-tensors' weight_packed) or dense weights."""
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    packed = sum(hasattr(m, "weight_packed") for m in lin)
    dense = [m.weight.dtype for m in lin if getattr(m, "weight", None) is not None]
    return {"linears": len(lin), "packed": packed, "dense": len(dense),
            "dense_dtypes": sorted({str(d).replace("torch.", "") for d in dense}),
            "classes": sorted({type(m).__name__ for m in lin})}


def bf16_bytes(model) -> int:
    """Bytes of the whole model in bf16, tied parameters counted once."""
    seen, tot = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        tot += p.numel() * 2
    return tot


def measure_model(spec: str, args, device, work: Path) -> dict:
    """One model; `spec` is `name` or `name@group_size` (SmolLM2's 576 columns need 64)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    name, _, g = spec.partition("@")
    group_size = int(g) if g else args.group_size
    dtype = getattr(torch, args.dtype)
    rec: dict = {"model": name, "group_size": group_size, "device": str(device), "dtype": args.dtype}
    _reset_peak(device)
    t0 = time.perf_counter()
    model, tok = build(name, device, dtype)
    rec["build_s"] = time.perf_counter() - t0
    vocab = model.config.vocab_size
    cfg = MethodConfig(args.method, QuantConfig(args.bits, group_size), SearchConfig(), calib_batch_size=16)
    export.check_packable(model, cfg)
    rec["bf16_model_bytes"] = bf16_bytes(model)
    lin = export.quantized_linears(model, cfg)
    rec["bf16_linear_bytes"] = sum(m.weight.numel() * 2 for m in lin.values())
    rec["bf16"] = {"memory_after_load": _mem(device)}
    rec["bf16"]["generate"] = generation(model, device, vocab, args.batches, args.gen_tokens, args.prompt_len)
    calib = None
    if pipeline.get_method(cfg.method).needs_calibration:
        from awqnb.model.data import load_calibration

        calib = load_calibration(tok, "wikitext2", n_calib=args.n_calib, seqlen=512, seed=42)
    t0 = time.perf_counter()
    res = pipeline.quantize(model, cfg, calib, device=device, model_name=name, progress=False)
    rec["quantize_s"] = time.perf_counter() - t0
    d = work / f"{name}_{cfg.tag}"
    t0 = time.perf_counter()
    export.save_packed(model, tok, d, cfg, res.metadata(), overwrite=True, dtype=dtype)
    rec["export_s"] = time.perf_counter() - t0
    meta = json.loads((d / "quantization_metadata.json").read_text())["export"]
    rec["packed_file_bytes"] = (d / "model.safetensors").stat().st_size
    rec["packed_dir_bytes"] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    rec["packed_linear_bytes"] = meta["packed_bytes"]
    rec["bits_per_quantized_weight"] = meta["bits_per_weight"]
    rec["packed_linears_vs_bf16"] = meta["packed_bytes"] / rec["bf16_linear_bytes"]
    rec["packed_file_vs_bf16_model"] = rec["packed_file_bytes"] / rec["bf16_model_bytes"]
    rec["scale_dtype"] = meta["scale_dtype"]
    del model, res, lin
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _reset_peak(device)
    base = _mem(device)["allocated_gb"] or 0.0
    t0 = time.perf_counter()
    packed = AutoModelForCausalLM.from_pretrained(
        d, dtype=dtype, device_map=str(device), quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    _sync(device)
    rec["packed"] = {"load_s": time.perf_counter() - t0}
    m = _mem(device)
    rec["packed"]["memory_after_load"] = {k: (v - base if v is not None else None) for k, v in m.items()}
    rec["packed"]["modules_after_load"] = module_state(packed)
    with torch.no_grad():
        packed(torch.ones(1, 4, dtype=torch.long, device=device))
    rec["packed"]["modules_after_first_forward"] = module_state(packed)
    rec["packed"]["memory_after_first_forward"] = _mem(device)
    rec["packed"]["generate"] = generation(packed, device, vocab, args.batches, args.gen_tokens, args.prompt_len)
    del packed
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)
    return rec


def measure_ppl(name: str, args, device, work: Path) -> dict:
    """Fake-quant vs reloaded-packed perplexity, full WikiText-2 test (GPTQ protocol)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from awqnb.model.data import load_calibration, load_eval_tokens
    from awqnb.analysis.evaluate import token_perplexity

    dtype = getattr(torch, args.dtype)
    model, tok = load_model(name, device=device, dtype=dtype)
    cfg = MethodConfig(args.ppl_method, QuantConfig(args.bits, args.ppl_group_size), SearchConfig(),
                       calib_batch_size=16, seed=42)
    export.check_packable(model, cfg)
    calib = load_calibration(tok, "wikitext2", n_calib=args.n_calib, seqlen=512, seed=42)
    res = pipeline.quantize(model, cfg, calib, device=device, model_name=name, progress=False)
    tokens = load_eval_tokens(tok, "wikitext2")
    mw = args.ppl_max_windows
    fake = token_perplexity(model, tokens, seqlen=2048, max_windows=mw, device=device, progress=False)
    d = work / f"{name}_{cfg.tag}_ppl"
    export.save_packed(model, tok, d, cfg, res.metadata(), overwrite=True, dtype=dtype)
    ref = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
    ref_buf = {n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()}
    del model
    gc.collect()
    packed = AutoModelForCausalLM.from_pretrained(
        d, dtype=dtype, device_map=str(device), quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    with torch.no_grad():
        packed(torch.ones(1, 4, dtype=torch.long, device=device))  # decompress if still packed
    got = dict(packed.named_parameters())
    diff = {n: float((got[n].detach().float().cpu() - p.float()).abs().max()) for n, p in ref.items() if n in got}
    # a forward differs only if something besides the weights does (e.g. RoPE inv_freq rounded to bf16)
    bufs = dict(packed.named_buffers())
    buf_diff = {n: {"awqnb": str(b.dtype), "reloaded": str(bufs[n].dtype),
                    "max_abs_diff": float((bufs[n].detach().float().cpu() - b.float()).abs().max())}
                for n, b in ref_buf.items() if n in bufs and b.is_floating_point()}
    pk = token_perplexity(packed, tokens, seqlen=2048, max_windows=mw, device=device, progress=False)
    shutil.rmtree(d, ignore_errors=True) if not args.keep else None
    return {"model": name, "method": cfg.method, "group_size": cfg.quant.group_size, "dtype": args.dtype,
            "protocol": f"WikiText-2 test, GPTQ token ppl, seqlen 2048, windows {fake.n_units}",
            "n_tokens": int(tokens.numel()), "ppl_fake": fake.ppl, "ppl_packed": pk.ppl,
            "equal_4_sig": f"{fake.ppl:.4g}" == f"{pk.ppl:.4g}",
            "params_bit_equal": sum(v == 0.0 for v in diff.values()), "params": len(diff),
            "max_param_abs_diff": max(diff.values()) if diff else None,
            "buffers_differing": {n: v for n, v in buf_diff.items() if v["max_abs_diff"] > 0}}


def markdown(out: dict) -> str:
    lines = ["# Packed INT export: size, memory, throughput", "",
             f"device: {out['device']}; transformers {out['versions'].get('transformers')}, compressed-tensors "
             f"{out['versions'].get('compressed-tensors')}, torch {out['versions'].get('torch')}; "
             f"{out['args']['method']} W{out['args']['bits']} (group size per row), "
             f"generation of {out['args']['gen_tokens']} tokens after a {out['args']['prompt_len']}-token prompt, greedy.", "",
             "| model | g | bf16 GB (computed) | packed file GB | packed linears / bf16 | bits/quantized weight | "
             "GPU GB bf16 | GPU GB packed after load | after 1st forward | peak GB largest batch bf16 / packed | "
             + " | ".join(f"tok/s b{b} bf16 / packed" for b in out["args"]["batches"]) + " |",
             "|" + "---|" * (10 + len(out["args"]["batches"]))]
    g = 1e9  # GB = 1e9 bytes
    for r in out["models"]:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} |")
            continue
        f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        ma, mf = r["packed"]["modules_after_load"], r["packed"]["modules_after_first_forward"]
        blast = f"b{out['args']['batches'][-1]}"
        row = [r["model"], str(r["group_size"]), f(r["bf16_model_bytes"] / g), f(r["packed_file_bytes"] / g), f"{r['packed_linears_vs_bf16']:.3f}",
               f"{r['bits_per_quantized_weight']:.3f}", f(r["bf16"]["memory_after_load"]["allocated_gb"]),
               f"{f(r['packed']['memory_after_load']['allocated_gb'])} ({ma['packed']} packed / {ma['dense']} dense)",
               f"{f(r['packed']['memory_after_first_forward']['allocated_gb'])} ({mf['packed']} packed)",
               f"{f(r['bf16']['generate'][blast]['peak_gb'])} / {f(r['packed']['generate'][blast]['peak_gb'])}"]
        row += [f"{r['bf16']['generate'][f'b{b}']['tokens_per_s']:.1f} / {r['packed']['generate'][f'b{b}']['tokens_per_s']:.1f}"
                for b in out["args"]["batches"]]
        lines.append("| " + " | ".join(row) + " |")
    if out.get("ppl"):
        lines += ["", "| model | method | g | dtype | ppl fake | ppl packed (reloaded) | equal to 4 sig. | params bit-equal | protocol |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in out["ppl"]:
            if "error" in p:
                lines.append(f"| {p['model']} | error: {p['error']} |")
                continue
            lines.append(f"| {p['model']} | {p['method']} | {p['group_size']} | {p['dtype']} | {p['ppl_fake']:.4f} | "
                         f"{p['ppl_packed']:.4f} | {p['equal_4_sig']} | {p['params_bit_equal']}/{p['params']} "
                         f"(max |Δ| {p['max_param_abs_diff']:.3g}) | {p['protocol']} |")
    lines += ["", "What transformers does: " + out["transformers_behavior"], ""]
    return "\n".join(lines)


def behavior(models: list[dict]) -> str:
    ok = [r for r in models if "packed" in r]
    if not ok:
        return "not measured"
    r = ok[0]["packed"]
    a, f = r["modules_after_load"], r["modules_after_first_forward"]
    when = ("at load (no linear holds packed weights after from_pretrained)" if a["packed"] == 0 else
            "on the first forward (linears hold packed int32 after load)" if f["packed"] == 0 else
            "never: linears stay packed")
    return (f"it dequantizes the packed INT weights to dense {', '.join(f['dense_dtypes'])} tensors {when}, "
            f"and runs ordinary dense matmuls ({', '.join(f['classes'])}); no INT4 kernel runs, so GPU memory "
            "and speed after loading are those of the bf16 model; the packed format saves disk and download.")


from _common import run_dir, write_run_info  # noqa: E402 — bench/ is on sys.path when run as a script


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m@64,llama3-8b-random@128", help="name or name@group_size, comma-separated")
    p.add_argument("--method", default="rtn")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--ppl", action="store_true", help="also packed-vs-fake perplexity (needs WikiText-2)")
    p.add_argument("--ppl-models", default="smollm2-135m")
    p.add_argument("--ppl-method", default="awq")
    p.add_argument("--ppl-group-size", type=int, default=64)
    p.add_argument("--ppl-max-windows", type=int, default=None, help="default: the full test set")
    p.add_argument("--work", default=None, help="where packed checkpoints are written (default OUT/work)")
    p.add_argument("--keep", action="store_true", help="keep the packed checkpoints")
    p.add_argument("--out", default=None, help="default: bench/results/export/<date>_<device>_<models>/")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    export.require_compressed_tensors()
    device = resolve_device(args.device)
    out_dir = write_run_info(args.out or run_dir("export", "-".join(m.split("@")[0] for m in args.models.split(",")),
                                                   device), device)
    work = Path(args.work) if args.work else out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    vers = versions()
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
           "args": vars(args), "versions": vers, "models": [], "ppl": []}

    def write():
        out["transformers_behavior"] = behavior(out["models"])
        (out_dir / "export.json").write_text(json.dumps(out, indent=1, default=str))
        (out_dir / "export.md").write_text(markdown(out))

    for name in [m for m in args.models.split(",") if m]:
        log.info("measuring %s", name)
        try:
            out["models"].append(measure_model(name, args, device, work))
        except Exception as e:  # one failing model must not lose the others' figures
            log.exception("model %s failed", name)
            out["models"].append({"model": name, "error": f"{type(e).__name__}: {e}"})
        write()
    if args.ppl:
        for name in [m for m in args.ppl_models.split(",") if m]:
            try:
                out["ppl"].append(measure_ppl(name, args, device, work))
            except Exception as e:
                log.exception("ppl %s failed", name)
                out["ppl"].append({"model": name, "error": f"{type(e).__name__}: {e}"})
            write()
    write()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.write(markdown(out) + "\n")
    return 1 if any("error" in r for r in out["models"] + out["ppl"]) else 0


if __name__ == "__main__":
    sys.exit(main())
