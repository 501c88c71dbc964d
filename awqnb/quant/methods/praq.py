"""praq and robust_praq: AWQ whose α search is driven by post-activation, risk-aware importance.

Notation (one decoder block; tokens t of the calibration set, `n_tok` of them; hidden channels j,
`H` of them; intermediate channels i, `I` of them):
  x_t `[H]`             input of gate_proj/up_proj (the gate_up input point), current space
  z_ti = x_t·W_gate[i]  pre-activation `[n_tok, I]`;  u_ti = x_t·W_up[i] `[n_tok, I]`
  h_ti = act(z_ti)·u_ti  input of down_proj `[n_tok, I]`
  act = ACT2FN[config.<spec.activation_attr>]  (llama: hidden_act 'silu'; gemma3:
        hidden_activation 'gelu_pytorch_tanh')

Knee-relative units. `tau` and `beta` are given in SiLU units, so that one setting means the same
thing for every activation: with κ_act = argmin_z act(z) (SiLU −1.2785, gelu-tanh −0.7525, found
numerically on a grid) and c = κ_act / κ_SiLU (SiLU 1, gelu-tanh 0.589), the pre-activation is read
as ẑ_ti = z_ti / c. gelu_tanh(z) ≈ SiLU(1.70·z)/1.70, so ẑ puts both activations' knees, dead
tails and responsive regions at the same place: τ = −3 is z = −3 for SiLU and z = −1.77 for
gelu-tanh (activations without an interior minimum, e.g. ReLU, use c = 1).

Importance of intermediate channel i (the praq importance, `[I]`):
  U_i = E_t[ |act(z_ti)| · |u_ti| ]                           utility (= E|h_i|)
  S_i = sqrt( E_t[h_ti²] − U_i² )                              spread of |h_i|: the "loudness" of
                                                                rare bursts that U_i averages away
  σ_i = std_t(ẑ_ti);  δ_i = noise_factor · σ_i                 quantization-noise band on ẑ
  P_i = sigmoid( beta · (max_t ẑ_ti + δ_i − τ) )               risk: soft indicator that, with the
                                                                noise δ_i added, channel i's
                                                                pre-activation reaches the live
                                                                side of the knee threshold τ on some
                                                                calibration token
  I_i = U_i + P_i · S_i                                        utility + risk

Salience `a` handed to the AWQ search, per scale group:
  down    (input channels = intermediate i):  a_i = I_i
  gate_up (input channels = hidden j): the post-activation importance is back-projected through
          the weights that feed it, relative to its mean:
            π_i = I_i / mean_i(I_i)
            r_j = Σ_i π_i (|W_gate[i,j]| + |W_up[i,j]|) / Σ_i (|W_gate[i,j]| + |W_up[i,j]|)
            a_j = E_t|x_tj| · r_j
          r_j is the |W|-weighted average of π over the rows that hidden channel j feeds, so
          a = E|x| (plain L1 AWQ) when every intermediate channel is equally important, and hidden
          channels that load on important/risky intermediate channels are protected more.
  qkv, vo (attention): a_j = E_t|x_tj| (L1), whatever `search.salience` says (METHODS.md).

Choices and why:
  * Utility is measured exactly where the down_proj error is made (h = act(z)·u), so for `down`
    praq differs from L1 AWQ only by the risk term P·S.
  * The seed (gw_praq / FastRPRAQ) scored P(active) = sigmoid(beta(μ_z + 3σ_z + noise − τ)) ×
    (E|z| + σ_z), on the pre-activation. We keep its structure (a sigmoid gate at τ with
    temperature beta, a magnitude that adds a spread to a mean) but (1) measure magnitudes after the
    activation and the up projection, where they reach the output; (2) use the observed maximum
    instead of μ + 3σ (a Gaussian bound that misses bursts on fewer than ~1% of tokens, the very
    "loud silence" channels praq exists for); (3) take the noise band as noise_factor·σ_z as
    METHODS.md states; (4) add the risk to the utility instead of gating it, so a channel that
    carries signal is never scored below its L1 utility. A channel that never gets near τ
    (P ≈ 0) keeps only its (tiny) utility; a mostly-dead channel that bursts gets U + S ≫ U.
  * Every statistic is a running sum, max or count over tokens: one streaming pass
    (`PraqStats`), and the importance can be recomputed for other beta/tau/noise_factor from
    the same pass.
  * At `down` the gate_up scales are already folded (x_cur = x/s, W_cur = W·diag(s)), so
    z = x_cur·W_gate_cur[i] is still the full-precision pre-activation; the importance at `down`
    equals the one computed at `gate_up`.

robust_praq: the same importance averaged over `n_noise_samples` copies x̃ = x + noise_std·sd_j·ε
of the group's inputs (sd_j: channel j's standard deviation over calibration tokens, ε ~ N(0, 1)
from a torch.Generator seeded by (config seed, block index, input point)); attention groups average
E|x̃|. Both MLP groups read the same noise at the gate_up input point, so they score the same
noisy copies. noise_std = 0 is exactly praq.
"""
from __future__ import annotations

