"""End-to-end layer sensitivity: what quantizing one part of one layer does to the predictions.

For every decoder layer i and linear family f (the scale groups of `awqnb.model.arch`: qkv, vo = o_proj,
gate_up, down), with W_eff the quantized weights mapped back to the FP model's basis
(`diagnostics.effective_weights`: folds undone, so any subset can be swapped into the FP model):

    only    the FP model with just (i, f) at W_eff              → how much (i, f) alone hurts
    except  the fully quantized model with just (i, f) back at FP → how much keeping it FP recovers

each measured on a fixed evaluation slice (the first `n_windows` windows of `seqlen` tokens of
`eval_tokens`, GPTQ windows) by the mean next-token KL divergence from the FP model,

    KL = 1/N Σ_t Σ_v p_FP(v | t) · (log p_FP(v | t) − log p_variant(v | t))   [nats / token]

over the N = n_windows · (seqlen − 1) positions that have a next token, and by the slice's
perplexity exp(1/N Σ_t −log p_variant(x_{t+1} | t)).

How it is computed (the model stays where it is; every block is onloaded to `device` by the block
engine, `awqnb.engine.walk`, one at a time):
    h_FP[j], h_Q[j]  `[n_win, T, H]`  the slice's hidden states entering block j in the FP and in
                                      the fully quantized model (j = 0 … L), cached: one engine
                                      walk, each block run with its FP weights, then with W_eff
    p_FP             `[n_win, T-1, V]` the FP next-token distribution, computed once
    variant (i, f, m) starts from h_FP[i] (only) or h_Q[i] (except) and recomputes blocks i … L−1
    only: L − i blocks per variant instead of L. The variants are walked block-major: block j is
    onloaded once per group of start layers (groups sized to `max_states` live hidden states), and
    its FP / quantized / hybrid weights are swapped in by pointer.

Mixed-precision plans (`awqnb.quant.plan.Plan`) are chosen from the frame and measured by
`awqnb.analysis.plans` (`plan_from_sensitivity`, `pareto`).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import time
from collections import abc
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from awqnb.analysis.diagnostics import check_layers, model_device, model_label, with_own_block
from awqnb.analysis.scales import effective_weight, scale_maps, scales_fingerprint
from awqnb.analysis.evaluate import base_and_head, check_positive
from awqnb.analysis.statcache import cached_or_compute, calibration_key, weights_fingerprint, resolve_cache
from awqnb.core.devices import sync
from awqnb.core.dtypes import dtype_name, parse_dtype
from awqnb.core.errors import AwqnbError
from awqnb.core.progress import tqdm
from awqnb.engine.budget import SENS_PREFIX_BYTES, SENS_STATES_BYTES, check_sensitivity
from awqnb.engine.capture import block_output
from awqnb.engine.walk import BlockEngine
from awqnb.model.arch import ArchSpec, attn_shape, blocks, get_module, resolve_spec
from awqnb.model.provenance import versions
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.methods import get_method
from awqnb.quant.pipeline import QuantResult, apply_block, keep_block_norms_fp32, quantize, round_head
from awqnb.quant.plan import FAMILY_ALIASES, check_model

log = logging.getLogger(__name__)

MODES = ("only", "except")
COLUMNS = ["layer", "family", "mode", "kl", "ppl", "dppl", "n_params", "mse", "mse_kind"]
MSE_KIND = "relative"  # Σ‖(W − W_eff) x‖² / Σ‖W x‖² over the family's linears (FP inputs, the slice)


# --- inputs ---------------------------------------------------------------------------------

def eval_windows(eval_tokens: torch.Tensor, seqlen: int, n_windows: int) -> torch.Tensor:
    """The evaluation slice `[n_windows, seqlen]` (the first windows of the stream, GPTQ layout), or
    AwqnbError for an empty or too long slice."""
    check_positive(seqlen=(seqlen, 2), n_windows=(n_windows, 1))
    if not isinstance(eval_tokens, torch.Tensor) or eval_tokens.is_floating_point():
        raise AwqnbError("eval_tokens must be a tensor of token ids (awqnb.model.data.load_eval_tokens).")
    flat = eval_tokens.reshape(-1)
    if flat.numel() < n_windows * seqlen:
        raise AwqnbError(f"the evaluation slice needs n_windows × seqlen = {n_windows} × {seqlen} = "
                         f"{n_windows * seqlen} tokens but eval_tokens has {flat.numel()}; lower n_windows or seqlen.")
    return flat[: n_windows * seqlen].reshape(n_windows, seqlen).to(torch.long).cpu()


def family_linears(spec: ArchSpec) -> dict[str, tuple[str, ...]]:
    """family (scale-group name) → its block-relative linear names."""
    return {g.name: tuple(g.layers) for g in spec.groups}


def _check_families(spec: ArchSpec, families) -> list[str]:
    fams = family_linears(spec)
    if families is None:
        return list(fams)
    if isinstance(families, str):
        families = [families]
    out = []
    for f in families:
        f = FAMILY_ALIASES.get(str(f), str(f))
        if f not in fams:
            raise AwqnbError(f"family {f!r} does not exist; families are {', '.join(fams)}.")
        if f not in out:
            out.append(f)
    if not out:
        raise AwqnbError(f"no families given; pass families=None for all ({', '.join(fams)}).")
    return out


def _check_modes(modes) -> list[str]:
    if isinstance(modes, str):
        modes = [modes]
    modes = list(dict.fromkeys(modes))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise AwqnbError(f"modes {bad or modes!r} unknown; use 'only', 'except' or both.")
    return modes


# --- the quantized model in the FP basis ----------------------------------------------------

@dataclass
class Reference:
    """A quantization of the model, in the FP model's basis.

    Kept compact: wq[layer][linear] is the quantized weight W_q `[co, ci]` on the CPU as the
    quantized model holds it (its dtype: bf16 for a bf16 model, half of a float32 copy — 16 GB,
    not 32, at 8B), cols / rows the scales folded into its input columns / output rows. W_eff is
    formed on demand on the device that uses it (`weights`), exactly as the float32 copies were.
    weff[layer][linear]: W_eff on the CPU in `dtype`, computed at each access (a read-only view,
    for tests and `swap_effective`). head: the quantized lm_head weight `[V, H]` in its own dtype
    when the run quantized it, else None; result: the QuantResult; dtype: the compute dtype.
    """

    result: Any
    wq: dict[int, dict[str, torch.Tensor]]
    cols: dict[int, dict[str, torch.Tensor]]
    rows: dict[int, dict[str, torch.Tensor]]
    dtype: torch.dtype = torch.float32
    head: torch.Tensor | None = None

    def weights(self, j: int, device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Block j's W_eff per linear on `device` in `dtype` (default: the compute dtype)."""
        dt = dtype or self.dtype
        return {n: effective_weight(w, self.cols[j].get(n), self.rows[j].get(n), device).to(dt)
                for n, w in self.wq[j].items()}

    @property
    def weff(self) -> Mapping[int, dict[str, torch.Tensor]]:
        return _WeffView(self)


