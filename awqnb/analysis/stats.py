"""The one home for verdicts: is method A's perplexity different from baseline B's?

The rule (`paired_interval`). Per calibration seed s and evaluation unit w (window or text) let
x[s, w] = NLL_A[s, w] − NLL_B[s, w], the paired difference of mean NLL per token (the same units
for both sides). With k seeds, n units and token weights p_w (Σ p_w = 1):

    d_s = Σ_w p_w x[s, w]        per-seed difference: log(ppl_A / ppl_B) of seed s
    D   = mean_s d_s             the estimate; delta % = 100 (exp(D) − 1)
    V_s = var_s(d_s) / k         seed term: the calibration spread (and the window noise that
                                 differs between seeds); k − 1 degrees of freedom
    V_w = max(W − E, 0)          window term: the evaluation sampling that every seed shares (the
                                 same windows score every seed, so averaging seeds never removes it)
          W = n/(n−1) Σ_w p_w² (m_w − D)²,  m_w = mean_s x[s, w]
          E = Σ_w p_w² var_s(x[s, w] − d_s) / k   (the seed-specific part of W, already in V_s)
    half-width h = √( t²_{k−1} V_s + t²_{n−1} V_w ),  t_ν the 0.975 quantile of Student's t
    95% interval: 100 (exp(D ± h) − 1)

V_s + V_w estimates the two-way (seeds × windows) random-effects variance of a mean, Var(D) =
τ²/k + σ_v²/n + σ_e²/(kn) (τ: seed effect, σ_v: method × window effect, σ_e: seed × window noise).
Each term gets its own t quantile: the seed term has only k − 1 degrees of freedom (t = 4.30 for 3
seeds, 2.78 for 5), which is what keeps the error rate with few seeds; a bootstrap over 3 seeds
cannot (its interval is about the range of the three values, and it says 'better' in a quarter of
comparisons with no true difference). Combining the two half-widths in quadrature is exact when
either term vanishes and conservative in between (a Satterthwaite df is liberal at 2–4 df).

Stated false-positive rate: at most 5% two-sided (`ALPHA`): a method with no true difference is
called better or worse in at most 5% of comparisons (2.5% each way). tests/test_verdict_calibration.py
measures it by simulation with seed spreads and window effects like the H200 runs' (2–5%), and the
power against true differences.

Verdicts (`VERDICTS`): 'better' (the interval lies below 0: lower perplexity than the baseline),
'worse' (above 0), 'within noise' (it holds 0), and 'cannot separate seeds' when either side
uses calibration data and fewer than `MIN_SEEDS` (3) seeds are paired: the seed term is then not
estimable (one seed) or has one degree of freedom, and the rule gives no verdict. When neither side
uses calibration (fp vs rtn) there is no seed noise: the interval is the window term alone.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Mapping

import numpy as np

from awqnb.core.errors import AwqnbError


ALPHA = 0.05  # nominal two-sided false-positive rate of a verdict
LEVEL = 1 - ALPHA
MIN_SEEDS = 3
BETTER, WORSE, NOISE, NO_SEEDS = "better", "worse", "within noise", "cannot separate seeds"
VERDICTS = (BETTER, WORSE, NOISE, NO_SEEDS)
BASELINE = "(baseline)"  # the baseline's own row in a table


# --- Student t quantile (no scipy at run time) -----------------------------------------------

def _betacf(a, b, x, iters: int = 300):
    """Continued fraction of the incomplete beta function (modified Lentz), elementwise."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        h = h * d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-15):
            break
    return h