import functools
import logging
import zlib
from typing import Callable

import torch

from awqnb.core.errors import AwqnbError
from awqnb.model.arch import ArchSpec, ScaleGroup, get_module
from awqnb.quant.methods.base import BlockContext, Step

log = logging.getLogger(__name__)

_KNEE_GRID = (-8.0, 0.0, 80001)  # z grid on which each activation's minimum is located


@functools.lru_cache(maxsize=None)
def _knee_of(name: str) -> float | None:
    from transformers.activations import ACT2FN

    lo, hi, n = _KNEE_GRID
    z = torch.linspace(lo, hi, n, dtype=torch.float64)
    y = ACT2FN[name](z)
    i = int(torch.argmin(y))
    if i == 0 or i == n - 1 or not bool(y[i] < y[0]):
        return None  # no interior minimum (ReLU, monotone activations)
    return float(z[i])


def activation_scale(name: str) -> float:
    """c = κ_act / κ_SiLU: how much narrower the activation's dead zone is than SiLU's (SiLU 1.0,
    gelu_pytorch_tanh ≈ 0.589). 1.0 for activations without an interior minimum."""
    k = _knee_of(name)
    if k is None:
        log.warning("activation %r has no interior minimum; praq reads tau in raw pre-activation units", name)
        return 1.0
    return k / _knee_of("silu")


def _mlp_config(block: torch.nn.Module, spec: ArchSpec):
    mlp_path = spec.mlp_gate.rsplit(".", 1)[0] if "." in spec.mlp_gate else ""
    mlp = get_module(block, mlp_path) if mlp_path else block
    for m in (mlp, block, *block.modules()):
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, spec.activation_attr, None) is not None:
            return cfg
    return None


def block_activation(block: torch.nn.Module, spec: ArchSpec) -> tuple[str, Callable, float]:
    """(name, act, c) of the block's MLP activation, read from the config the block carries:
    `getattr(config, spec.activation_attr)` looked up in transformers' ACT2FN."""
    from transformers.activations import ACT2FN

    cfg = _mlp_config(block, spec)
    if cfg is None:
        raise AwqnbError(
            f"cannot find the MLP activation: no submodule of the block has a config with "
            f"{spec.activation_attr!r}; praq needs it to measure importance after the activation."
        )
    name = getattr(cfg, spec.activation_attr)
    if name not in ACT2FN:
        raise AwqnbError(f"activation {name!r} ({spec.activation_attr}) is unknown to transformers' ACT2FN.")
    return name, ACT2FN[name], activation_scale(name)


class PraqStats:
    """Streaming statistics of one MLP's intermediate channels: feed it chunks of the gate_up input.

    w_gate, w_up: `[I, H]` (current space); act: the activation; act_scale: c (see module doc).
    After any number of `update(x)` calls with x `[..., H]`:
      utility `[I]` = U, spread `[I]` = S, z_std `[I]` = σ (of ẑ), z_max `[I]` = max ẑ,
      p_live(beta, tau, noise_factor) `[I]` = P, importance(...) `[I]` = U + P·S.
    Sums are kept in float64; each update processes at most `token_chunk` tokens at a time.
    """

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, act: Callable, act_scale: float = 1.0,
                 token_chunk: int = 4096):
        self.w_gate = w_gate.detach().float()
        self.w_up = w_up.detach().float()
        self.act = act
        self.act_scale = float(act_scale)
        self.token_chunk = token_chunk
        self.n = 0
        i, dev = self.w_gate.shape[0], self.w_gate.device
        f64 = dict(dtype=torch.float64, device=dev)
        self.z_sum = torch.zeros(i, **f64)
        self.z_sq_sum = torch.zeros(i, **f64)
        self.z_max = torch.full((i,), float("-inf"), **f64)
        self.h_abs_sum = torch.zeros(i, **f64)
        self.h_sq_sum = torch.zeros(i, **f64)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        for x0 in torch.split(x, self.token_chunk):
            xf = x0.to(self.w_gate.device).float()
            z = xf @ self.w_gate.T  # [n, I]
            h = (self.act(z) * (xf @ self.w_up.T)).double()  # [n, I]
            zh = z.double() / self.act_scale
            self.n += xf.shape[0]
            self.z_sum += zh.sum(0)
            self.z_sq_sum += zh.pow(2).sum(0)
            self.z_max = torch.maximum(self.z_max, zh.amax(0))
            self.h_abs_sum += h.abs().sum(0)
            self.h_sq_sum += h.pow(2).sum(0)
            self._extra(zh)

    def _extra(self, zh: torch.Tensor) -> None:
        """Hook for subclasses: more statistics of one chunk's ẑ `[n, I]` (float64)."""

    def _check(self):
        if self.n == 0:
            raise AwqnbError("praq importance needs at least one calibration token.")

    @property
    def utility(self) -> torch.Tensor:
        """U_i = E_t|act(z_ti)·u_ti| `[I]`."""
        self._check()
        return (self.h_abs_sum / self.n).float()

    @property
    def spread(self) -> torch.Tensor:
        """S_i = sqrt(E[h²] − U²) `[I]`."""
        self._check()
        u = self.h_abs_sum / self.n
        return (self.h_sq_sum / self.n - u * u).clamp(min=0).sqrt().float()

    @property
    def z_std(self) -> torch.Tensor:
        """σ_i = std_t(ẑ_ti) `[I]` (population std, SiLU units)."""
        self._check()
        m = self.z_sum / self.n
        return (self.z_sq_sum / self.n - m * m).clamp(min=0).sqrt().float()

    def p_live(self, beta: float, tau: float, noise_factor: float) -> torch.Tensor:
        """P_i = sigmoid(beta·(max_t ẑ_ti + noise_factor·σ_i − tau)) `[I]`."""
        self._check()
        return torch.sigmoid(beta * (self.z_max.float() + noise_factor * self.z_std - tau))

    def importance(self, beta: float, tau: float, noise_factor: float) -> torch.Tensor:
        """I_i = U_i + P_i·S_i `[I]` float32."""
        return self.utility + self.p_live(beta, tau, noise_factor) * self.spread