class _WeffView(abc.Mapping):
    """layer → linear → W_eff on the CPU in the Reference's dtype, formed at each access."""

    def __init__(self, ref: Reference):
        self._ref = ref

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        return self._ref.weights(j)

    def __iter__(self):
        return iter(self._ref.wq)

    def __len__(self) -> int:
        return len(self._ref.wq)


def _compact(qmodel: nn.Module, res, j: int, spec: ArchSpec, attn, copy_weights: bool) -> tuple[dict, dict, dict]:
    """(W_q per linear on the CPU, input-column scales, output-row scales) of block j of a
    quantized model; W_q copied when the caller's model could change later, else shared."""
    block = blocks(qmodel, spec)[j]
    wq = {n: get_module(block, n).weight.data.detach().to("cpu", copy=copy_weights) for n in spec.linears}
    cols, rows = scale_maps(res, j, spec, attn)
    return wq, {n: c.to("cpu") for n, c in cols.items()}, {n: r.to("cpu") for n, r in rows.items()}


def reference(model: nn.Module, cfg: MethodConfig | None, calibration=None, *, device=None, result=None,
              dtype=torch.float32, model_name: str | None = None, progress: bool = False) -> Reference:
    """Quantize a copy of `model` with `cfg` (or take `result`: a QuantResult, replayed block by
    block as `pipeline.apply` does, each on its own copy of that one block, or a `(quantized model,
    QuantResult)` pair) and return every linear's W_q and folded scales (`Reference`)."""
    dev = model_device(model, device)
    if isinstance(result, QuantResult):
        return _replayed_reference(model, result, dev, dtype)
    if isinstance(result, (tuple, list)) and len(result) == 2:
        qmodel, res = result
        own = False  # the caller's model: its weights are copied, not shared
    elif result is None:
        if cfg is None:
            raise AwqnbError("pass a MethodConfig or a result to compare against.")
        # quantize writes every block in place: a whole copy, in host memory (it walks one block on the GPU)
        qmodel = copy.deepcopy(model)
        res = quantize(qmodel, cfg, calibration, device=dev, model_name=model_label(model, model_name),
                       progress=progress)
        own = True  # our copy: its quantized weights are kept as they are, the rest freed with it
    else:
        raise AwqnbError("result must be a QuantResult or a (quantized model, QuantResult) pair.")
    spec = resolve_spec(model)
    attn = attn_shape(qmodel.config)
    ref = Reference(res, {}, {}, {}, dtype)
    for j in range(len(blocks(model, spec))):
        ref.wq[j], ref.cols[j], ref.rows[j] = _compact(qmodel, res, j, spec, attn, copy_weights=not own)
    if res.config.lm_head == "quantize":
        ref.head = qmodel.get_output_embeddings().weight.data.detach().to("cpu", copy=True)
    return ref


