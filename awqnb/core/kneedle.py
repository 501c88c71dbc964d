"""Kneedle knee detection on a descending-sorted curve (Satopää et al. 2011, offline form).

For values `y: [n]` sorted in descending order (a salience curve: a few loud channels, then the
bulk), with `x_i = i / (n - 1)` and `y` min-max normalised to [0, 1]:

    D_i = (1 - x_i) - y_norm_i          (distance below the chord from (0, 1) to (1, 0))
    knee = argmax_i D_i                 (first index on ties)

The knee is the first point of the bulk: for an L-shaped curve with `k` loud values followed by a
flat or slowly falling tail, `knee = k`. There is no knee (None) when the curve has fewer than 3
points, is flat, or never drops below its chord (`max D <= 1e-6`: linear, up to float
rounding, or concave).

`tolerance` shifts the knee by `round(tolerance * n)` positions towards the tail (a positive value
marks more channels as outliers; negative fewer), clamped to [0, n - 1] — the seeds' knee offset.
"""
from __future__ import annotations

import torch

MIN_DISTANCE = 1e-6  # a curve whose max D is below this is straight (float rounding) or concave


def knee_index(y: torch.Tensor, tolerance: float = 0.0) -> int | None:
    """Knee of a descending-sorted curve `y: [n]` (see module docstring), or None."""
    y = y.detach().double().flatten().cpu()
    n = y.numel()
    if n < 3:
        return None
    lo, hi = y.min(), y.max()
    if not torch.isfinite(lo) or not torch.isfinite(hi) or (hi - lo) <= 1e-12 * max(abs(hi.item()), 1e-30):
        return None
    yn = (y - lo) / (hi - lo)
    x = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    d = (1.0 - x) - yn
    k = int(torch.argmax(d))
    if d[k] <= MIN_DISTANCE:
        return None
    k = k + int(round(tolerance * n))
    return max(0, min(k, n - 1))


def knee_outliers(salience: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """Outlier channels of a layer: the ones ranked above the knee of its salience curve.

    salience: `[ci]`. The curve is the top half of the descending-sorted salience
    (`n = ci // 2` points, as in the seeds: the knee between the loud few and the bulk, not the
    fall-off of the quiet tail). With `k = knee_index(curve, tolerance)` the outliers are the `k`
    channels of largest salience (none when there is no knee). Returns a `[ci]` bool mask.
    """
    ci = salience.numel()
    mask = torch.zeros(ci, dtype=torch.bool, device=salience.device)
    order = torch.argsort(salience.detach().float(), descending=True, stable=True)
    k = knee_index(salience.detach().float()[order[: ci // 2]], tolerance)
    if k:
        mask[order[:k]] = True
    return mask