def back_project(importance: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 x_abs_mean: torch.Tensor) -> torch.Tensor:
    """gate_up salience `[H]`: a_j = E|x_j| · Σ_i π_i w_ij / Σ_i w_ij, with π = I / mean(I)
    `[I]` and w_ij = |W_gate[i,j]| + |W_up[i,j]| (`w_*`: `[I, H]`)."""
    imp = importance.float().to(w_gate.device)
    m = imp.mean()
    pi = imp / m if m > 0 else torch.ones_like(imp)
    w = w_gate.float().abs() + w_up.float().abs()  # [I, H]
    r = (pi @ w) / w.sum(0).clamp(min=1e-12)
    return x_abs_mean.float().to(w.device) * r


def group_kind(spec: ArchSpec, group: ScaleGroup) -> str:
    """'gate_up' (the group that scales gate_proj), 'down' (the group fed by up_proj) or
    'attention' (every other group)."""
    if spec.mlp_gate in group.layers:
        return "gate_up"
    if group.prev_op == spec.mlp_up:
        return "down"
    return "attention"


def noise_seed(seed: int, block_index: int, key: str) -> int:
    """Seed of robust_praq's generator for one (config seed, block, input point)."""
    return (seed * 1_000_003 + block_index * 7_919 + zlib.crc32(key.encode())) % (2**63 - 1)


class PRAQ(Step):
    """The salience of praq: post-activation risk-aware importance (module docstring: formulas).

    down: a_i = U_i + P_i·S_i; gate_up: a_j = E|x_j|·r_j (back-projection); attention: E|x|.
    Params: beta (sigmoid temperature, SiLU units), tau (knee threshold, SiLU units),
    noise_factor (noise band as a fraction of σ(ẑ)).
    """

    PARAMS = {"beta": 3.0, "tau": -3.0, "noise_factor": 0.2}
    needs_calibration = True

    def setup(self):
        p = self.params
        if not float(p["beta"]) > 0:
            raise AwqnbError(f"beta={p['beta']} must be > 0 (it is the sigmoid's temperature; default 3.0).")
        if not float(p["noise_factor"]) >= 0:
            raise AwqnbError(f"noise_factor={p['noise_factor']} must be >= 0 (default 0.2).")

    # ---- pieces robust_praq overrides -------------------------------------------------------
    def _input_copies(self, ctx: BlockContext, key: str):
        """Yield the versions of an input point's `[b, T, c]` chunks (current space) to score and
        average; praq: the inputs themselves, once."""
        yield ctx.inputs[key]

    # ---- salience -----------------------------------------------------------------------------
    def _abs_mean(self, ctx: BlockContext, key: str) -> torch.Tensor:
        """E|x_j| in the current space `[c]` (stats are pre-scale: E|x/s| = E|x|/s)."""
        a = ctx.stats[key].mean_abs
        s = ctx.scale_of.get(key)
        return a / s.to(a.device).float() if s is not None else a

    def _importance(self, st: PraqStats) -> torch.Tensor:
        p = self.params
        return st.importance(float(p["beta"]), float(p["tau"]), float(p["noise_factor"]))

    @torch.no_grad()
    def salience(self, ctx: BlockContext, group: ScaleGroup) -> torch.Tensor:
        spec = ctx.spec
        kind = group_kind(spec, group)
        key = group.layers[0]
        if kind == "attention":
            return self._attention_salience(ctx, key)
        gate_key = ctx.input_key.get(spec.mlp_gate, spec.mlp_gate)
        _, act, c = block_activation(ctx.block, spec)
        wg = get_module(ctx.block, spec.mlp_gate).weight.data
        wu = get_module(ctx.block, spec.mlp_up).weight.data
        out = []
        for chunks in self._input_copies(ctx, gate_key):
            st, xa = PraqStats(wg, wu, act, c), AbsMean()
            for x in chunks:  # one streaming pass per copy
                st.update(x)
                xa.update(x)
            imp = self._importance(st)
            if kind == "down":
                if not out:
                    self._record(ctx, st, imp)
                out.append(imp)
            else:
                out.append(back_project(imp, wg, wu, xa.value))
        return torch.stack(out).mean(0) if len(out) > 1 else out[0]

    def _attention_salience(self, ctx: BlockContext, key: str) -> torch.Tensor:
        return self._abs_mean(ctx, key)

    def _record(self, ctx: BlockContext, st: PraqStats, imp: torch.Tensor) -> None:
        """JSON-able per-block evidence: how far praq's `down` importance departs from L1."""
        p = self.params
        plive = st.p_live(float(p["beta"]), float(p["tau"]), float(p["noise_factor"]))
        u = st.utility
        ctx.evidence["praq"] = {
            "act_scale": round(st.act_scale, 6),
            "tau_z": round(float(p["tau"]) * st.act_scale, 6),
            "frac_p_live_below_half": float((plive < 0.5).float().mean()),
            "risk_over_utility_median": float(((imp - u) / u.clamp(min=1e-12)).median()),
            "spearman_l1_down": _spearman_t(u, imp),
        }