@torch.no_grad()
def _replayed_reference(model: nn.Module, res: QuantResult, dev, dtype) -> Reference:
    """`reference` of a QuantResult without a second model: each block is copied alone
    (`with_own_block`), replayed on `dev` (`pipeline.apply_block`) and read; the head, when the
    run quantized it, rounded on a copy of its weight. The same tensors as `apply` on a deep copy."""
    spec = resolve_spec(model)
    cfg = res.config
    if model.config.model_type != res.model_type:
        raise AwqnbError(f"this result was made for a {res.model_type!r} model, not {model.config.model_type!r}.")
    n = len(blocks(model, spec))
    if n != len(res.layers):
        raise AwqnbError(f"this result has {len(res.layers)} blocks but the model has {n}.")
    method = get_method(cfg.method)(cfg)
    attn = attn_shape(model.config)
    ref = Reference(res, {}, {}, {}, dtype)
    for rec in res.layers:
        own = with_own_block(model, rec.index)
        block = blocks(own, spec)[rec.index]
        keep_block_norms_fp32(block, spec)
        apply_block(block, rec, res, spec, attn, method, dev)
        # the block copy is ours: its quantized weights are kept, the rest of it freed
        j = rec.index
        ref.wq[j], ref.cols[j], ref.rows[j] = _compact(own, res, j, spec, attn, copy_weights=False)
        del own, block
    if cfg.lm_head == "quantize":
        w = model.get_output_embeddings().weight.data.detach().clone()
        ref.head = round_head(w, cfg).to("cpu")
    return ref


@torch.no_grad()
def swap_effective(model: nn.Module, weights: Mapping[int, Mapping[str, torch.Tensor]],
                   which: Iterable[tuple[int, str]] | None = None) -> nn.Module:
    """Write W_eff into `model`'s linears in place (a deep copy of the FP model, typically): for the
    (layer, family) pairs in `which` (all of `weights` when None). Returns `model`."""
    spec = resolve_spec(model)
    fams = family_linears(spec)
    bl = blocks(model, spec)
    pairs = [(j, f) for j in weights for f in fams] if which is None else list(which)
    per_layer: dict[int, list[str]] = {}
    for j, f in pairs:
        per_layer.setdefault(j, []).extend(fams[f])
    for j, names in per_layer.items():
        wj = weights[j]  # once per layer: a Reference's weff forms the whole block at each access
        for name in names:
            lin = get_module(bl[j], name)
            lin.weight.data.copy_(wj[name].to(lin.weight.device, lin.weight.dtype))
    return model


# --- the walker -----------------------------------------------------------------------------

@contextlib.contextmanager
def _swapped(block: nn.Module, tensors: Mapping[str, torch.Tensor]):
    """Point the block's linears at `tensors` (already on the device, compute dtype) for the duration;
    the originals are restored before the block is offloaded (which would copy whatever is there)."""
    lins = {n: get_module(block, n) for n in tensors}
    old = {n: lin.weight.data for n, lin in lins.items()}
    try:
        for n, lin in lins.items():
            lin.weight.data = tensors[n]
        yield block
    finally:
        for n, lin in lins.items():
            lin.weight.data = old[n]


