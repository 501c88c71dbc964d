"""One comparison runner: quantize → evaluate → (layer MSE) for every method and calibration seed.

`run_comparison(model, methods, seeds=..., calibration=..., datasets=...)` draws one calibration
set per seed and, for each method, quantizes a fresh exact copy of the FP model (a deep copy,
buffers included: no method sees another's quantization, evaluation or dtype cast), evaluates it
by each dataset's protocol (`awqnb.analysis.evaluate`), optionally measures the output MSE of every
linear, and frees it before the next. Methods that use no calibration data (`fp`, `rtn`) run once
and stand for every seed. The reference tools (`llmc_awq`, `llmc_gptq`, `awqnb.compare.reference`) run on
the same calibration token ids; where llm-compressor is absent or of an untested version they are
skipped with the reason, and the others still run.

Methods are named by specs (`awqnb.compare.specs`: `awq`, `awq_ref`, `robust_praq@n_calib=16`, ...).
The `Comparison` it returns (`awqnb.compare.comparison`) is tidy: per-unit NLLs per (label, seed,
dataset), summaries over seeds, verdicts against a baseline, JSON round trip with provenance.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from awqnb.analysis import layer_error
from awqnb.analysis.evaluate import PerplexityResult, eval_placement, sample_perplexity, token_perplexity
from awqnb.compare.claims import method_configs
from awqnb.compare.comparison import Comparison, RunRecord
from awqnb.compare import reference
from awqnb.compare.specs import MethodSpec, ParsedSpec, parse_spec, parse_specs
from awqnb.core.config import QuantConfig, SearchConfig
from awqnb.core.devices import sync
from awqnb.core.dtypes import parse_dtype
from awqnb.core.errors import AwqnbError
from awqnb.core.progress import tqdm
from awqnb.model.data import dataset_info, load_calibration, load_eval_texts, load_eval_tokens
from awqnb.model.devices import cast_parameters, resolve_device
from awqnb.model.provenance import versions
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.pipeline import quantize

log = logging.getLogger(__name__)

DEFAULT_SEEDS = (42, 43, 44)
__all__ = ["CalibSpec", "Comparison", "EvalSet", "MethodSpec", "RunRecord", "check_seeds", "eval_sets", "method_specs",
           "run_comparison"]


# --- inputs -----------------------------------------------------------------------------------

@dataclass
class EvalSet:
    """One evaluation set and its protocol: 'gptq-token' (`data` a 1-D token tensor, windows of
    `seqlen`, at most `max_windows`) or 'sample' (`data` a list of texts, each truncated to
    `seqlen` tokens)."""

    name: str
    protocol: str
    data: Any = field(repr=False)
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int | None = None  # None: 8 (token) / 32 (sample) on a GPU, 1 / 8 on the CPU
    source: dict | None = None  # a user's own file: its name and sha256 (data.dataset_info)

    def __post_init__(self):
        if self.protocol not in ("gptq-token", "sample"):
            raise AwqnbError(f"eval set {self.name!r}: protocol {self.protocol!r} is unknown; use 'gptq-token' or 'sample'.")

    def describe(self) -> dict:
        n = int(self.data.numel()) if isinstance(self.data, torch.Tensor) else len(self.data)
        return {"name": self.name, "protocol": self.protocol, "seqlen": self.seqlen, "max_windows": self.max_windows,
                ("n_tokens" if self.protocol == "gptq-token" else "n_texts"): n}


def eval_sets(tokenizer, token: Sequence[str] = ("wikitext2",), sample: Sequence[str] = (), *, seqlen: int = 2048,
              max_windows: int | None | Mapping[str, int | None] = None, n_samples: int = 2000,
              sample_max_length: int = 512, seed: int = 42, data_dir=None) -> list[EvalSet]:
    """Load evaluation sets by name: `token` sets (GPTQ protocol: wikitext2, c4, a file) and
    `sample` sets (each text on its own: ag_news, c4-sample, ...; `n_samples` drawn with `seed`).
    max_windows: one limit for every token set, or name → limit."""
    out = []
    for name in token:
        mw = max_windows.get(name) if isinstance(max_windows, Mapping) else max_windows
        out.append(EvalSet(name, "gptq-token", load_eval_tokens(tokenizer, name, data_dir=data_dir), seqlen, mw,
                           source=dataset_info(name) or None))
    for name in sample:
        out.append(EvalSet(name, "sample", load_eval_texts(name, n_samples=n_samples, seed=seed, data_dir=data_dir),
                           sample_max_length, source=dataset_info(name) or None))
    return out


@dataclass(frozen=True)
class CalibSpec:
    """How a calibration set is drawn: `awqnb.model.data.load_calibration(tokenizer, dataset, n_calib,
    seqlen, seed)`, once per seed."""

    dataset: str = "wikitext2"
    n_calib: int = 128
    seqlen: int = 512
    data_dir: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_seeds(seeds) -> tuple[int, ...]:
    """Calibration seeds → a tuple of distinct whole numbers ≥ 0; an int n means n seeds from 42.
    AwqnbError for fewer than one seed."""
    if isinstance(seeds, bool):
        raise AwqnbError(f"seeds={seeds!r}: give a list of calibration seeds such as (42, 43, 44) or a count ≥ 1.")
    if isinstance(seeds, int):
        if seeds < 1:
            raise AwqnbError(f"seeds={seeds}: at least one calibration seed is needed (a count ≥ 1, or a list such as 42,43,44).")
        seeds = tuple(range(42, 42 + seeds))
    seeds = tuple(seeds) if seeds is not None else ()
    if len(seeds) < 1:
        raise AwqnbError("no calibration seeds: at least one is needed (e.g. seeds=(42, 43, 44)).")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise AwqnbError(f"calibration seeds must be whole numbers ≥ 0; got {bad}.")
    if len(set(seeds)) != len(seeds):
        raise AwqnbError(f"calibration seeds {list(seeds)} repeat a seed; give distinct seeds.")
    return seeds


def method_specs(methods, variants: Mapping[str, Mapping] | None = None, quant: QuantConfig | None = None,
                 search: SearchConfig | None = None, method_params: Mapping[str, Mapping] | None = None,
                 seed: int = 42, **config_fields) -> list[MethodSpec]:
    """Labels → MethodSpecs. `methods`: specs (`awqnb.compare.specs`: registered awqnb methods,
    presets such as 'awq_ref', overrides such as 'awq_sh@outlier_percent=1', 'fp', 'llmc_awq',
    'llmc_gptq'; comma-separated text or a list; awqnb specs and `variants` go through
    `compare.method_configs`), or a mapping label → spec / MethodConfig / MethodSpec. `config_fields`
    (e.g. dtype, calib_batch_size) are set on every awqnb config built here (a spec's own overrides
    win). Unknown names fail here."""
    quant = quant or QuantConfig()
    search = search or SearchConfig()
    if isinstance(methods, str):
        methods = parse_specs(methods)
    if isinstance(methods, Mapping):
        items = list(methods.items())
    else:
        items = [(m.label if isinstance(m, (MethodSpec, ParsedSpec)) else m, m) for m in methods]
    parsed = {i: parse_spec(v) for i, (_, v) in enumerate(items) if isinstance(v, (str, ParsedSpec))}
    names = list(dict.fromkeys(p.label for p in parsed.values() if p.kind == "awqnb"))
    cfgs = method_configs(names, variants, quant, search, method_params, seed, config_fields=config_fields)
    specs: list[MethodSpec] = []
    for i, (label, v) in enumerate(items):
        if isinstance(v, MethodSpec):
            specs.append(dataclasses.replace(v, label=label))
        elif isinstance(v, MethodConfig):
            specs.append(MethodSpec(label, v.method, v))
        elif i in parsed:
            p = parsed[i]
            cal = dict(p.calibration) or None
            if p.kind == "awqnb":
                specs.append(MethodSpec(label, cfgs[p.label].method, cfgs[p.label], cal))
            else:
                specs.append(MethodSpec(label, p.method, None, cal))
        else:
            raise AwqnbError(f"method {label!r}: give a spec, a MethodConfig or a MethodSpec (got {type(v).__name__}).")
    for label in (variants or {}):
        specs.append(MethodSpec(label, cfgs[label].method, cfgs[label]))
    seen = set()
    for s in specs:
        if s.label in seen:
            raise AwqnbError(f"label {s.label!r} appears twice in the methods; give each a distinct label.")
        seen.add(s.label)
    if not specs:
        raise AwqnbError("no methods to compare; pass at least one (e.g. ['rtn', 'awq']).")
    return specs

# --- the runner -------------------------------------------------------------------------------

def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def evaluate_sets(model: nn.Module, sets: Sequence[EvalSet], tokenizer, dev: torch.device, eval_dtype=None,
                  meta: dict | None = None, progress: bool = False,
                  placement: str | None = None) -> dict[str, PerplexityResult]:
    """Each set scored on `model` as `run_comparison` scores it (its protocol, batch sizes and
    meta). placement: None = `eval_placement`'s choice (the whole model moves to the device only
    when it fits; else it stays where it was loaded and is streamed block by block); 'whole' for a
    model already on `dev` (an INT4-runtime load)."""
    how = placement or eval_placement(model, dev, eval_dtype)
    if how == "whole":
        model.to(dev)  # cast after the move: faster on the device, the same numbers
    if eval_dtype is not None:
        cast_parameters(model, eval_dtype)
    out = {}
    for es in sets:
        gpu = dev.type == "cuda"
        if es.protocol == "gptq-token":
            r = token_perplexity(model, es.data, seqlen=es.seqlen, max_windows=es.max_windows, device=dev,
                                 dataset=es.name, batch_size=es.batch_size or (8 if gpu else 1), progress=progress,
                                 placement=how)
        else:
            if tokenizer is None:
                raise AwqnbError(f"sample perplexity on {es.name} needs the tokenizer; pass tokenizer=.")
            r = sample_perplexity(model, tokenizer, es.data, max_length=es.seqlen, device=dev, dataset=es.name,
                                  batch_size=es.batch_size or (32 if gpu else 8), progress=progress, placement=how)
        r.meta.update(meta or {})
        if es.source:
            r.meta["data_file"] = es.source
        out[es.name] = r
    return out


def _as_sets(datasets, tokenizer, seqlen, max_windows, sample_max_length) -> list[EvalSet]:
    if isinstance(datasets, EvalSet):
        datasets = [datasets]
    if isinstance(datasets, Mapping):
        sets = []
        for name, data in datasets.items():
            if isinstance(data, EvalSet):
                sets.append(data)
            elif isinstance(data, torch.Tensor):
                mw = max_windows.get(name) if isinstance(max_windows, Mapping) else max_windows
                sets.append(EvalSet(name, "gptq-token", data, seqlen, mw))
            elif isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
                sets.append(EvalSet(name, "sample", list(data), sample_max_length))
            else:
                raise AwqnbError(f"dataset {name!r}: give a token tensor (token perplexity), a list of texts "
                                 "(sample perplexity) or an EvalSet.")
        datasets = sets
    datasets = list(datasets or [])
    if not datasets:
        raise AwqnbError("no evaluation datasets; pass e.g. eval_sets(tokenizer, ['wikitext2']).")
    for es in datasets:
        if not isinstance(es, EvalSet):
            raise AwqnbError(f"datasets: expected EvalSet entries (got {type(es).__name__}); see awqnb.compare.runner.eval_sets.")
    names = [es.name for es in datasets]
    if len(set(names)) != len(names):
        raise AwqnbError(f"datasets {names} repeat a name; give each evaluation set a distinct name.")
    return datasets


def run_comparison(model: nn.Module, methods, *, tokenizer=None, seeds=DEFAULT_SEEDS,
                   calibration: CalibSpec | Mapping | Callable[[int], Any] | None = None,
                   datasets=None, quant: QuantConfig | None = None, search: SearchConfig | None = None,
                   variants: Mapping[str, Mapping] | None = None, method_params: Mapping[str, Mapping] | None = None,
                   eval_seqlen: int = 2048, eval_windows: int | None | Mapping = None, sample_max_length: int = 512,
                   device=None, dtype: str = "auto", eval_dtype: torch.dtype | str | None = None,
                   calib_batch_size: int | None = None, layer_mse: bool = False, mse_samples: int = 16,
                   model_name: str | None = None, progress: bool = True,
                   on_run: Callable[[Comparison, RunRecord], None] | None = None) -> Comparison:
    """Quantize a fresh copy of `model` with every method on every calibration seed, evaluate each,
    and return a `Comparison`.

    methods: names ('fp', registered awqnb methods, 'llmc_awq', 'llmc_gptq'), a mapping label →
      name / MethodConfig / MethodSpec, or MethodSpecs (see `method_specs`); `variants` add labels
      (`compare.method_configs`). `quant`, `search`, `method_params`: the shared settings of the
      awqnb methods; `dtype`: their compute dtype ('auto' = the model's); the reference methods
      take the run's bits, group size and symmetry.
    seeds: calibration seeds (each draws its own calibration set; torch is seeded with it before
      each quantization), or a count n (seeds 42, 43, …). Fewer than one: AwqnbError.
    calibration: a CalibSpec (or a mapping of its fields; default wikitext2 128 × 512), drawn with
      `tokenizer` per seed; or a callable seed → Calibration.
    datasets: EvalSets (`eval_sets`), or a mapping name → token tensor (token perplexity, windows of
      `eval_seqlen`, at most `eval_windows`) / list of texts (sample perplexity, `sample_max_length`).
    device: where quantization and evaluation run (default: the model's); the FP `model` is never
      modified (each label gets `copy.deepcopy(model)`). eval_dtype: the dtype each evaluated copy's
      parameters are cast to (buffers such as RoPE's inv_freq stay as they are; None: no cast).
    layer_mse: the output MSE of every linear of every quantizing method, the reference tools' too
      (`layer_error.layer_mse`, FP inputs, `mse_samples` calibration samples), on the first seed only.
    on_run: called after each (label, seed) with the comparison so far (e.g. to write partial
      results).
    Unknown methods, bad seeds or settings fail before any work; a reference method that cannot
    run here is skipped with its reason (logged as a warning), the others still run.
    """
    seeds = check_seeds(seeds)
    quant = quant or QuantConfig()
    search = search or SearchConfig()
    extra = {"dtype": dtype}
    if calib_batch_size is not None:
        extra["calib_batch_size"] = calib_batch_size
    specs = method_specs(methods, variants, quant, search, method_params, seeds[0], **extra)
    if calibration is None:
        calibration = CalibSpec()
    if isinstance(calibration, Mapping):
        calibration = CalibSpec(**calibration)
    if isinstance(calibration, CalibSpec):
        if tokenizer is None and any(s.needs_calibration for s in specs):
            raise AwqnbError("drawing calibration sets needs the tokenizer; pass tokenizer= (or a callable "
                             "seed → Calibration as calibration=).")
    elif not callable(calibration):
        raise AwqnbError("calibration: give a CalibSpec, a mapping of its fields, or a callable seed → Calibration.")
    sets = _as_sets(datasets, tokenizer, eval_seqlen, eval_windows, sample_max_length)
    if isinstance(eval_dtype, str):
        eval_dtype = parse_dtype(eval_dtype) if eval_dtype != "auto" else None
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model_name = model_name or getattr(model.config, "name_or_path", None) or type(model).__name__

    refused = {s.label: reference.refusal(s.method) for s in specs if s.kind == "reference"}
    for label, why in refused.items():
        if why:
            log.warning("%s skipped: %s", label, why)

    prov = {
        "model": model_name, "model_type": getattr(model.config, "model_type", None),
        "methods": [s.describe(quant) for s in specs], "bits": quant.bits, "group_size": quant.group_size,
        "symmetric": quant.symmetric, "search": search.to_dict(), "seeds": list(seeds),
        "calibration": calibration.to_dict() if isinstance(calibration, CalibSpec) else {"callable": repr(calibration)},
        "datasets": [es.describe() for es in sets], "device": str(dev), "dtype": dtype,
        "eval_dtype": None if eval_dtype is None else str(eval_dtype).replace("torch.", ""),
        "versions": {**versions(), **reference.versions()},
        "layer_mse": bool(layer_mse), "complete": False,
    }
    comp = Comparison([], prov)
    mse_frames = []
    calibs: dict = {}

    def calib_for(spec: MethodSpec, seed: int):
        if not isinstance(calibration, CalibSpec):
            key = (seed,)
            if key not in calibs:
                calibs[key] = calibration(seed)
            return calibs[key]
        cs = dataclasses.replace(calibration, **dict(spec.calibration or {}))
        key = (cs, seed)
        if key not in calibs:
            calibs[key] = load_calibration(tokenizer, cs.dataset, n_calib=cs.n_calib, seqlen=cs.seqlen, seed=seed,
                                           data_dir=cs.data_dir)
        return calibs[key]

    todo = []
    for si, seed in enumerate(seeds):
        for spec in specs:
            if spec.needs_calibration or si == 0:
                todo.append((spec, seed, si))
    for spec, seed, si in tqdm(todo, desc="compare", disable=not progress):
        shared = not spec.needs_calibration
        rec = RunRecord(spec.label, spec.method, seed, shared=shared)
        why = refused.get(spec.label)
        if why:
            rec.status, rec.reason = "skipped", why
            comp.runs.append(rec)
            if on_run:
                on_run(comp, rec)
            continue
        meta = {"model": model_name, "method": spec.config.method if spec.config is not None else spec.method,
                "seed": None if shared else seed,
                "bits": None if spec.kind == "fp" else quant.bits,
                "group_size": None if spec.kind == "fp" else quant.group_size}
        qmodel = copy.deepcopy(model)  # a fresh exact copy, buffers included
        try:
            calib = None
            if spec.kind == "awqnb":
                cfg = dataclasses.replace(spec.config, seed=seed)
                rec.config = cfg.to_dict()
                calib = calib_for(spec, seed) if spec.needs_calibration else None
                _free(dev)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                torch.manual_seed(seed)
                sync(dev)
                t0 = time.perf_counter()
                qres = quantize(qmodel, cfg, calib, device=dev, model_name=model_name, progress=False)
                sync(dev)
                rec.quantize_s = time.perf_counter() - t0
                rec.calibration = qres.calibration
                rec.info = {"timings": qres.timings}
                comp.quant_results[(spec.label, seed)] = qres
                if layer_mse and si == 0:
                    mcal = calib if calib is not None else calib_for(spec, seed)  # rtn: the run's set
                    f = layer_error.layer_mse(model, mcal, {spec.label: (qmodel, qres)}, device=dev, max_samples=mse_samples,
                                    model_name=model_name)
                    f["seed"] = seed
                    mse_frames.append(f)
            elif spec.kind == "reference":
                calib = calib_for(spec, seed) if spec.needs_calibration else None  # hqq: none
                rec.config = spec.describe(quant)["config"]
                rec.calibration = calib.to_dict() if hasattr(calib, "to_dict") else None
                _free(dev)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                torch.manual_seed(seed)
                t0 = time.perf_counter()
                try:
                    info = reference.quantize_reference(qmodel, spec.method, calib, tokenizer, quant.bits,
                                                        quant.group_size, quant.symmetric, device=dev, seed=seed)
                except Exception as e:  # the reference tool refusing this model or setting: skip it, go on
                    why = (f"{spec.method} failed in {reference.tool(spec.method).label}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}")
                    log.warning("%s skipped: %s", spec.label, why)
                    rec.status, rec.reason = "skipped", why
                    comp.runs.append(rec)
                    if on_run:
                        on_run(comp, rec)
                    continue
                sync(dev)
                rec.quantize_s = time.perf_counter() - t0
                rec.info = info
                if layer_mse and si == 0:  # a peer's weights through awqnb's own evidence, as awqnb's
                    mcal = calib if calib is not None else calib_for(spec, seed)
                    res = reference.peer_result(model, qmodel, info, model_name=model_name)
                    f = layer_error.layer_mse(model, mcal, {spec.label: (qmodel, res)}, device=dev,
                                              max_samples=mse_samples, model_name=model_name)
                    f["seed"] = seed
                    mse_frames.append(f)
            if dev.type == "cuda" and spec.kind != "fp":
                rec.peak_mem_gb = torch.cuda.max_memory_allocated(dev) / 1e9  # GB = 10⁹ bytes (as the pipeline, bench/scale.py)
            meta.update(calibration=rec.calibration, config=rec.config, quant_seconds=rec.quantize_s)
            rec.results = evaluate_sets(qmodel, sets, tokenizer, dev, eval_dtype, meta, progress=False)
        finally:
            del qmodel
            _free(dev)
        log.info("%s seed %s: %s%s", spec.label, seed,
                 "; ".join(f"{ds} {r.ppl:.4f}" for ds, r in rec.results.items()),
                 "" if rec.quantize_s is None else f" (quantized in {rec.quantize_s:.1f} s)")
        comp.runs.append(rec)
        if on_run:
            on_run(comp, rec)
    if mse_frames:
        import pandas as pd

        comp.mse = pd.concat(mse_frames, ignore_index=True)
    comp.provenance["complete"] = True
    return comp
