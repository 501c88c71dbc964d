"""Perplexity protocols and method comparisons.

- Token perplexity, GPTQ protocol: a token stream cut into non-overlapping windows of `seqlen`
  (remainder dropped), each scored on its own; `ppl = exp(mean over windows of the window's mean
  NLL)` (all windows have `seqlen − 1` predicted tokens).
- Sample perplexity: each text scored on its own (truncated to `max_length`);
  `ppl = exp(Σ NLL / Σ predicted tokens)`.
- Comparisons (`comparison_table`: one result per method): delta % against a baseline with the
  95% interval and verdict of `awqnb.analysis.stats` (the one home for verdicts). One result per method
  measures the evaluation units' sampling noise only, so a method that uses calibration gets no
  verdict there ('cannot separate seeds'); `awqnb.compare.runner.Comparison.verdicts` judges over seeds.
- A mean NLL beyond what a float can exponentiate (≈ 709 nats) gives ppl = inf, not an error.

The logits are never materialised for a whole window: the final hidden states go through the
output head in slices of `logit_chunk` positions (Gemma's 262k vocabulary), with the model's
final logit soft-capping applied when its config has one.

Where the model runs (`placement`, chosen by `eval_placement` when 'auto'):
- 'whole': the model is moved to the device and run as one module (and stays there, as before).
  Chosen when it is there already, when the device is not a CUDA GPU (the CPU holds the model
  anyway; MPS shares host memory), or when the weights still to move take at most 80% of the
  GPU's free memory: that is one copy of the weights, which a streamed walk makes too, and
  then no more moves, so it is never slower than streaming.
- 'stream': the model stays where it was loaded (e.g. the CPU) and is walked block by block on
  the block engine (`awqnb.engine.walk`, one block on the device at a time); the final norm and
  the head then run on slices of `logit_chunk` positions of each batch. Units go through in
  walks of at most `stream_tokens` tokens (default: the hidden states of a walk, counted twice,
  within a quarter of the GPU's free memory and at most 16 GiB; one walk on other devices);
  each walk moves every block once. Every block runs in the dtypes it has, on the keyword
  tensors (masks, rotary embeddings per layer type) the model itself builds, so the numbers
  equal the whole-model path's to float rounding.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from awqnb.analysis import stats
from awqnb.core.dtypes import fp32_names
from awqnb.core.errors import AwqnbError
from awqnb.core.files import atomic_write, read_json
from awqnb.core.progress import tqdm  # tqdm.auto, or events a report runner draws (progress.py)
from awqnb.engine.walk import BlockEngine, model_dtype
from awqnb.model.arch import blocks, resolve_spec
from awqnb.model.devices import resolve_device

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "whole", "stream")
WHOLE_FRACTION = 0.8  # of the GPU's free memory the weights may take for the whole-model path
DIAG_FRACTION = 0.1  # of the GPU's total memory a model may take to stay there for the diagnostics
STREAM_BUDGET = 16 << 30  # bytes of hidden states a streamed walk may hold on the device, at most


@dataclass
class PerplexityResult:
    """One model on one data set. nll[i]: mean NLL of unit i (window or text); n_tokens[i]: its
    predicted tokens."""

    dataset: str
    protocol: str  # 'gptq-token' or 'sample'
    seqlen: int
    ppl: float
    nll: list[float]
    n_tokens: list[int]
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return len(self.nll)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PerplexityResult":
        return cls(**{k: d[k] for k in ("dataset", "protocol", "seqlen", "ppl", "nll", "n_tokens")},
                   seconds=d.get("seconds", 0.0), meta=d.get("meta", {}))

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        for parent in (path.parent, *path.parent.parents):
            if parent.exists() and not parent.is_dir():
                raise AwqnbError(f"cannot write {path}: {parent} is a file, not a directory; choose another --json path.")
        try:
            return atomic_write(path, json.dumps(self.to_dict(), indent=1))
        except OSError as e:
            raise AwqnbError(f"cannot write {path} ({e.strerror or e}); choose a writable --json path.") from e

    @classmethod
    def read(cls, path: str | Path) -> "PerplexityResult":
        """A result written by `to_json` (`awqnb eval --json`), or AwqnbError saying why not."""
        path = Path(path)
        d = read_json(path, "results file", f"; write one with `awqnb eval --json {path}`",
                      "; pass files written by `awqnb eval --json`")
        need = {"dataset": str, "protocol": str, "seqlen": int, "ppl": (int, float), "nll": list, "n_tokens": list}
        bad = [k for k, t in need.items() if not isinstance(d, dict) or not isinstance(d.get(k), t)]
        if not bad and (len(d["nll"]) != len(d["n_tokens"]) or not d["nll"]
                        or not all(isinstance(x, (int, float)) for x in d["nll"] + d["n_tokens"])):
            bad = ["nll/n_tokens"]
        if bad or not isinstance(d.get("meta", {}), dict):
            raise AwqnbError(f"{path} is not an `awqnb eval --json` result (missing or wrong: {', '.join(bad) or 'meta'}); "
                             "pass files written by `awqnb eval --json`.")
        return cls.from_dict(d)


def exp_nll(mean_nll: float) -> float:
    """Perplexity of a mean NLL: exp, or inf past the float range (a broken model's mean NLL can
    exceed ~709 nats; math.exp would raise OverflowError)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        log.warning("mean NLL %.4g nats is beyond exp's range: perplexity reported as inf", mean_nll)
        return math.inf