class AbsMean:
    """Streaming E|x_j| `[c]` over chunks `[..., c]` (float64 sums)."""

    def __init__(self):
        self.tot, self.n = None, 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        s = x2.abs().double().sum(0)
        self.tot = s if self.tot is None else self.tot + s
        self.n += x2.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return (self.tot / max(self.n, 1)).float()


def _spearman_t(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (ties broken by order; for evidence only)."""
    ra = a.float().argsort().argsort().double()
    rb = b.float().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    d = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / d) if d > 0 else float("nan")


class RobustPRAQ(PRAQ):
    """The salience of robust_praq: praq averaged over `n_noise_samples` noisy copies x̃ = x + noise_std·sd_j·ε of the inputs
    (module docstring). noise_std is relative to each channel's standard deviation; the noise comes
    from a torch.Generator seeded by `noise_seed(cfg.seed, block, input point)`. noise_std = 0 is
    praq exactly (the noisy path is skipped)."""

    PARAMS = {**PRAQ.PARAMS, "noise_std": 0.01, "n_noise_samples": 3}

    def setup(self):
        super().setup()
        p = self.params
        if not float(p["noise_std"]) >= 0:
            raise AwqnbError(f"noise_std={p['noise_std']} must be >= 0 (default 0.01).")
        n = p["n_noise_samples"]
        if isinstance(n, bool) or int(n) != n or int(n) < 1:
            raise AwqnbError(f"n_noise_samples={n} must be a positive integer (default 3).")

    @property
    def _noisy(self) -> bool:
        return float(self.params["noise_std"]) > 0

    def _input_copies(self, ctx: BlockContext, key: str):
        """Yield `n_noise_samples` noisy copies (each a lazy iterator over the chunks, so at most
        one noisy chunk exists at a time); noise_std 0 yields the inputs once, like praq."""
        if not self._noisy:
            yield ctx.inputs[key]
            return
        xs = ctx.inputs[key]
        dev = xs[0].device
        sd = ctx.stats[key].var.sqrt().to(dev)
        s = ctx.scale_of.get(key)
        if s is not None:  # stats are pre-scale; the inputs are x / s
            sd = sd / s.to(dev).float()
        sigma = float(self.params["noise_std"]) * sd  # [c]
        gen = torch.Generator(device=dev)
        gen.manual_seed(noise_seed(self.cfg.seed, ctx.index, key))

        def copy():
            for x in xs:
                eps = torch.randn(x.shape, generator=gen, device=dev, dtype=torch.float32)
                yield (x.float() + sigma * eps).to(x.dtype)

        for _ in range(int(self.params["n_noise_samples"])):
            yield copy()

    def _attention_salience(self, ctx: BlockContext, key: str) -> torch.Tensor:
        if not self._noisy:
            return super()._attention_salience(ctx, key)
        out = []
        for chunks in self._input_copies(ctx, key):
            m = AbsMean()
            for x in chunks:
                m.update(x)
            out.append(m.value)
        return torch.stack(out).mean(0)
