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
from awqnb.core.errors import AwqnbError
from awqnb.core.files import atomic_write, read_json
from awqnb.core.progress import tqdm  # tqdm.auto, or events a report runner draws (progress.py)
from awqnb.model.devices import resolve_device

log = logging.getLogger(__name__)


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


@torch.no_grad()
def _nll_sums(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, logit_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (Σ NLL of predicted tokens, number of predicted tokens). ids `[b, T]`."""
    base, head, softcap = base_and_head(model)
    hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state  # [b, T, d]
    b, t = ids.shape
    tot = torch.zeros(b, dtype=torch.float64, device=ids.device)
    cnt = torch.zeros(b, dtype=torch.float64, device=ids.device)
    for s in range(0, t - 1, logit_chunk):
        e = min(s + logit_chunk, t - 1)
        logits = head(hidden[:, s:e]).float()  # [b, c, V]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        tgt = ids[:, s + 1:e + 1]
        # over the last (contiguous) dim: a vocab-strided reduction is 5-10x slower at 262k vocab
        nll = F.cross_entropy(logits.flatten(0, 1), tgt.reshape(-1), reduction="none").view(tgt.shape)  # [b, c]
        valid = mask[:, s + 1:e + 1].bool() if mask is not None else torch.ones_like(tgt, dtype=torch.bool)
        tot += (nll * valid).sum(1).double()
        cnt += valid.sum(1).double()
    return tot, cnt


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return resolve_device(device)
    return next(model.parameters()).device


@torch.no_grad()
def token_perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
                     device=None, dataset: str = "wikitext2", batch_size: int = 1, logit_chunk: int = 512,
                     progress: bool = True) -> PerplexityResult:
    """GPTQ token perplexity of `tokens` `[n_tok]` in windows of `seqlen`."""
    check_positive(seqlen=(seqlen, 2), batch_size=(batch_size, 1), logit_chunk=(logit_chunk, 1))
    if max_windows is not None:
        check_positive(max_windows=(max_windows, 1))
    n_win = tokens.numel() // seqlen
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    if n_win < 1:
        raise AwqnbError(f"{dataset} has {tokens.numel()} tokens, fewer than one window of seqlen={seqlen}; lower --seqlen.")
    dev = _device_of(model, device)
    model.to(dev).eval()
    windows = tokens[: n_win * seqlen].view(n_win, seqlen)
    nll, cnt = [], []
    t0 = time.perf_counter()
    for i in tqdm(range(0, n_win, batch_size), desc=f"ppl {dataset}", disable=not progress):
        tot, c = _nll_sums(model, windows[i:i + batch_size].to(dev), None, logit_chunk)
        nll += (tot / c).tolist()
        cnt += c.long().tolist()
    ppl = exp_nll(sum(nll) / len(nll))
    return PerplexityResult(dataset, "gptq-token", seqlen, ppl, nll, cnt, time.perf_counter() - t0)


@torch.no_grad()
def sample_perplexity(model: nn.Module, tokenizer, texts: list[str], max_length: int = 2048, device=None,
                      dataset: str = "ag_news", batch_size: int = 16, logit_chunk: int = 512,
                      progress: bool = True) -> PerplexityResult:
    """Sample perplexity: each text on its own (tokenizer's special tokens added, truncated to
    `max_length`), right-padded in length-sorted batches; texts with < 2 tokens are skipped."""
    check_positive(max_length=(max_length, 2), batch_size=(batch_size, 1), logit_chunk=(logit_chunk, 1))
    if not texts:
        raise AwqnbError(f"no texts to evaluate for {dataset}; check the data set or --n-samples.")
    dev = _device_of(model, device)
    model.to(dev).eval()
    enc = [tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length).input_ids for t in texts]
    order = sorted((i for i, e in enumerate(enc) if len(e) >= 2), key=lambda i: len(enc[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll_by, cnt_by = {}, {}
    t0 = time.perf_counter()
    for s in tqdm(range(0, len(order), batch_size), desc=f"ppl {dataset}", disable=not progress):
        idx = order[s:s + batch_size]
        t = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), t), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), t), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(enc[i])] = torch.tensor(enc[i])
            mask[r, : len(enc[i])] = 1
        tot, c = _nll_sums(model, ids.to(dev), mask.to(dev), logit_chunk)
        for r, i in enumerate(idx):
            nll_by[i], cnt_by[i] = float(tot[r] / c[r]), int(c[r])
    keep = sorted(nll_by)
    nll = [nll_by[i] for i in keep]
    cnt = [cnt_by[i] for i in keep]
    ppl = exp_nll(sum(n * c for n, c in zip(nll, cnt)) / sum(cnt))
    return PerplexityResult(dataset, "sample", max_length, ppl, nll, cnt, time.perf_counter() - t0)


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