def check_positive(**settings: tuple) -> None:
    """AwqnbError unless every `name=(value, minimum)` is a whole number ≥ minimum (a zero or
    negative length, window or sample count means nothing)."""
    for name, (v, lo) in settings.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise AwqnbError(f"{name}={v!r} must be a whole number of at least {lo}.")


def base_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """(base model, output head, final logit softcapping or None) of a causal LM."""
    base = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if base is None or head is None:
        raise AwqnbError(f"{type(model).__name__} has no base model / output head to evaluate.")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return base, head, getattr(cfg, "final_logit_softcapping", None)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the base model applies after its last block (`norm`), or AwqnbError."""
    base, _, _ = base_and_head(model)
    norm = getattr(base, "norm", None)
    if not isinstance(norm, nn.Module):
        raise AwqnbError(f"{type(base).__name__} has no final norm `norm`; evaluate it with placement='whole'.")
    return norm


def model_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the model's parameters and buffers (tied weights once); floating parameters
    counted in `dtype` when given, as `cast_parameters` would leave them (fp32-marked ones kept)."""
    keep = fp32_names(model) if dtype is not None else set()
    n = sum(b.numel() * b.element_size() for b in model.buffers())
    for name, p in model.named_parameters():
        cast = dtype is not None and p.is_floating_point() and name not in keep
        n += p.numel() * (torch.empty((), dtype=dtype).element_size() if cast else p.element_size())
    return n