def _betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b), elementwise (a, b > 0, 0 ≤ x ≤ 1)."""
    a, b, x = np.broadcast_arrays(np.asarray(a, float), np.asarray(b, float), np.asarray(x, float))
    out = np.zeros_like(x)
    inner = (x > 0) & (x < 1)
    out[x >= 1] = 1.0
    if inner.any():
        a_, b_, x_ = a[inner], b[inner], x[inner]
        lg = np.vectorize(math.lgamma)
        lbt = lg(a_ + b_) - lg(a_) - lg(b_) + a_ * np.log(x_) + b_ * np.log1p(-x_)
        direct = x_ < (a_ + 1) / (a_ + b_ + 2)
        v = np.empty_like(x_)
        if direct.any():
            v[direct] = np.exp(lbt[direct]) * _betacf(a_[direct], b_[direct], x_[direct]) / a_[direct]
        if (~direct).any():
            r = ~direct
            v[r] = 1 - np.exp(lbt[r]) * _betacf(b_[r], a_[r], 1 - x_[r]) / b_[r]
        out[inner] = v
    return out


def t_quantile(q: float, df) -> np.ndarray:
    """Quantile q (0.5 < q < 1) of Student's t with `df` degrees of freedom (any real df > 0;
    inf: the normal), elementwise. Bisection on the incomplete beta: exact to ~1e-9."""
    if not 0.5 < q < 1:
        raise AwqnbError(f"t_quantile: q={q} must lie in (0.5, 1).")
    df = np.asarray(df, dtype=float)
    tail = 2 * (1 - q)  # P(|T| > t) = I_{df/(df+t²)}(df/2, 1/2)
    lo = np.zeros_like(df)  # in x = df / (df + t²): the tail probability rises with x
    hi = np.ones_like(df)
    finite = np.isfinite(df)
    dfc = np.where(finite, df, 1.0)
    for _ in range(48):  # x to ~4e-15: t to ~1e-10 relative
        mid = (lo + hi) / 2
        low_tail = _betainc(dfc / 2, 0.5, mid) < tail
        lo = np.where(low_tail, mid, lo)
        hi = np.where(low_tail, hi, mid)
    x = (lo + hi) / 2
    t = np.sqrt(dfc * (1 - x) / x)
    if not finite.all():
        z = math.sqrt(2) * _erfinv(2 * q - 1)
        t = np.where(finite, t, z)
    return t


@lru_cache(maxsize=256)
def _t(q: float, df: float) -> float:
    """t_quantile for one df, cached: a rule uses only k − 1 and n − 1."""
    return float(t_quantile(q, df))


def _erfinv(y: float) -> float:
    x = 0.0
    for _ in range(100):  # Newton on erf(x) = y
        x -= (math.erf(x) - y) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
    return x


# --- the rule -------------------------------------------------------------------------------

def components(x, weights=None) -> dict:
    """The variance terms of the rule (module docstring) for paired per-unit differences `x`
    [..., k seeds, n units] (leading dims: independent comparisons, e.g. simulations) and unit
    weights [n] (tokens per unit; default equal). Returns arrays D, V_s, V_w (V_s = 0 with one seed;
    V_w = W then)."""
    x = np.asarray(x, dtype=float)
    if x.ndim < 2:
        raise AwqnbError("components: x must be [..., seeds, units].")
    k, n = x.shape[-2:]
    p = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    p = p / p.sum(-1, keepdims=True)
    d = (x * p).sum(-1)  # [..., k]
    D = d.mean(-1)
    m = x.mean(-2)  # [..., n]
    if n < 2:  # one unit: its sampling noise cannot be estimated, so nothing can be excluded
        W = np.full(D.shape, np.inf)
    else:
        W = n / (n - 1) * (p ** 2 * (m - D[..., None]) ** 2).sum(-1)
    if k > 1:
        vs = d.var(-1, ddof=1) / k
        e = (p ** 2 * (x - d[..., None]).var(-2, ddof=1)).sum(-1) / k
        vw = np.maximum(W - e, 0.0)
    else:
        vs, vw = np.zeros_like(D), W
    return {"D": D, "V_s": vs, "V_w": vw}


def verdict_of(lo, hi, n_seeds: int, calibrated: bool = True):
    """Verdict of an interval of a lower-is-better difference (elementwise over arrays): 'better'
    (below 0), 'worse' (above 0), 'within noise' (holds 0); 'cannot separate seeds' when a side
    uses calibration and fewer than MIN_SEEDS seeds were paired."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    if calibrated and n_seeds < MIN_SEEDS:
        out = np.full(lo.shape, NO_SEEDS, dtype=object)
    else:
        out = np.where(hi < 0, BETTER, np.where(lo > 0, WORSE, NOISE)).astype(object)
    return out.item() if out.ndim == 0 else out


def interval(x, weights=None, calibrated: bool = True, level: float = LEVEL) -> dict:
    """The rule on arrays (vectorised over leading dims): x [..., k, n] per-unit NLL differences
    (A − B), weights [n]. Returns D, lo, hi (log ratio), delta_pct, ci_low, ci_high (%), verdict,
    n_seeds, n_units, the t quantiles and the variance terms."""
    x = np.asarray(x, dtype=float)
    k = x.shape[-2]
    if not calibrated and k > 1:  # neither side uses calibration: the seeds are one run repeated
        x = x[..., :1, :]
        k = 1
    n = x.shape[-1]
    comp = components(x, weights)
    q = 0.5 + level / 2
    t_s = _t(q, k - 1) if k > 1 else 0.0
    t_w = _t(q, n - 1) if n > 1 else np.inf
    with np.errstate(invalid="ignore"):
        half = np.sqrt(t_s ** 2 * comp["V_s"] + t_w ** 2 * comp["V_w"])
    lo, hi = comp["D"] - half, comp["D"] + half
    with np.errstate(over="ignore"):
        pct = {"delta_pct": 100 * np.expm1(comp["D"]), "ci_low": 100 * np.expm1(lo), "ci_high": 100 * np.expm1(hi)}
    return {**comp, **pct, "lo": lo, "hi": hi, "t_seed": t_s, "t_windows": t_w, "n_seeds": k, "n_units": n,
            "verdict": verdict_of(lo, hi, k, calibrated)}