class EvalSlice:
    """The evaluation slice on the block engine: cached FP / quantized hidden states, the FP
    distribution, and block-by-block recomputation of hybrid models from them."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, ref: Reference, device, dtype, batch_size: int,
                 offload: bool, logit_rows: int, progress: bool):
        self.model = model
        self.ref = ref
        self.engine = BlockEngine(model, windows, device, dtype, batch_size, offload_activations=offload)
        self.dev, self.dtype = self.engine.device, self.engine.dtype
        self.spec = self.engine.spec
        self.bl = self.engine.blocks
        self.L = len(self.bl)
        self.fams = family_linears(self.spec)
        self.logit_rows = logit_rows
        self.progress = progress
        base, self.head, self.softcap = base_and_head(model)
        self.norm = getattr(base, "norm", None)
        if self.norm is None:
            raise AwqnbError(f"{type(base).__name__} has no final norm `norm`; sensitivity needs it.")
        self.labels = [c[:, 1:].to(self.dev) for c in self.engine.chunks]
        self.n_pos = sum(l.numel() for l in self.labels)
        # filled by `prefixes` (the engine's walk): per block, its kwargs per chunk and the FP /
        # quantized hidden states entering it (index L: the last block's outputs)
        self.kw: list[list[dict]] = []
        self.h_fp: list[list[torch.Tensor]] = []
        self.h_q: list[list[torch.Tensor]] = []
        self.times: dict[str, float] = {}
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        state = windows.numel() * cfg.hidden_size * torch.empty((), dtype=self.dtype).element_size()
        self.prefix_bytes = (2 * self.L + 1) * state
        self.prefixes_on_host = _prefixes_on_host(self.dev, self.engine.offload, self.prefix_bytes)

    def qweights(self, j: int) -> dict[str, torch.Tensor]:
        """Block j's W_eff on the device in the compute dtype (formed there from the bf16 W_q)."""
        return self.ref.weights(j, self.dev, self.dtype)

    def keep(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """A prefix as cached: where the engine keeps it, or in pinned CPU memory when all the
        prefixes would take more than SENS_PREFIX_BYTES of the GPU (read back one at a time)."""
        if not self.prefixes_on_host:
            return hs
        out = []
        for h in hs:
            host = torch.empty(h.shape, dtype=h.dtype, pin_memory=h.is_cuda)
            host.copy_(h, non_blocking=h.is_cuda)
            out.append(host)
        return out

    def run(self, j: int, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block j (on the device, whatever weights it points at now) on every chunk."""
        block = self.bl[j]
        return [self.engine.stash(block_output(block(h.to(self.dev, non_blocking=True), **kw)))
                for h, kw in zip(hs, self.kw[j])]

    @torch.no_grad()
    def prefixes(self, mse_layers: Iterable[int]) -> dict[tuple[int, str], tuple[float, float]]:
        """Fill kw, h_fp and h_q in one walk of the block engine (each block onloaded once, run with
        its FP weights, then with W_eff swapped in on the quantized states); return
        (Σ‖(W − W_eff) x‖², Σ‖W x‖²) per (layer, linear) of `mse_layers`, x the linear's input in
        the FP model."""
        if self.kw:
            raise AwqnbError("this evaluation slice's prefixes are already computed.")
        want = set(mse_layers)
        acc: dict[tuple[int, str], list[torch.Tensor]] = {}
        t = sync(self.dev)
        for step in self.engine.walk():
            j, block = step.index, step.block
            if j == 0:
                self.h_fp.append(self.keep(step.hidden))
                self.h_q.append(self.h_fp[0])
            self.kw.append(step.kwargs)
            sink, points = None, ()
            qw = self.qweights(j)
            if j in want:
                dws = {n: get_module(block, n).weight.data.float() - w.to(torch.float32) for n, w in qw.items()}
                points = self.spec.linears
                for n in points:
                    acc[(j, n)] = [torch.zeros((), dtype=torch.float64, device=self.dev) for _ in range(2)]

                def sink(name, x, out, j=j, dws=dws):
                    x = x.reshape(-1, x.shape[-1]).float()
                    acc[(j, name)][0] += (x @ dws[name].T).double().pow(2).sum()
                    acc[(j, name)][1] += out.reshape(-1, out.shape[-1]).double().pow(2).sum()

            out = step.forward(sink, points, with_output=True)
            self.h_fp.append(self.keep(out))
            with _swapped(block, qw):
                self.h_q.append(self.keep(self.run(j, self.h_q[j])))
            del qw
            step.next_hidden = out
        self.times["prefixes_s"] = sync(self.dev) - t
        return {k: (float(v[0]), float(v[1])) for k, v in acc.items()}

    # -- the output head ----------------------------------------------------------------------
    @contextlib.contextmanager
    def head_on(self):
        with self.engine.onload(self.norm), self.engine.onload(self.head):
            yield

    def _logits(self, h: torch.Tensor, quant_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits z `[rows, V]` float32, log-sum-exp `[rows]` float64) of final hidden states
        `h: [rows, H]` (soft-capped when the model's config says so)."""
        x = self.norm(h)
        if quant_head and self.ref.head is not None:
            z = F.linear(x, self._qhead)
        else:
            z = self.head(x)
        z = z.float()
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        m = z.amax(-1, keepdim=True)
        lse = m.squeeze(-1).double() + torch.exp(z - m).sum(-1, dtype=torch.float64).log()
        return z, lse

    def _rows(self, hs: list[torch.Tensor]):
        """(chunk c, row slice, hidden `[r, H]`, labels `[r]`) over the predicted positions."""
        for c, (h, lab) in enumerate(zip(hs, self.labels)):
            hh = h[:, :-1].reshape(-1, h.shape[-1])
            ll = lab.reshape(-1)
            for s in range(0, hh.shape[0], self.logit_rows):
                e = min(s + self.logit_rows, hh.shape[0])
                yield c, slice(s, e), hh[s:e].to(self.dev, non_blocking=True), ll[s:e]

    @torch.no_grad()
    def fp_distribution(self) -> None:
        """The FP logits z_FP and log-sum-exp per predicted position (kept on the activation device).

        KL is then Σ_v p_FP (z_FP − z) − (lse_FP − lse): differences of close logits and one
        float64 sum, not a difference of two ~log V entropies, which in float32 would bury a
        single family's 1e-4 nats."""
        self._qhead = self.ref.head.to(self.dev, self.dtype) if self.ref.head is not None else None
        self.z_fp, self.lse_fp = [], []
        nll = torch.zeros((), dtype=torch.float64, device=self.dev)
        with self.head_on():
            for c, sl, h, lab in self._rows(self.h_fp[self.L]):
                z, lse = self._logits(h, quant_head=False)
                self.z_fp.append(self.engine.stash(z))
                self.lse_fp.append(lse)
                nll += (lse - z.gather(1, lab[:, None]).squeeze(1).double()).sum()
        self.fp_nll = float(nll) / self.n_pos

    @torch.no_grad()
    def score(self, hs: list[torch.Tensor], quant_head: bool) -> tuple[float, float]:
        """(mean KL(FP ‖ this) per position [nats], perplexity) of final hidden states `hs`
        (the caller holds `head_on()`)."""
        kl = torch.zeros((), dtype=torch.float64, device=self.dev)
        nll = torch.zeros((), dtype=torch.float64, device=self.dev)
        for i, (c, sl, h, lab) in enumerate(self._rows(hs)):
            z, lse = self._logits(h, quant_head)
            zf = self.z_fp[i].to(self.dev, non_blocking=True)
            lf = self.lse_fp[i]
            p = torch.exp(zf - lf.float()[:, None])
            kl += ((p * (zf - z)).sum(-1, dtype=torch.float64) - (lf - lse)).sum()
            nll += (lse - z.gather(1, lab[:, None]).squeeze(1).double()).sum()
        return float(kl) / self.n_pos, math.exp(float(nll) / self.n_pos)

    # -- hybrids --------------------------------------------------------------------------------
    @torch.no_grad()
    def walk_variants(self, starts: list[int], families: list[str], modes: list[str], max_states: int,
                      bar=None) -> dict[tuple[int, str, str], tuple[float, float]]:
        """(layer, family, mode) → (KL, ppl) for every start layer in `starts`."""
        out = {}
        per_layer = len(families) * len(modes)
        size = max(1, max_states // max(per_layer, 1))
        for g0 in range(0, len(starts), size):
            group = starts[g0:g0 + size]
            gset = set(group)
            states: dict[tuple[int, str, str], list[torch.Tensor]] = {}
            for j in range(group[0], self.L):
                block = self.bl[j]
                with self.engine.onload(block):
                    fpw = {n: get_module(block, n).weight.data for n in self.spec.linears}
                    qw = self.qweights(j)
                    go = [k for k in states if k[2] == "only"]
                    ex = [k for k in states if k[2] == "except"]
                    for k in go:  # FP weights: the block as it is
                        states[k] = self.run(j, states[k])
                    if ex:
                        with _swapped(block, qw):
                            for k in ex:
                                states[k] = self.run(j, states[k])
                    if j in gset:
                        for f in families:
                            lins = self.fams[f]
                            if "only" in modes:
                                with _swapped(block, {n: qw[n] for n in lins}):
                                    states[(j, f, "only")] = self.run(j, self.h_fp[j])
                            if "except" in modes:
                                with _swapped(block, {**qw, **{n: fpw[n] for n in lins}}):
                                    states[(j, f, "except")] = self.run(j, self.h_q[j])
                    del qw, fpw
                if bar is not None:
                    bar.update(len(states))
            with self.head_on():
                for k in list(states):
                    out[k] = self.score(states.pop(k), quant_head=k[2] == "except")
        return out

    @torch.no_grad()
    def run_hybrid(self, weights: Mapping[int, Mapping[str, torch.Tensor]]) -> tuple[float, float]:
        """(KL, ppl) of the fully quantized model with the linears in `weights` (layer → linear →
        `[co, ci]` W in the FP basis) replaced, recomputed from the first replaced layer on."""
        if not weights:
            with self.head_on():
                return self.score(self.h_q[self.L], quant_head=True)
        start = min(weights)
        hs = self.h_q[start]
        for j in range(start, self.L):
            block = self.bl[j]
            with self.engine.onload(block):
                w = self.qweights(j)
                w.update({n: t.to(self.dev, self.dtype) for n, t in weights.get(j, {}).items()})
                with _swapped(block, w):
                    hs = self.run(j, hs)
        with self.head_on():
            return self.score(hs, quant_head=True)


def _prefixes_on_host(dev: torch.device, offload: bool, nbytes: int) -> bool:
    """Whether the cached prefixes (`nbytes` in all) go to pinned CPU memory: on a GPU, unless the
    engine already offloads every activation, when they would take more than SENS_PREFIX_BYTES."""
    return dev.type == "cuda" and not offload and nbytes > SENS_PREFIX_BYTES


def _max_states(sl: EvalSlice, max_states: int | None) -> int:
    """Hidden states `[n_tok, H]` held at once by the variant walk: given, or the smaller of ~40% of
    the free GPU memory and SENS_STATES_BYTES (4 GiB elsewhere) divided by one state's bytes. The
    cap keeps the pass's peak from growing with depth (more start layers only make more groups)."""
    if max_states is not None:
        if max_states < 1:
            raise AwqnbError(f"max_states={max_states} must be at least 1.")
        return int(max_states)
    one = sum(h.numel() * h.element_size() for h in sl.h_fp[0])
    if sl.dev.type == "cuda" and not sl.engine.offload:
        free, _ = torch.cuda.mem_get_info(sl.dev)
        budget = min(0.4 * free, SENS_STATES_BYTES)
    else:
        budget = 4 * 2**30
    return max(1, int(budget // max(one, 1)))


# --- the frame ------------------------------------------------------------------------------

def provenance(model, cfg, calibration, windows, device, dtype, model_name, res) -> dict:
    q = cfg.quant if cfg is not None else res.config.quant
    c = cfg if cfg is not None else res.config
    calib = res.calibration if res is not None and res.calibration else (
        calibration.to_dict() if hasattr(calibration, "to_dict") else None)
    h = hashlib.sha1(windows.numpy().tobytes()).hexdigest()[:16]
    return {"model": model_label(model, model_name), "method": c.method, "bits": q.bits, "group_size": q.group_size,
            "symmetric": q.symmetric, "lm_head": c.lm_head, "search_dtype": c.dtype,
            "plan": c.plan.to_list() if c.plan else None, "calibration": calib,
            "eval": {"seqlen": int(windows.shape[1]), "n_windows": int(windows.shape[0]),
                     "n_positions": int(windows.shape[0] * (windows.shape[1] - 1)), "tokens_sha1": h,
                     "slice": "first n_windows windows of eval_tokens"},
            "device": str(device), "dtype": dtype_name(dtype), "versions": versions()}


def named_slice(prov: dict, slice_name: str) -> dict:
    """A copy of `provenance(...)`'s dict with eval['slice'] = slice_name (what the tokens are)."""
    return {**prov, "eval": {**prov.get("eval", {}), "slice": slice_name}}


def _frame(rows: list[dict], attrs: dict):
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    df = df.astype({"layer": int, "family": str, "mode": str, "kl": float, "ppl": float, "dppl": float,
                    "n_params": "int64", "mse": float, "mse_kind": str})
    df.attrs.update(attrs)
    return df


def _key_parts(model, cfg, res, result, calibration, windows, seqlen, n_windows, layers, fams, modes,
               cdtype) -> dict:
    """What decides a sensitivity frame: the FP model, the run (config, or the given result and
    quantized weights), calibration, the slice's token ids and the settings."""
    return {"model": weights_fingerprint(model), "config": (cfg or res.config).to_dict(),
            "calibration": calibration_key(calibration) if calibration is not None else None,
            "result": scales_fingerprint(res) if res is not None else None,
            "quantized": weights_fingerprint(result[0]) if isinstance(result, (tuple, list)) else None,
            "slice": hashlib.sha1(windows.numpy().tobytes()).hexdigest()[:16], "seqlen": seqlen,
            "n_windows": n_windows, "layers": layers, "families": fams, "modes": modes, "dtype": str(cdtype)}


def sensitivity(model: nn.Module, cfg: MethodConfig | None, calibration, eval_tokens: torch.Tensor, *, layers=None,
                families=None, modes=("only", "except"), device=None, seqlen: int = 512, n_windows: int = 8,
                progress: bool = True, cache=True, model_name: str | None = None, result=None,
                dtype="float32", batch_size: int = 8, max_states: int | None = None, logit_rows: int = 2048,
                offload_activations: bool = False, slice_name: str | None = None):
    """End-to-end sensitivity of each (layer, family) (module docstring) → DataFrame, one row per
    (layer, family, mode), columns:

        layer int, family str (qkv | vo | gate_up | down), mode str ('only' | 'except'),
        kl float      mean KL(FP ‖ variant), nats per predicted position of the slice
        ppl float     the variant's perplexity on the slice
        dppl float    'only': ppl − FP ppl; 'except': fully-quantized ppl − ppl (> 0: keeping the
                      family FP recovers that much)
        n_params int  weights in the family's linears in that layer
        mse float     relative output MSE of the family, Σ‖(W − W_eff) x‖² / Σ‖W x‖² over its
                      linears, x their inputs in the FP model on the slice (layer-local, as
                      `diagnostics.layer_mse`); mse_kind str = 'relative'

    attrs: provenance (model, method, bits, group size, calibration, eval slice, device, dtype,
    versions), fp_ppl, quant_ppl, quant_kl (the fully quantized model), mse_kind, family_linears
    (family → number of linears), timings.

    cfg: the run to measure (quantized here, on a copy) — or result: a QuantResult or a
    (quantized model, QuantResult) pair. eval_tokens `[n_tok]`: the slice is its first
    `n_windows` windows of `seqlen`. dtype: compute dtype of the forwards (float32 default: a
    single family's KL can be 1e-4 nats, below bf16 noise). batch_size: windows per chunk.
    max_states: hidden states `[n_tok, H]` the walk may hold (default from free memory).
    slice_name: the slice in words (`awqnb.model.data.ranking_tokens`' description), recorded as
    attrs['provenance']['eval']['slice'].
    Cached (statcache, no pickle) by model, config (or result), calibration, slice and settings.
    """
    spec = resolve_spec(model)
    layers = check_layers(model, layers, model_name)
    fams = _check_families(spec, families)
    modes = _check_modes(modes)
    windows = eval_windows(eval_tokens, seqlen, n_windows)
    check_positive(batch_size=(batch_size, 1), logit_rows=(logit_rows, 1))
    cdtype = parse_dtype(dtype) or torch.float32
    dev = model_device(model, device)
    res = result[1] if isinstance(result, (tuple, list)) and len(result) == 2 else result
    if res is not None and not isinstance(res, QuantResult):
        raise AwqnbError("result must be a QuantResult or a (quantized model, QuantResult) pair.")
    if cfg is None and res is None:
        raise AwqnbError("pass cfg (a MethodConfig) or result.")
    if cfg is not None and res is not None and cfg.to_dict() != res.config.to_dict():
        raise AwqnbError("cfg and result disagree; pass one of them (cfg=None with a result).")
    if res is None:
        get_method(cfg.method)(cfg)  # method parameters, before any work
        if get_method(cfg.method).needs_calibration and calibration is None:
            raise AwqnbError(f"method {cfg.method!r} needs calibration data; pass calibration.")
    if (cfg or res.config).plan:
        check_model((cfg or res.config).plan, model)
    if resolve_cache(cache) is None:  # no key to build (fingerprints read every weight)
        parts = {}
    else:
        parts = _key_parts(model, cfg, res, result, calibration, windows, seqlen, n_windows, layers, fams, modes, cdtype)

    def compute():
        # a pass that cannot fit the GPU: refused before the reference run (a cached frame needs no check)
        check_sensitivity(model, dev, cdtype, n_windows, seqlen, batch_size, offload_activations, logit_rows)
        t0 = time.perf_counter()
        ref = reference(model, cfg, calibration, device=dev, result=result, dtype=cdtype, model_name=model_name)
        t_quant = time.perf_counter() - t0
        model.eval()
        sl = EvalSlice(model, windows, ref, dev, cdtype, batch_size, offload_activations, logit_rows, progress)
        sums = sl.prefixes(layers)
        t = sync(sl.dev)
        sl.fp_distribution()
        fp_ppl = math.exp(sl.fp_nll)
        with sl.head_on():
            quant_kl, quant_ppl = sl.score(sl.h_q[sl.L], quant_head=True)
        total = sum(len(fams) * len(modes) * (sl.L - i) for i in layers)
        bar = tqdm(total=total, desc="sensitivity", unit="block", disable=not progress)
        ms = _max_states(sl, max_states)
        var = sl.walk_variants(layers, fams, modes, ms, bar)
        bar.close()
        times = {"quantize_s": t_quant, **sl.times, "variants_s": sync(sl.dev) - t, "max_states": ms}
        bl = blocks(model, spec)
        rows = []
        for i in layers:
            for f in fams:
                lins = sl.fams[f]
                n_params = sum(get_module(bl[i], n).weight.numel() for n in lins)
                err = sum(sums[(i, n)][0] for n in lins)
                pw = sum(sums[(i, n)][1] for n in lins)
                mse = err / pw if pw > 0 else float("nan")
                for m in modes:
                    kl, ppl = var[(i, f, m)]
                    dppl = ppl - fp_ppl if m == "only" else quant_ppl - ppl
                    rows.append({"layer": i, "family": f, "mode": m, "kl": kl, "ppl": ppl, "dppl": dppl,
                                 "n_params": n_params, "mse": mse, "mse_kind": MSE_KIND})
        times["total_s"] = time.perf_counter() - t0
        attrs = {"provenance": provenance(model, cfg, calibration, windows, dev, cdtype, model_name, ref.result),
                 "fp_ppl": fp_ppl, "quant_ppl": quant_ppl, "quant_kl": quant_kl, "mse_kind": MSE_KIND,
                 "family_linears": {f: len(v) for f, v in sl.fams.items()}, "timings": times}
        return {"frame": _frame(rows, {}), "attrs": attrs}

    out = cached_or_compute(cache, "sensitivity", parts, compute)
    df = out["frame"]
    df.attrs.clear()
    df.attrs.update(out["attrs"])
    if slice_name is not None:
        df.attrs["provenance"] = named_slice(df.attrs["provenance"], slice_name)
    return df


# --- reading the frame ----------------------------------------------------------------------

def check_frame(frame) -> None:
    missing = [c for c in ("layer", "family", "mode", "kl") if c not in getattr(frame, "columns", [])]
    if missing:
        raise AwqnbError(f"not a sensitivity frame (missing {', '.join(missing)}); pass awqnb.analysis.sensitivity.sensitivity(...).")


def rank(frame, by: str = "kl", mode: str = "only"):
    """The rows of one mode, most sensitive first, with a `rank` column (1 = most). 'only': larger
    kl / ppl / dppl / mse = more sensitive; 'except': lower kl / ppl (keeping the family FP
    recovers more), larger dppl."""
    check_frame(frame)
    if by not in frame.columns:
        raise AwqnbError(f"cannot rank by {by!r}; use one of kl, ppl, dppl, mse.")
    sub = frame[frame["mode"] == mode]
    if sub.empty:
        raise AwqnbError(f"the frame has no {mode!r} rows (modes: {sorted(set(frame['mode']))}).")
    asc = mode == "except" and by in ("kl", "ppl")
    out = sub.sort_values([by, "layer"], ascending=[asc, True], kind="stable").reset_index(drop=True)
    out["rank"] = range(1, len(out) + 1)
    out.attrs.update(frame.attrs)
    return out


def most_sensitive_layer(frame) -> int:
    """The layer with the largest 'only' KL summed over its families."""
    check_frame(frame)
    sub = frame[frame["mode"] == "only"]
    if sub.empty:
        raise AwqnbError("the frame has no 'only' rows; compute it with modes including 'only'.")
    s = sub.groupby("layer")["kl"].sum()
    return int(s.idxmax())