def eval_placement(model: nn.Module, device, dtype: torch.dtype | None = None) -> str:
    """'whole' or 'stream' for an evaluation on `device` (the rule is in the module docstring);
    `dtype`: the dtype the parameters will be cast to before it (None: as they are)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    tensors = list(model.parameters()) + list(model.buffers())
    if dev.type != "cuda" or all(t.device == dev for t in tensors):
        return "whole"
    there = sum(t.numel() * t.element_size() for t in tensors if t.device == dev)
    free, _ = torch.cuda.mem_get_info(dev)
    return "whole" if model_bytes(model, dtype) - there <= WHOLE_FRACTION * free else "stream"


def diagnostics_placement(model: nn.Module, device) -> str:
    """'whole' (move the model to `device` for the walks after an evaluation: diagnostics, the
    sensitivity pass, its plans) or 'stream' (leave it where it was loaded). Whole where the model
    already is, on the CPU, or when `eval_placement` says it fits and its weights take at most
    DIAG_FRACTION of the GPU's total memory. Those walks prefetch each block on a side stream, so
    streaming costs them little; a larger model held there leaves them too little (an 8B model held
    through the sensitivity pass: 48 GB peak on the H200, and the pass refused on a 24 GB GPU)."""
    if eval_placement(model, device) != "whole":
        return "stream"
    dev = torch.device(device)
    if dev.type != "cuda":
        return "whole"
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if all(t.device == dev for t in list(model.parameters()) + list(model.buffers())):
        return "whole"
    total = torch.cuda.get_device_properties(dev).total_memory
    return "whole" if model_bytes(model) <= DIAG_FRACTION * total else "stream"


def _placement(model: nn.Module, dev: torch.device, placement: str) -> str:
    if placement not in PLACEMENTS:
        raise AwqnbError(f"placement={placement!r} is unknown; use one of {', '.join(PLACEMENTS)}.")
    how = eval_placement(model, dev) if placement == "auto" else placement
    if how == "whole":
        model.to(dev)
    model.eval()
    return how


def _stream_tokens(model: nn.Module, dev: torch.device) -> int | None:
    """Tokens a streamed walk may hold (module docstring); None: no bound (not a CUDA GPU)."""
    if dev.type != "cuda":
        return None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    per_token = 2 * cfg.hidden_size * torch.empty((), dtype=model_dtype(model)).element_size()
    free, _ = torch.cuda.mem_get_info(dev)
    return max(1, int(min(free // 4, STREAM_BUDGET) // per_token))


def _head_sums(hidden_at, head: nn.Module, softcap: float | None, ids: torch.Tensor, mask: torch.Tensor | None,
               logit_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (Σ NLL of predicted tokens, number of predicted tokens). ids `[b, T]` on the
    device; hidden_at(s, e): the final (normed) hidden states of positions s … e−1, `[b, e−s, d]`."""
    b, t = ids.shape
    tot = torch.zeros(b, dtype=torch.float64, device=ids.device)
    cnt = torch.zeros(b, dtype=torch.float64, device=ids.device)
    for s in range(0, t - 1, logit_chunk):
        e = min(s + logit_chunk, t - 1)
        logits = head(hidden_at(s, e)).float()  # [b, c, V]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        tgt = ids[:, s + 1:e + 1]
        # over the last (contiguous) dim: a vocab-strided reduction is 5-10x slower at 262k vocab
        nll = F.cross_entropy(logits.flatten(0, 1), tgt.reshape(-1), reduction="none").view(tgt.shape)  # [b, c]
        valid = mask[:, s + 1:e + 1].bool() if mask is not None else torch.ones_like(tgt, dtype=torch.bool)
        tot += (nll * valid).sum(1).double()
        cnt += valid.sum(1).double()
    return tot, cnt