@dataclass(frozen=True)
class Interval:
    """One method against one baseline on one data set (see the module docstring)."""

    delta_pct: float  # 100 (exp(D) − 1): mean over seeds of the log perplexity ratio, as a percentage
    ci_low: float
    ci_high: float
    n_seeds: int
    n_units: int
    sd_seed: float  # √V_s, log-ratio units
    sd_windows: float  # √V_w
    verdict: str
    noise: str  # what the interval carries, in words

    def to_dict(self) -> dict:
        return asdict(self)


def noise_words(n_seeds: int, calibrated: bool, n_units: int) -> str:
    """What an interval carries, in words."""
    if not calibrated:
        return f"evaluation sampling only ({n_units} units; neither side uses calibration)"
    if n_seeds == 1:
        return (f"evaluation sampling only ({n_units} units); ONE calibration seed: seed noise not measured, "
                "no verdict")
    return (f"{n_seeds} calibration seeds (t interval) + evaluation sampling ({n_units} units)"
            + ("" if n_seeds >= MIN_SEEDS else f"; fewer than {MIN_SEEDS} seeds: no verdict"))


def _pair(res, base):
    if res.n_units != base.n_units or list(res.n_tokens) != list(base.n_tokens):
        raise AwqnbError(f"cannot pair {res.dataset} results over different units "
                         f"({res.n_units} vs {base.n_units}); evaluate both with the same settings.")
    return np.asarray(res.nll, dtype=float) - np.asarray(base.nll, dtype=float)


def paired_interval(res: Mapping[int, "PerplexityResult"], base: Mapping[int, "PerplexityResult"],
                    calibrated: bool = True, level: float = LEVEL) -> Interval:
    """The rule for `res` against `base`: calibration seed → PerplexityResult on each side (the
    seeds both have are paired; a method without calibration may map every seed to one result).
    calibrated: False when neither side uses calibration data (then the seed level is dropped and
    the verdict rests on the evaluation sampling alone)."""
    seeds = sorted(set(res) & set(base))
    if not seeds:
        raise AwqnbError(f"no calibration seed in common to pair (got {sorted(res)} and {sorted(base)}).")
    x = np.stack([_pair(res[s], base[s]) for s in seeds])
    w = np.asarray(res[seeds[0]].n_tokens, dtype=float)
    r = interval(x, w, calibrated, level)
    k = int(r["n_seeds"])
    return Interval(float(r["delta_pct"]), float(r["ci_low"]), float(r["ci_high"]), k, int(r["n_units"]),
                    float(np.sqrt(r["V_s"])), float(np.sqrt(r["V_w"])), str(r["verdict"]),
                    noise_words(k, calibrated, int(r["n_units"])))


def uses_calibration(result) -> bool:
    """Whether one PerplexityResult came from a quantization that draws calibration data: its meta
    names a calibration set or a seed, or a method that needs one. Only 'fp' and registered
    methods without calibration (rtn) count as uncalibrated; no meta or an unknown method
    (e.g. another tool's checkpoint) counts as calibrated, so it gets no single-run verdict."""
    meta = getattr(result, "meta", None) or {}
    if meta.get("calibration") or meta.get("seed") is not None:
        return True
    method = meta.get("method")
    if method == "fp":
        return False
    if not method:
        return True
    from awqnb.quant.methods import get_method  # local: this module loads without torch

    try:
        return bool(get_method(method).needs_calibration)
    except AwqnbError:
        return True


def seeds_note(n_seeds: int) -> str:
    """What a comparison over `n_seeds` calibration seeds can and cannot show (for reports)."""
    if n_seeds < 1:
        raise AwqnbError(f"n_seeds={n_seeds}: at least one seed.")
    t = _t(0.5 + LEVEL / 2, max(n_seeds - 1, 1))
    if n_seeds < MIN_SEEDS:
        return (f"{n_seeds} calibration seed{'s' if n_seeds > 1 else ''}: the calibration-seed spread cannot be "
                "separated from the method, so methods that use calibration get no verdict ('cannot separate "
                f"seeds'); only methods without calibration (fp, rtn) are judged. Use {MIN_SEEDS} or more seeds.")
    return (f"{n_seeds} calibration seeds: each verdict is a t interval with {n_seeds - 1} degrees of freedom over "
            f"the seeds' paired differences (t = {t:.2f}) plus the evaluation windows' sampling, with a "
            f"{ALPHA:.0%} false-positive rate. It can show a difference a few times larger than the seed sd"
            + (" (with 3 seeds, about 3–4 seed sd; 5 seeds resolve about half that)" if n_seeds == 3 else "")
            + "; it cannot show that two methods are equal ('within noise' is not 'the same'), and it says "
              "nothing about other models, data sets or calibration sets.")


SINGLE_RUN_NOTE = ("one result per method: the interval is the evaluation windows' sampling noise only (paired, "
                   "the same windows for both). Calibration-seed noise is not measured, so a method that uses "
                   "calibration data gets no verdict ('cannot separate seeds'); compare over 3 or more seeds "
                   "(awqnb.compare.runner.run_comparison, bench/quality.py --seeds) for one.")
