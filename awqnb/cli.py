"""`awqnb quantize | eval | compare | report` — a thin command line over the library."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from awqnb.core.config import DTYPE_NAMES
from awqnb.core.errors import AwqnbError

log = logging.getLogger("awqnb")


def _method_params(args) -> dict:
    from awqnb.compare.specs import parse_assignment

    params = {k[3:]: v for k, v in vars(args).items() if k.startswith("mp_") and v is not None}
    for kv in args.param or []:
        k, v = parse_assignment(kv, "--param", "--param outlier_percent=5")
        params[k] = v
    return params


# The seeds' own spellings of some flags, kept as aliases.
_SEED_ALIASES = {"use_heuristic": ("--no-heuristic", False)}


def _method_param_flags(p: argparse.ArgumentParser) -> None:
    """One flag per method parameter of every registered method (`outlier_percent` →
    `--outlier-percent`; booleans get `--x/--no-x`); the chosen method validates what it gets."""
    from awqnb.quant.methods import REGISTRY

    defaults: dict = {}
    owners: dict = {}
    for name, cls in sorted(REGISTRY.items()):
        for k, v in cls.PARAMS.items():
            defaults.setdefault(k, v)
            owners.setdefault(k, []).append(name)
    g = p.add_argument_group("method parameters")
    for k, v in sorted(defaults.items()):
        flag = "--" + k.replace("_", "-")
        hlp = f"{', '.join(owners[k])} (default {v})"
        if isinstance(v, bool):
            g.add_argument(flag, dest=f"mp_{k}", action=argparse.BooleanOptionalAction, default=None, help=hlp)
            if k in _SEED_ALIASES:
                alias, value = _SEED_ALIASES[k]
                g.add_argument(alias, dest=f"mp_{k}", action="store_const", const=value, default=None,
                               help=f"same as {'--' if value else '--no-'}{k.replace('_', '-')} (default: not given)")
        else:
            g.add_argument(flag, dest=f"mp_{k}", type=type(v) if v is not None else str, default=None, help=hlp)


def _quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, HF directory, GGUF file or Hub id")
    p.add_argument("--method", default="awq",
                   help="quantization method (see `awqnb quantize --list`), full_<method>, the preset awq_ref, "
                        "or a spec with overrides such as awq_sh@outlier_percent=1")
    p.add_argument("--bits", type=int, default=4, help="bits per weight")
    p.add_argument("--group-size", type=int, default=None,
                   help="weights per scale, -1 = per channel (default: 128, or the largest of 64/32/16 that "
                        "divides every linear's input width)")
    p.add_argument("--sym", action="store_true", help="symmetric grid [-(2^(b-1)-1), 2^(b-1)-1] (default: asymmetric, "
                                                      "[0, 2^b-1] with a zero point)")
    p.add_argument("--n-calib", type=int, default=128, help="calibration samples")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--calib-dataset", default="wikitext2", help="wikitext2, wikitext2-simple, c4 or a .txt path")
    p.add_argument("--n-grid", type=int, default=20, help="AWQ α grid: α ∈ {0, 1/N, …, 1}")
    p.add_argument("--salience", choices=["l1", "l2"], default="l2",
                   help="activation salience per input channel: mean |x| (l1) or sqrt(mean x²) (l2)")
    p.add_argument("--duo-scaling", action="store_true",
                   help="AutoAWQ's duo scaling: s = x^α / w^(1-α) (default: off, s = x^α)")
    p.add_argument("--clip", action="store_true", help="AutoAWQ-style weight clipping search (default: off)")
    p.add_argument("--propagate", choices=["quantized", "fp"], default="quantized",
                   help="what the next block is calibrated on: this block's quantized or FP output")
    p.add_argument("--alpha-select", choices=["argmin", "smooth"], default="argmin",
                   help="α from the loss curve: argmin, or smooth = argmin of its 3-point moving average")
    p.add_argument("--layer-batch-size", type=int, default=1, help="decoder blocks calibrated per pass")
    p.add_argument("--calib-batch-size", type=int, default=16, help="calibration samples per forward")
    p.add_argument("--lm-head", choices=["fp16", "quantize"], default="fp16",
                   help="keep the output head in floating point, or quantize it with RTN")
    p.add_argument("--lmhead-chunks", type=int, default=8, help="row chunks the head is quantized in (memory)")
    p.add_argument("--param", action="append", help="method parameter key=value (repeatable; default: none, "
                                                     "each method's defaults below)")
    _method_param_flags(p)
    p.add_argument("--seed", type=int, default=42, help="seed of the calibration draw and of random choices")
    p.add_argument("--device", default="auto", help="where blocks are computed: auto (cuda:0 if present, else cpu), "
                                                   "cpu, cuda:N")
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_NAMES),
                   help="compute dtype of the block forwards (auto: the model's own; quantization math is fp32)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations in pinned CPU memory (when they do not fit the GPU: a run "
                        "that would not fit is refused before it starts, naming this flag)")


def method_config(args):
    """The MethodConfig of the flags; --method is a method spec (`awqnb.compare.specs`: 'awq',
    'awq_ref', 'full_praq', 'awq_sh@outlier_percent=1', ...) whose overrides win over the flags
    (its n_calib, calib_seqlen, calib_dataset set those flags)."""
    from awqnb.compare.specs import parse_spec
    from awqnb.core.config import QuantConfig, SearchConfig

    spec = parse_spec(args.method)
    for k, v in spec.run.items():
        setattr(args, k, v)
    return spec.method_config(
        QuantConfig(args.bits, 128 if args.group_size is None else args.group_size, args.sym),
        SearchConfig(n_grid=args.n_grid, salience=args.salience, duo_scaling=args.duo_scaling,
                     clip=args.clip, propagate=args.propagate, alpha_select=args.alpha_select),
        _method_params(args),
        args.seed,
        lm_head=args.lm_head,
        lmhead_chunks=args.lmhead_chunks,
        layer_batch_size=args.layer_batch_size,
        calib_batch_size=args.calib_batch_size,
        dtype=args.dtype,
        plan=_plan(args),
    )


def _plan(args):
    """The mixed-precision plan of --plan FILE or --keep LAYER.FAMILY[:BITS],... (None without)."""
    from awqnb.quant.plan import Plan

    plan_file, keep = getattr(args, "plan", None), getattr(args, "keep", None)
    if plan_file is not None and keep is not None:
        raise AwqnbError("give --plan FILE or --keep LAYER.FAMILY[:BITS],..., not both.")
    if plan_file is not None:
        plan, source = Plan.read(plan_file), f"--plan {plan_file}"
    elif keep is not None:  # --keep "" too: parse_keep refuses an empty list
        plan, source = Plan.parse_keep(keep, default_bits=8), f"--keep {keep}"
    else:
        return None
    plan.check_base_bits(args.bits, source)  # entries at the run's own bits would change nothing
    return plan


def cmd_quantize(args) -> int:
    import torch

    from awqnb.export import packed as export
    from awqnb.model import devices, loading, saving, sources
    from awqnb.quant import pipeline
    from awqnb.model.data import load_calibration
    from awqnb.quant.methods import get_method

    if args.list:
        from awqnb.quant.methods import REGISTRY

        width = max(map(len, REGISTRY))
        for name, cls in sorted(REGISTRY.items()):
            first = (cls.__doc__ or "").strip().splitlines()[0] if (cls.__doc__ or "").strip() else ""
            first = first.removeprefix(f"{name}:").strip()
            sys.stdout.write(f"{name:<{width}}  {first}\n")
        return 0
    cfg = method_config(args)
    method_cls = get_method(cfg.method)
    method_cls(cfg)  # validates method params before loading anything
    if method_cls.needs_calibration:
        from awqnb.analysis.evaluate import check_positive

        check_positive(n_calib=(args.n_calib, 1), calib_seqlen=(args.calib_seqlen, 2))
    out_root = Path(args.output_dir)
    saving.check_writable(out_root)  # a read-only or full disk is refused now, not after an hour of quantizing
    sources.check_source(args.model)  # an unsupported architecture is refused before the weights load
    device = devices.resolve_device(args.device)
    # the model stays on the CPU: the block engine moves one block at a time to `device`
    model, tok = loading.load_model(args.model)
    sources.check_supported(model)
    if args.group_size is None:
        args.group_size = _default_group_size(model)
        cfg = method_config(args)
    from awqnb.quant.plan import check_model

    check_model(cfg.plan, model, sources.short_name(args.model))  # a layer or family it lacks: before calibration
    if args.format == "packed":
        export.check_packable(model, cfg, allow_unservable=args.allow_unservable)  # before minutes of quantizing
    tag = saving.model_tag(args.model, cfg, _calibration_settings(args) if method_cls.needs_calibration else None,
                           fmt=args.format)
    dest = out_root / tag
    if dest.exists() and any(dest.iterdir()) and not args.overwrite:
        raise AwqnbError(f"{dest} already exists; pass --overwrite or choose another --output-dir.")
    calib = None
    if method_cls.needs_calibration:
        calib = load_calibration(tok, args.calib_dataset, n_calib=args.n_calib, seqlen=args.calib_seqlen,
                                 seed=args.seed)
    torch.manual_seed(args.seed)
    result = pipeline.quantize(model, cfg, calib, device=device, model_name=args.model,
                                offload_activations=args.offload_activations)
    meta = result.metadata()
    dtype = export.source_dtype(args.model)  # the checkpoint's own dtype, not the fp32 working copy
    if args.format == "packed":
        path = export.save_packed(model, tok, dest, cfg, meta, overwrite=args.overwrite, result=result, dtype=dtype,
                                  allow_unservable=args.allow_unservable)
    else:
        path = saving.save_quantized(model, tok, dest, meta, overwrite=args.overwrite, result=result, dtype=dtype)
    log.info("saved %s (%.1f s)", path, result.timings["total_s"])
    sys.stdout.write(f"{path}\n")
    return 0


def _default_group_size(model) -> int:
    """128, or the largest smaller power of two that divides every quantized linear's input width
    (SmolLM2's 576, the tiny models' 160), so the bare command works on every supported model."""
    from torch import nn

    from awqnb.model.arch import blocks, resolve_spec

    widths = {m.in_features for b in blocks(model, resolve_spec(model)) for m in b.modules()
              if isinstance(m, nn.Linear)}
    gs = next((g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths)), -1)
    if gs != 128:
        log.info("--group-size not given: using %d (128 does not divide the input widths %s)", gs, sorted(widths))
    return gs


def _calibration_settings(args) -> dict:
    """What of the calibration settings decides the result (a file by its content), for the directory
    name; not `statcache.calibration_key`, which hashes loaded token ids."""
    import hashlib

    key = {"dataset": args.calib_dataset, "n_calib": args.n_calib, "seqlen": args.calib_seqlen}
    p = Path(args.calib_dataset).expanduser()
    if p.is_file():
        key["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return key


def cmd_eval(args) -> int:
    from awqnb.model import checkpoint, devices, loading, saving
    from awqnb.export import packed as export
    from awqnb.model.data import (EVAL_TEXT_SETS, EVAL_TOKEN_SETS, TEXT_FILE_SUFFIXES, dataset_info,
                                  is_text_file, load_eval_texts, load_eval_tokens)
    from awqnb.analysis.evaluate import check_positive, eval_placement, sample_perplexity, token_perplexity
    from awqnb.engine.budget import check_eval

    # settings and data are checked before the model loads
    check_positive(seqlen=(args.seqlen, 2), n_samples=(args.n_samples, 1))
    if args.max_windows is not None:
        check_positive(max_windows=(args.max_windows, 1))
    own = is_text_file(args.dataset)
    if not own and args.dataset not in EVAL_TOKEN_SETS + EVAL_TEXT_SETS + ("c4-sample",):
        raise AwqnbError(f"--dataset {args.dataset!r} is unknown: use one of wikitext2, c4, ag_news, c4-sample, "
                         f"or a path to your own {', '.join(TEXT_FILE_SUFFIXES)} file.")
    protocol = args.protocol
    if protocol == "auto":
        protocol = "token" if own or args.dataset in EVAL_TOKEN_SETS else "sample"
    if protocol == "token" and not own and args.dataset not in EVAL_TOKEN_SETS:
        raise AwqnbError(f"--dataset {args.dataset} has no token protocol; use --protocol sample.")
    if args.text_column is not None and not (own and Path(args.dataset).suffix in (".jsonl", ".parquet")):
        raise AwqnbError(f"--text-column applies to a .jsonl or .parquet file, not to {args.dataset!r} "
                         "(a .txt is read as it is); drop the flag.")
    args.text_column = args.text_column or "text"
    info = dataset_info(args.dataset, args.text_column)  # name + sha256 of the user's file, read now
    if args.json:
        saving.check_writable(Path(args.json).parent)  # a file in the way: now, not after the evaluation
    device = devices.resolve_device(args.device)
    local = Path(args.model).expanduser()
    records = checkpoint.read_records(local) if local.is_dir() else None  # malformed files: one line
    from awqnb.export import int4

    runtime = int4.resolve_runtime(args.model, args.runtime, args.int4_kernel)[0]  # auto: int4 for a packed dir
    if runtime == "int4":
        model, tok, prov = int4.load_for_eval(args.model, device=device, runtime=args.runtime,
                                              kernel=args.int4_kernel)
        load_on, why = device, "the int4 runtime loads onto the device"
    else:
        if export.is_packed(args.model):
            checkpoint.require_compressed_tensors()  # a clear message instead of transformers' ImportError
        load_on, why = _eval_load_device(args.model, device)
        model, tok = loading.load_model(args.model, device=load_on)
    meta = {"model": args.model, "method": "fp", "runtime": runtime}
    if runtime == "int4":
        meta["int4"] = prov["int4"]
    if records is not None and (records[1] or records[2]):
        from awqnb.api import detect_quantization

        d = detect_quantization(local)  # e.g. written by llm-compressor: no awqnb metadata
        if d["quantized"]:
            meta.update(method=d["method"] or d["quant_method"] or "quantized", bits=d["bits"],
                        group_size=d["group_size"])
        q = records[2] or {}
        if q:
            meta.update(calibration=q.get("calibration"), model=q.get("model", args.model))
    # whole where the loaded model fits the device, else streamed block by block; one that cannot
    # fit even streamed is refused before any window is scored
    how = eval_placement(model, device)
    batch_size = 1 if protocol == "token" else 16  # the protocols' defaults below
    if protocol == "token":
        check_eval(model, device, how, args.seqlen, batch_size)  # windows are seqlen long: before reading data
        tokens = load_eval_tokens(tok, args.dataset, text_column=args.text_column)
        max_windows = args.max_windows
        if args.dataset == "c4" and max_windows is None:
            max_windows = 256  # GPTQ's C4 protocol: 256 windows
        res = token_perplexity(model, tokens, seqlen=args.seqlen, max_windows=max_windows, device=device,
                               dataset=args.dataset, batch_size=batch_size, placement=how)
    else:
        texts = load_eval_texts(args.dataset, n_samples=args.n_samples, text_column=args.text_column)
        if device.type == "cuda":  # batches are as long as their longest text, at most seqlen
            longest = max((len(tok(t, add_special_tokens=True).input_ids) for t in texts), default=2)
            check_eval(model, device, how, max(2, min(args.seqlen, longest)), batch_size)
        res = sample_perplexity(model, tok, texts, max_length=args.seqlen, device=device, dataset=args.dataset,
                                batch_size=batch_size, placement=how)
    log.info("model loaded on %s (%s); evaluated on %s, placement %s", load_on, why, device, res.meta["placement"])
    res.meta.update(meta)
    if info:
        res.meta["data_file"] = info
    if args.json:
        res.to_json(args.json)
    src = f" (sha256 {info['sha256'][:12]})" if info else ""
    sys.stdout.write(f"{meta['model']} [{meta['method']}] {res.dataset}{src} {res.protocol} ppl seqlen={res.seqlen} "
                     f"units={res.n_units} runtime={runtime}: {res.ppl:.4f}\n")  # the number last: scripts split it off
    return 0


def _eval_load_device(name: str, device):
    """(where `awqnb eval` loads a dense model, why): on `device` unless it is a CUDA GPU whose free
    memory would not take the weights (sized from the checkpoint's headers before loading, against
    the whole-model rule of `awqnb.analysis.evaluate.eval_placement`); then, or when the size is not
    known before loading (an alias, a GGUF, a Hub id), on the CPU, and evaluation's placement
    decides on the loaded model whether to move it whole or stream it block by block."""
    import torch

    from awqnb.analysis.evaluate import WHOLE_FRACTION
    from awqnb.engine.budget import GB, checkpoint_bytes

    if device.type != "cuda":
        return device, f"{device.type} device: no memory check"
    size = checkpoint_bytes(name)
    free, _ = torch.cuda.mem_get_info(device)
    if size is None:
        return torch.device("cpu"), "its size is not known before loading"
    if size <= WHOLE_FRACTION * free:
        return device, f"{size / GB:.2f} GB of weights, {free / GB:.2f} GB free on {device}"
    return torch.device("cpu"), (f"{size / GB:.2f} GB of weights > {WHOLE_FRACTION:.0%} of the "
                                 f"{free / GB:.2f} GB free on {device}")


def cmd_compare(args) -> int:
    import pandas as pd

    from awqnb.analysis.evaluate import PerplexityResult, comparison_table
    from awqnb.analysis.stats import SINGLE_RUN_NOTE

    results: dict = {}
    names = []
    for f in args.results:
        r = PerplexityResult.read(f)  # missing, not JSON, another schema: one line each
        name = r.meta.get("label") or f"{r.meta.get('method', 'fp')}:{Path(f).stem}"
        names.append(name)
        results.setdefault(name, {})[r.dataset] = r
    names = list(dict.fromkeys(names))
    baseline = args.baseline or names[0]
    if baseline not in results:  # a bare method or file stem names the one result it matches
        hits = [n for n in names if baseline in n.split(":", 1)]
        if len(hits) > 1:
            raise AwqnbError(f"--baseline {baseline!r} matches several results {hits}; give one of those names.")
        if not hits:
            raise AwqnbError(f"--baseline {baseline!r} is not one of {names} (a method or file name of one of them)")
        baseline = hits[0]
    df = comparison_table(results, baseline=baseline)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        sys.stdout.write(df.drop(columns=["noise"]).to_string(index=False) + "\n")
    sys.stdout.write(f"Note: {SINGLE_RUN_NOTE}\n")
    if args.csv:
        from awqnb.core.files import atomic_write

        try:
            atomic_write(args.csv, df.to_csv(index=False))
        except OSError as e:
            raise AwqnbError(f"cannot write --csv {args.csv} ({e.strerror or e}); choose a writable path.") from e
    return 0


def _read_params_file(path: str) -> dict:
    from awqnb.core.files import read_yaml_mapping

    params = read_yaml_mapping(path, "--params", "of notebook parameter: value")
    for k, flag in (("model", "--models"), ("models", "--models"), ("methods", "--methods")):
        if k in params:
            raise AwqnbError(f"--params {path} sets {k!r}: pass it as {flag} instead.")
    return params


def cmd_report(args) -> int:
    import yaml

    from awqnb.workbench.grid import make_grid
    from awqnb.workbench.sweep import run_sweep

    params = _read_params_file(args.params) if args.params else {}
    for kv in args.param:
        if "=" not in kv:
            raise AwqnbError(f"--param {kv!r} must look like name=value, e.g. --param n_calib=16")
        k, v = kv.split("=", 1)
        params[k.strip()] = yaml.safe_load(v)  # YAML literals: 16, true, [], [ag_news], 'rtn'
    models_ = args.models or args.model or (None if args.grid else "smollm2-135m")
    methods = args.methods or (None if args.grid else "rtn,awq")
    grid = make_grid(models_, methods, args.seeds, args.group_sizes, params, args.notebook, grid_file=args.grid)
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # log lines print above the progress bars instead of through them
        result = run_sweep(grid, args.output_dir, args.executor, force=args.force, ray_address=args.ray_address,
                           cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run, max_retries=args.retries,
                           hide_code=args.hide_code, timeout=args.timeout)
    for r in result.runs:
        note = " (already complete)" if r.skipped else " (run by another sweep)" if r.by_other else ""
        sys.stdout.write(f"{r.state:<8} {r.model}: {r.dir if r.dir is not None else '(no run directory)'}{note}\n")
    n_skip = sum(r.skipped for r in result.runs)
    sys.stdout.write(f"index: {result.index}\n")
    sys.stdout.write(f"{len(result.runs)} run(s): {len(result.executed)} executed, {n_skip} already complete; "
                     f"{result.seconds:.1f} s ({args.executor})\n")
    if result.failed:
        sys.stderr.write(f"awqnb: {len(result.failed)} of {len(result.runs)} report(s) failed:\n")
        for r in result.failed:
            where = r.dir / f"{r.spec.notebook.stem}.ipynb" if r.dir is not None else "no run directory"
            first = (r.error or "").strip().splitlines()[0] if (r.error or "").strip() else "no error recorded"
            sys.stderr.write(f"  {r.model}: {first} ({where})\n")  # one line per run; run.json has it all
        return 1
    return 0


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it already says it (None: no default)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if not action.option_strings or "default" in h or action.default in (None, argparse.SUPPRESS):
            return h
        d = ("off" if not action.default else "on") if isinstance(action.default, bool) else action.default
        return f"{h} (default: {d})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="awqnb", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, including what transformers prints while loading a model")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it in the HF layout",
                       formatter_class=_Help,
                       description="Quantize a model block by block with one method and save it under "
                                   "OUTPUT_DIR/<model>_<method>_w<bits>_g<group>_..._<hash8>/ (packed INT weights by "
                                   "default, with quantization_metadata.json and the replay record). `--list` shows "
                                   "the methods.")
    _quant_args(q)
    q.add_argument("--output-dir", default="quantized", help="where the model directory is written")
    q.add_argument("--overwrite", action="store_true", help="replace an existing result of the same configuration")
    q.add_argument("--format", choices=["packed", "fake"], default="packed",
                   help="packed: compressed-tensors pack-quantized INT weights that transformers/vLLM load "
                        "(needs equal groups); fake: dequantized weights in the checkpoint's dtype (research copy)")
    q.add_argument("--allow-unservable", action="store_true",
                   help="with --format packed: write 2/3-bit linears or a quantized lm_head anyway "
                        "(vLLM will not load them; transformers and awqnb do)")
    q.add_argument("--list", action="store_true", help="list the available methods and exit")
    q.add_argument("--plan", default=None, metavar="FILE",
                   help="mixed-precision plan JSON (awqnb.analysis.plans.plan_from_sensitivity(...).to_json): "
                        "(layer, family, bits) kept at 8 bits or 16 = floating point (default: none)")
    q.add_argument("--keep", default=None, metavar="L.FAMILY[:BITS],...",
                   help="keep these families at other bits, e.g. 12.down,28.gate_up:16 (bits default 8; "
                        "families qkv, vo, gate_up, down; 16 = floating point, left out of the packed set; default: none)")
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model (alias, HF dir or GGUF)", formatter_class=_Help,
                       description="Perplexity of a model (an alias, an HF or awqnb directory, packed or not, or a "
                                   "GGUF) on a data set or your own text file; one line on stdout, --json for the "
                                   "per-window NLLs that `awqnb compare` reads.")
    e.add_argument("--model", default="smollm2-135m", help="alias, HF directory, GGUF file or Hub id")
    e.add_argument("--dataset", default="wikitext2",
                   help="wikitext2, c4 (token protocol), ag_news, c4-sample (sample protocol), or your own "
                        ".txt / .jsonl / .parquet file (its name and sha256 are recorded beside the number)")
    e.add_argument("--protocol", choices=["auto", "token", "sample"], default="auto",
                   help="token: GPTQ windows over the joined text; sample: each line / record on its own "
                        "(auto: token for wikitext2, c4 and files, sample for ag_news, c4-sample)")
    e.add_argument("--text-column", default=None, help="the text field of a .jsonl / .parquet file (default: text)")
    e.add_argument("--seqlen", type=int, default=2048, help="tokens per window (token) / max tokens per text (sample)")
    e.add_argument("--max-windows", type=int, default=None,
                   help="evaluate only the first N windows (default: all; c4: 256, GPTQ's protocol)")
    e.add_argument("--n-samples", type=int, default=2000, help="texts evaluated under the sample protocol")
    e.add_argument("--device", default="auto", help="auto (cuda:0 if present, else cpu), cpu, cuda:N")
    e.add_argument("--json", default=None, help="write the result (with per-window NLL) here (default: none)")
    e.add_argument("--runtime", choices=["dense", "int4", "auto"], default="auto",
                   help="auto (default): int4 for a packed directory, else dense; int4: a packed directory's "
                        "<=4-bit linears as Int4Linear on a 4-bit kernel, no dense copy (awqnb.export.int4); "
                        "dense: packed weights dequantized at load (transformers). Same perplexity to rounding")
    e.add_argument("--int4-kernel", choices=["auto", "gemlite", "torch", "dequant"], default="auto",
                   help="with --runtime int4: auto (gemlite on CUDA if installed, else torch's int4 kernel), "
                        "gemlite (pip install gemlite; CUDA), torch, dequant (per call)")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("compare", help="compare eval JSON files: delta %%, 95%% CI and verdict (one run each: "
                                       "evaluation noise only)")
    c.add_argument("results", nargs="+")
    c.add_argument("--baseline", default=None)
    c.add_argument("--csv", default=None)
    c.set_defaults(fn=cmd_compare)

    r = sub.add_parser("report", help="run a report notebook for every run of a grid (in-process or on Ray); "
                                      "skip complete runs; write index.html",
                       description="Run notebooks/<notebook>.ipynb with papermill once per run of the grid models x "
                                   "method sets x seeds x group sizes into OUTPUT_DIR/<model>/<tag>_<id>/ (executed "
                                   "notebook, offline HTML, metrics.json, run.json), then write OUTPUT_DIR/index.html. "
                                   "A run is known by the hash of its config: rerunning the command skips complete runs "
                                   "and redoes failed or interrupted ones (--force redoes all). A failing run does not "
                                   "stop the others; the exit status is 1 if any failed. `papermill --help-notebook "
                                   "notebooks/<notebook>.ipynb` lists the notebook's parameters. Progress: bars per "
                                   "stage, per block and per evaluation window on a terminal; plain timestamped lines "
                                   "(a heartbeat at least every 30 s) when stderr is not one. The HTML reports show "
                                   "outputs only (--show-code for the code).")
    r.add_argument("--model", default=None, help="one model (same as --models with one name)")
    r.add_argument("--models", default=None, help="comma-separated models (default smollm2-135m)")
    r.add_argument("--methods", default=None,
                   help="comma-separated methods compared in each run (default rtn,awq); several sets: 'rtn,awq;rtn,awq_sh'")
    r.add_argument("--seeds", default=None, help="comma-separated seeds, one run each (default: the notebook's)")
    r.add_argument("--group-sizes", default=None, help="comma-separated group sizes, one run each (default: the notebook's)")
    r.add_argument("--grid", default=None, help="YAML grid: models, methods, seeds, group_sizes, params, notebook "
                                               "(flags given on the command line win)")
    r.add_argument("--params", default=None, help="YAML file of notebook parameters (name: value)")
    r.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="one notebook parameter (repeatable)")
    r.add_argument("--output-dir", default="reports", help="where runs and index.html go (default reports)")
    r.add_argument("--notebook", default=None, help="notebook name in notebooks/ or an .ipynb path (default model_report)")
    r.add_argument("--force", action="store_true", help="redo every run, complete ones too")
    r.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one run after another in this process (default); ray: each run a Ray task")
    r.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster (host:port, ray://host:port or auto); default: start a local one "
                        "using this machine's CPUs and GPUs")
    r.add_argument("--gpus-per-run", type=float, default=None,
                   help="GPUs each Ray task asks for; a fraction (0.5) runs small models side by side "
                        "(default 1 where the cluster has GPUs, else 0)")
    r.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs each Ray task asks for (default 1)")
    r.add_argument("--retries", type=int, default=1, help="Ray retries of a run whose worker died (default 1)")
    r.add_argument("--show-code", dest="hide_code", action="store_false", default=True,
                   help="show the notebook's code cells in the HTML reports (default: code hidden, outputs only; "
                        "the executed .ipynb beside each report always has it)")
    r.add_argument("--hide-code", dest="hide_code", action="store_true",
                   help="leave code cells out of the HTML reports (the default)")
    r.add_argument("--timeout", type=int, default=None, help="seconds per notebook cell (default: none)")
    r.set_defaults(fn=cmd_report)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:  # their INFO lines ("Executing notebook with kernel") say nothing a progress bar does not
        for name in ("papermill", "traitlets", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except AwqnbError as e:
        sys.stderr.write(f"awqnb: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("awqnb: interrupted\n")
        # a notebook task the interrupt cut short (its kernel shut down) is reported by asyncio when
        # it is collected, as a traceback after this line: noise, the run is already marked interrupted
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            # the sweep's state is on disk; Ray's own teardown can abort (SIGABRT) on a reply for a
            # task it force-cancelled, which would turn exit status 130 into a crash
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130


if __name__ == "__main__":
    sys.exit(main())