@torch.no_grad()
def _nll_sums(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, logit_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole-model path: `_head_sums` of one batch `ids [b, T]` (on the model's device)."""
    base, head, softcap = base_and_head(model)
    hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state  # [b, T, d]
    return _head_sums(lambda s, e: hidden[:, s:e], head, softcap, ids, mask, logit_chunk)


@torch.no_grad()
def _stream_sums(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]], dev: torch.device,
                 logit_chunk: int, stream_tokens: int | None, bar_desc: str,
                 progress: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The streamed path: `_head_sums` of each batch `(ids [b, T], mask or None)`, the model left
    where it is and walked block by block on `dev`, in walks of at most `stream_tokens` tokens."""
    _, head, softcap = base_and_head(model)
    norm = final_norm(model)
    limit = stream_tokens if stream_tokens is not None else _stream_tokens(model, dev)
    groups: list[list] = []
    size = 0
    for ids, mask in batches:  # consecutive batches per walk; at least one, whatever the bound
        if not groups or (limit is not None and size + ids.numel() > limit):
            groups.append([])
            size = 0
        groups[-1].append((ids, mask))
        size += ids.numel()
    n_blocks = len(blocks(model, resolve_spec(model)))
    out = []
    with tqdm(total=len(groups) * n_blocks, desc=f"{bar_desc} (streamed)", disable=not progress) as bar:
        for group in groups:
            engine = BlockEngine(model, None, dev, chunks=[ids for ids, _ in group], masks=[m for _, m in group],
                                 keep_dtypes=True)
            engine.on_block = lambda _j: bar.update(1)
            hs = engine.outputs()  # last block's outputs per batch, before the final norm
            with engine.onload(norm), engine.onload(head):
                for i, (ids, mask) in enumerate(group):
                    h, hs[i] = hs[i], None
                    out.append(_head_sums(lambda s, e, h=h: norm(h[:, s:e].to(dev)), head, softcap, ids.to(dev),
                                          None if mask is None else mask.to(dev), logit_chunk))
            del hs, engine
    return out


def _sums(model: nn.Module, how: str, batches: list, dev: torch.device, logit_chunk: int,
          stream_tokens: int | None, desc: str, progress: bool):
    """(Σ NLL, count) per row of each batch, in order, by the chosen placement."""
    if how == "stream":
        yield from _stream_sums(model, batches, dev, logit_chunk, stream_tokens, desc, progress)
        return
    for ids, mask in tqdm(batches, desc=desc, disable=not progress):
        yield _nll_sums(model, ids.to(dev), None if mask is None else mask.to(dev), logit_chunk)


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return resolve_device(device)
    return next(model.parameters()).device


@torch.no_grad()
def token_perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
                     device=None, dataset: str = "wikitext2", batch_size: int = 1, logit_chunk: int = 512,
                     progress: bool = True, placement: str = "auto",
                     stream_tokens: int | None = None) -> PerplexityResult:
    """GPTQ token perplexity of `tokens` `[n_tok]` in windows of `seqlen`. placement: 'auto',
    'whole' or 'stream'; stream_tokens: tokens per streamed walk (module docstring)."""
    check_positive(seqlen=(seqlen, 2), batch_size=(batch_size, 1), logit_chunk=(logit_chunk, 1))
    if max_windows is not None:
        check_positive(max_windows=(max_windows, 1))
    n_win = tokens.numel() // seqlen
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    if n_win < 1:
        raise AwqnbError(f"{dataset} has {tokens.numel()} tokens, fewer than one window of seqlen={seqlen}; lower --seqlen.")
    if stream_tokens is not None:
        check_positive(stream_tokens=(stream_tokens, 1))
    dev = _device_of(model, device)
    how = _placement(model, dev, placement)
    t0 = time.perf_counter()
    windows = tokens[: n_win * seqlen].view(n_win, seqlen)
    batches = [(windows[i:i + batch_size], None) for i in range(0, n_win, batch_size)]
    nll, cnt = [], []
    for tot, c in _sums(model, how, batches, dev, logit_chunk, stream_tokens, f"ppl {dataset}", progress):
        nll += (tot / c).tolist()
        cnt += c.long().tolist()
    ppl = exp_nll(sum(nll) / len(nll))
    return PerplexityResult(dataset, "gptq-token", seqlen, ppl, nll, cnt, time.perf_counter() - t0,
                            meta={"placement": how})


@torch.no_grad()
def sample_perplexity(model: nn.Module, tokenizer, texts: list[str], max_length: int = 2048, device=None,
                      dataset: str = "ag_news", batch_size: int = 16, logit_chunk: int = 512,
                      progress: bool = True, placement: str = "auto",
                      stream_tokens: int | None = None) -> PerplexityResult:
    """Sample perplexity: each text on its own (tokenizer's special tokens added, truncated to
    `max_length`), right-padded in length-sorted batches; texts with < 2 tokens are skipped.
    placement, stream_tokens: as `token_perplexity`."""
    check_positive(max_length=(max_length, 2), batch_size=(batch_size, 1), logit_chunk=(logit_chunk, 1))
    if not texts:
        raise AwqnbError(f"no texts to evaluate for {dataset}; check the data set or --n-samples.")
    if stream_tokens is not None:
        check_positive(stream_tokens=(stream_tokens, 1))
    dev = _device_of(model, device)
    how = _placement(model, dev, placement)
    enc = [tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length).input_ids for t in texts]
    order = sorted((i for i, e in enumerate(enc) if len(e) >= 2), key=lambda i: len(enc[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll_by, cnt_by = {}, {}
    rows, batches = [], []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        t = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), t), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), t), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(enc[i])] = torch.tensor(enc[i])
            mask[r, : len(enc[i])] = 1
        rows.append(idx)
        batches.append((ids, mask))
    t0 = time.perf_counter()
    for idx, (tot, c) in zip(rows, _sums(model, how, batches, dev, logit_chunk, stream_tokens, f"ppl {dataset}",
                                         progress)):
        for r, i in enumerate(idx):
            nll_by[i], cnt_by[i] = float(tot[r] / c[r]), int(c[r])
    keep = sorted(nll_by)
    nll = [nll_by[i] for i in keep]
    cnt = [cnt_by[i] for i in keep]
    ppl = exp_nll(sum(n * c for n, c in zip(nll, cnt)) / sum(cnt))
    return PerplexityResult(dataset, "sample", max_length, ppl, nll, cnt, time.perf_counter() - t0,
                            meta={"placement": how})


def bootstrap_delta(res: PerplexityResult, base: PerplexityResult, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Delta % of `res` against `base` and its paired bootstrap 95% interval over units (one
    result each: evaluation noise only). An interval, not a verdict: verdicts are `awqnb.analysis.stats`'s."""
    if res.n_units != base.n_units or res.n_tokens != base.n_tokens:
        raise AwqnbError(f"cannot pair {res.dataset} results over different units "
                         f"({res.n_units} vs {base.n_units}); evaluate both with the same settings.")
    n = torch.tensor(res.n_tokens, dtype=torch.float64)
    a = torch.tensor(res.nll, dtype=torch.float64) * n
    b = torch.tensor(base.nll, dtype=torch.float64) * n
    delta = (math.exp((a.sum() - b.sum()).item() / n.sum().item()) - 1) * 100
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(n), (n_boot, len(n)), generator=g)
    d = (torch.exp((a[idx].sum(1) - b[idx].sum(1)) / n[idx].sum(1)) - 1) * 100
    lo, hi = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return delta, lo, hi


def comparison_table(results: dict[str, dict[str, PerplexityResult]], baseline: str):
    """One row per (method, dataset) of one result per method: ppl, delta % against `baseline`
    with its 95% interval, the verdict and what the interval carries (`awqnb.analysis.stats`). One result
    per method measures the evaluation units' sampling only: where either side used calibration
    data the verdict is 'cannot separate seeds' (judge those over seeds with
    `runner.Comparison.verdicts`); fp against rtn (no calibration on either side) is judged. The
    baseline's own row has verdict '(baseline)'."""
    import pandas as pd

    if baseline not in results:
        raise AwqnbError(f"baseline {baseline!r} is not among the results ({', '.join(results)}).")
    rows = []
    for name, per_ds in results.items():
        for ds, r in per_ds.items():
            row = {"method": name, "dataset": ds, "protocol": r.protocol, "seqlen": r.seqlen, "units": r.n_units,
                   "ppl": r.ppl, "delta_pct": 0.0, "ci_low": 0.0, "ci_high": 0.0, "verdict": "", "noise": ""}
            for k in ("model", "bits", "group_size", "calibration"):
                if k in r.meta:
                    row[k] = r.meta[k] if not isinstance(r.meta[k], dict) else r.meta[k].get("dataset")
            b = results[baseline].get(ds)
            if name != baseline and b is not None:
                iv = stats.paired_interval({0: r}, {0: b},
                                           calibrated=stats.uses_calibration(r) or stats.uses_calibration(b))
                row.update(delta_pct=iv.delta_pct, ci_low=iv.ci_low, ci_high=iv.ci_high, verdict=iv.verdict,
                           noise=iv.noise)
            elif name == baseline:
                row["verdict"] = stats.BASELINE
            rows.append(row)
    return pd.DataFrame(rows)
