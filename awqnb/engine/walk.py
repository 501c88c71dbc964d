"""The block engine: the one walk of a decoder model, block by block, over calibration data.

    token ids [b, T] per chunk
        │  embedding + rotary (only the modules outside the blocks are onloaded); every block's
        │  forward is swapped for a catcher that records its keyword arguments and passes the
        ▼  hidden states through, so no block's weights are touched
    h₀ per chunk, kwargs[chunk][block]
        │
        ▼  for j in 0 … last:
    ┌─ onload block j → compute device (and compute dtype)
    │     yield BlockStep(j, block, hidden, kwargs)   ← the quantizer / diagnostics work here:
    │         step.forward(sink, points)  runs the block on every chunk, hooks on its linears
    │         step.next_hidden = …        what block j+1 sees (FP outputs, or None → rerun the
    │                                      block as it is now, i.e. quantized propagation)
    └─ offload block j → its home device (original dtypes, except parameters marked fp32)

The model itself may live anywhere (typically the CPU): peak accelerator memory is one block plus
the activations of the calibration set at one point, independent of the number of blocks.
`offload_activations` keeps those activations in pinned CPU memory, each chunk moved to the
device only while it is computed. The keyword tensors (rotary cos/sin, masks) are cast to the
compute dtype once per chunk and shared by every block that received the same tensor from the
model (one copy per layer type, not per block); a block's kwargs are dropped once it is done.
`outputs()` runs every block and returns the last one's outputs (streamed evaluation), dropping
each input chunk as soon as its output exists.
"""
from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from awqnb.core.dtypes import fp32_names, parse_dtype
from awqnb.core.errors import AwqnbError
from awqnb.engine.capture import StopForward, block_output, hooks
from awqnb.model.arch import ArchSpec, blocks, get_module, resolve_spec
from awqnb.model.data import calibration_samples

log = logging.getLogger(__name__)

DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "cache_position", "output_attentions",
               "hidden_states")


def check_compute_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a compute dtype the device cannot run, with what to use instead."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise AwqnbError(f"{device} cannot compute in bfloat16 (pre-Ampere GPU); use --dtype float16 or float32.")
    if device.type == "mps" and dtype == torch.float64:
        raise AwqnbError("the MPS device has no float64; use --dtype float32.")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's block weights (its storage dtype)."""
    spec = resolve_spec(model)
    for p in blocks(model, spec).parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def stack_chunks(samples: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Consecutive equal-length 1-D samples stacked into `[b, T]` chunks of at most `batch` (CPU)."""
    out, cur = [], []
    for s in samples:
        s = s.reshape(-1)
        if cur and (len(cur) == batch or cur[0].numel() != s.numel()):
            out.append(torch.stack(cur))
            cur = []
        cur.append(s)
    if cur:
        out.append(torch.stack(cur))
    return out


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def oom_message(what: str, module: nn.Module, device) -> str:
    """One line for a CUDA out-of-memory error: what was running, the block's size, the ways out."""
    return (f"out of memory on {device} while {what} ({_nbytes(module) / 1e9:.2f} GB of weights); "
            "pass offload_activations=True (CLI --offload-activations), a smaller --calib-batch-size "
            "or fewer calibration samples, or free the device.")


def _target_dtype(name: str, t: torch.Tensor, dtype, keep: set) -> torch.dtype:
    """The dtype a tensor takes on the compute device: `dtype` for floating tensors, except those
    marked fp32 and RoPE frequencies (which stay float32)."""
    if dtype is not None and t.is_floating_point() and name not in keep and not name.endswith("inv_freq"):
        return dtype
    return t.dtype


def _move(module: nn.Module, device, dtype, home: dict | None = None, ready: dict | None = None) -> None:
    keep = fp32_names(module)
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if home is not None:
            dev, dt = home[name]
            if name in keep:
                dt = torch.float32
        else:
            dev, dt = device, _target_dtype(name, p, dtype, keep)
        if ready is not None and name in ready:
            p.data = ready[name]
        elif p.device != dev or p.dtype != dt:
            p.data = p.data.to(dev, dt)


class Prefetch:
    """Block j+1's tensors made ready on the compute device while block j is worked on: a worker
    thread pins each tensor and copies it on a side stream (CUDA), so the copy overlaps the
    search instead of stalling it. `take()` hands over the tensors whose source is still the one
    copied (same storage); one replaced meanwhile (`p.data = …`) is moved as usual. The contract:
    a consumer of step j changes block j alone (the quantizers' folds and roundings stay inside
    the block), never block j+1's weights in place.
    With `writes`, a finished block goes home the same way (`send_home`); `wait_home()` joins it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="awqnb-prefetch")
        self.pending: Future | None = None
        self.home: Future | None = None

    def _load(self, module: nn.Module, dtype) -> tuple[dict, object]:
        keep = fp32_names(module)
        out = {}
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                dt = _target_dtype(name, t, dtype, keep)
                if t.device == self.device and t.dtype == dt:
                    continue
                src = t.data  # held until take(): its storage cannot be reused meanwhile
                if self.cuda and src.device.type == "cpu":
                    g = src.pin_memory().to(self.device, non_blocking=True)  # pinned: a true async copy
                    ready = g.to(dt)
                else:
                    ready = src.to(self.device, dt)
                out[name] = (src, ready)
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(self.stream)
        return out, event

    def start(self, module: nn.Module, dtype) -> None:
        self.pending = self.pool.submit(self._load, module, dtype)

    def take(self, module: nn.Module) -> dict:
        """The prefetched tensors still valid for `module` (name → device tensor)."""
        if self.pending is None:
            return {}
        fut, self.pending = self.pending, None
        out, event = fut.result()
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        now = dict(list(module.named_parameters()) + list(module.named_buffers()))
        ready = {}
        for name, (src, t) in out.items():
            cur = now.get(name)
            if cur is not None and cur.data_ptr() == src.data_ptr() and cur.dtype == src.dtype \
                    and cur.device == src.device and cur.shape == src.shape:
                if self.cuda:
                    t.record_stream(torch.cuda.current_stream(self.device))  # freed only after its last use
                ready[name] = t
        return ready

    def _send(self, module: nn.Module, home: dict, event) -> None:
        keep = fp32_names(module)
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            if event is not None:
                self.stream.wait_event(event)
            moves = []
            for name, p in list(module.named_parameters()) + list(module.named_buffers()):
                dev, dt = home[name]
                if name in keep:
                    dt = torch.float32
                if p.device == dev and p.dtype == dt:
                    continue
                src = p.data.to(dt)
                if self.cuda and dev.type == "cpu" and src.device.type == "cuda":
                    pinned = torch.empty(src.shape, dtype=dt, pin_memory=True)
                    pinned.copy_(src, non_blocking=True)
                    moves.append((p, pinned, dev))
                else:
                    moves.append((p, src.to(dev), None))
            if self.cuda:
                self.stream.synchronize()
            for p, t, dev in moves:
                p.data = t.to(dev, copy=True) if dev is not None else t  # pageable, like the model's own

    def send_home(self, module: nn.Module, home: dict) -> None:
        """Move `module` home in the background, after the work queued so far on this stream."""
        self.wait_home()
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self.home = self.pool.submit(self._send, module, home, event)

    def wait_home(self) -> None:
        if self.home is not None:
            fut, self.home = self.home, None
            fut.result()

    def close(self) -> None:
        for fut in (self.pending, self.home):
            if fut is not None:
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 — the walk's own error is the one to report
                    pass
        self.pending = self.home = None
        self.pool.shutdown(wait=True)


@contextlib.contextmanager
def onloaded(module: nn.Module, device, dtype: torch.dtype | None = None, writes: bool = False,
             prefetch: Prefetch | None = None):
    """Move `module` to `device` (floating tensors to `dtype` when given) for the duration; then
    move every parameter and buffer back where it was, in its original dtype (float32 for
    parameters marked with `mark_fp32`). A cast is lossy: unless the caller `writes` the block
    (quantization, whose new weights come home cast back), the original tensors are put back.
    prefetch: tensors already copied there (`Prefetch.take`); with `writes`, the block also goes
    home in the background (the next `onloaded` with the same prefetch, or its close, joins it)."""
    device = torch.device(device)
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    home = {name: (t.device, t.dtype) for name, t in tensors}
    originals = {} if writes or dtype is None else {
        name: t.data for name, t in tensors if t.is_floating_point() and t.dtype != dtype}
    back_later = False
    try:
        try:
            _move(module, device, dtype, ready=prefetch.take(module) if prefetch is not None else None)
        except torch.OutOfMemoryError as e:
            _move(module, None, None, home)
            raise AwqnbError(oom_message("loading a block", module, device)) from e
        yield module
        back_later = prefetch is not None and writes
    finally:
        for name, t in tensors:
            if name in originals:
                t.data = originals[name]
        if back_later:
            prefetch.send_home(module, home)
        else:
            _move(module, None, None, home)


@dataclass
class BlockStep:
    """One decoder block on the compute device, with the calibration activations that enter it.

    hidden: `[b, T, H]` per chunk (on `engine.act_device`); kwargs: per chunk, what the model
    passes to this block (position embeddings, masks). Set `next_hidden` to decide what the next
    block sees; left None, the engine runs the block as it is after the consumer is done.
    """

    engine: "BlockEngine"
    index: int
    block: nn.Module
    hidden: list[torch.Tensor]
    kwargs: list[dict]
    next_hidden: list[torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.engine.device, non_blocking=True)

    @torch.no_grad()
    def forward(self, sink: Callable | None = None, points: Iterable[str] = (), with_output: bool = False,
                chunks: Iterable[int] | None = None, keep_outputs: bool = True) -> list[torch.Tensor]:
        """Run the block on each chunk; return its outputs (on the activation device).

        sink(name, x) — or sink(name, x, y) with `with_output` — is called with the input (and
        output) of every linear/module named in `points` (paths relative to the block)."""
        mods = {p: get_module(self.block, p) for p in points}

        def make(name):
            if with_output:
                return lambda _m, args, kw, out: sink(name, args[0] if args else kw.get("input"), out)

            def pre(_m, args, kw):
                sink(name, args[0] if args else kw.get("hidden_states", kw.get("input")))

            return pre

        def register():
            if with_output:
                return [m.register_forward_hook(make(n), with_kwargs=True) for n, m in mods.items()]
            return [m.register_forward_pre_hook(make(n), with_kwargs=True) for n, m in mods.items()]

        outs = []
        idx = range(len(self.hidden)) if chunks is None else chunks
        with hooks(register if mods else list):
            for i in idx:
                y = block_output(self.block(self.to_device(self.hidden[i]), **self.kwargs[i]))
                if keep_outputs:
                    outs.append(self.engine.stash(y))
        return outs


class BlockEngine:
    """Walks `model`'s decoder blocks over calibration chunks (see the module docstring).

    device: where blocks are computed (default: the model's device). dtype: compute dtype
    (None: the model's own). batch_size: calibration samples per chunk. offload_activations:
    keep activations in pinned CPU memory between uses.
    chunks / masks: ready-made `[b, T]` token-id batches (then `calibration` is None) and their
    attention masks (None: no padding), passed to the model as it would get them (evaluation).
    keep_dtypes: cast nothing (weights, hidden states, kwargs keep the dtypes the model gives
    them), so a block computes exactly what the model's own forward computes.
    writes: the walk changes the blocks' weights (quantization): they come home cast back from the
    compute dtype; otherwise a cast walk leaves the model's tensors exactly as they were.
    prefetch: copy block j+1 to the device while block j is worked on (and, with `writes`, send
    block j home in the background); None = on when the device is a GPU.
    """

    def __init__(self, model: nn.Module, calibration, device=None, dtype=None, batch_size: int = 16,
                 offload_activations: bool = False, max_samples: int | None = None, *,
                 chunks: list[torch.Tensor] | None = None, masks: list[torch.Tensor | None] | None = None,
                 keep_dtypes: bool = False, writes: bool = False, prefetch: bool | None = None):
        self.model = model
        self.writes = bool(writes)
        self.spec: ArchSpec = resolve_spec(model)
        self.blocks = blocks(model, self.spec)
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.keep_dtypes = bool(keep_dtypes)
        self.dtype = model_dtype(model) if keep_dtypes else (parse_dtype(dtype) or model_dtype(model))
        check_compute_dtype(self.device, self.dtype)
        self.offload = bool(offload_activations) and self.device.type != "cpu"
        self.act_device = torch.device("cpu") if self.offload else self.device
        if chunks is not None:
            if calibration is not None:
                raise AwqnbError("give the block engine calibration samples or ready-made chunks, not both.")
            self.chunks = [c.reshape(-1, c.shape[-1]) for c in chunks]
        else:
            samples = calibration_samples(calibration, "the block engine")
            if max_samples is not None:
                samples = samples[:max_samples]
            if batch_size < 1:
                raise AwqnbError(f"batch_size={batch_size} must be at least 1.")
            self.chunks = stack_chunks(samples, batch_size)
        self.masks = list(masks) if masks is not None else [None] * len(self.chunks)
        if len(self.masks) != len(self.chunks):
            raise AwqnbError(f"{len(self.masks)} attention masks for {len(self.chunks)} chunks; give one per chunk.")
        self.n_tokens = sum(c.numel() for c in self.chunks)
        self.times = {"onload_s": 0.0, "propagate_s": 0.0}  # seconds moving blocks / running them on
        self.on_block: Callable[[int], None] | None = None  # called after each block the walk leaves
        self.prefetch = (self.device.type == "cuda") if prefetch is None else bool(prefetch)
        self._prefetch: Prefetch | None = None

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # -- where tensors and weights live ------------------------------------------------------
    def stash(self, x: torch.Tensor) -> torch.Tensor:
        """An activation kept between uses: on the device, or pinned on the CPU when offloading."""
        x = x.detach()
        if not self.offload:
            return x
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        out.copy_(x, non_blocking=True)
        return out

    def onload(self, module: nn.Module, cast: bool = True, prefetch: "Prefetch | None" = None):
        """`onloaded(module, self.device, self.dtype if cast else None, self.writes)` (no cast with keep_dtypes)."""
        return onloaded(module, self.device, self._dtype(cast), self.writes, prefetch)

    def _dtype(self, cast: bool = True):
        return self.dtype if cast and not self.keep_dtypes else None

    def _outer_modules(self) -> list[nn.Module]:
        """The modules of the blocks' parent other than the blocks (embedding, rotary, final norm)."""
        parent_path, _, attr = self.spec.blocks_path.rpartition(".")
        parent = get_module(self.model, parent_path) if parent_path else self.model
        return [m for n, m in parent.named_children() if n != attr]

    # -- the walk -----------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self) -> tuple[list[torch.Tensor], list[list[dict]]]:
        """Block 0's input per chunk and every block's kwargs per chunk, without running a block."""
        n = len(self.blocks)
        hidden: list[torch.Tensor] = []
        kwargs: list[list[dict]] = []
        state: dict = {}

        def catcher(j):
            def fwd(*args, **kw):
                h = args[0] if args else kw["hidden_states"]
                if j == 0:
                    state["h"] = h
                state["kw"][j] = {k: v for k, v in kw.items() if k not in DROP_KWARGS}
                if j == n - 1:
                    raise StopForward
                return h

            return fwd

        with contextlib.ExitStack() as stack:
            for m in self._outer_modules():
                stack.enter_context(self.onload(m, cast=False))
            for j, b in enumerate(self.blocks):
                b.forward = catcher(j)  # instance attribute: shadows the class method
            try:
                for ids, mask in zip(self.chunks, self.masks):
                    state["kw"] = [None] * n
                    try:
                        self.model(input_ids=ids.to(self.device), use_cache=False,
                                   **({} if mask is None else {"attention_mask": mask.to(self.device)}))
                    except StopForward:
                        pass
                    h = state.pop("h")
                    hidden.append(self.stash(h if self.keep_dtypes else h.to(self.dtype)))
                    cast: dict = {}  # one cast per tensor of this chunk, shared by the blocks that got it
                    kwargs.append([self._kw_dtype(k, cast) for k in state.pop("kw")])
            finally:
                for b in self.blocks:
                    b.__dict__.pop("forward", None)
        return hidden, kwargs

    def _kw_dtype(self, kw: dict, memo: dict) -> dict:
        """Floating kwargs (rotary cos/sin, additive masks) in the compute dtype. The model hands
        every block (of a layer type) the same tensors: `memo` (id → (original, cast)) makes one
        cast of each, shared, instead of one copy per block; the original is held so its id
        cannot be reused while the memo lives."""
        def cast(v):
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not self.keep_dtypes:
                if id(v) not in memo:
                    memo[id(v)] = (v, v.to(self.dtype))
                return memo[id(v)][1]
            if isinstance(v, tuple):
                return tuple(cast(x) for x in v)
            return v

        return {k: cast(v) for k, v in kw.items()}

    def walk(self, layers: Iterable[int] | None = None) -> Iterator[BlockStep]:
        """Yield a `BlockStep` for each block in `layers` (all when None), in order; blocks in
        between are run by the engine; the walk ends after the last requested block."""
        n = len(self.blocks)
        want = set(range(n)) if layers is None else {int(l) % n for l in layers}
        if not want:
            return
        last = max(want)
        hidden, kwargs = self.capture()
        per_block = [[kw[j] for kw in kwargs] for j in range(n)]
        del kwargs  # else it keeps every block's kwargs alive after per_block[j] is dropped
        owned = True  # `hidden` is the engine's own list (not one a consumer set and may keep)
        pre = Prefetch(self.device) if self.prefetch else None
        self._prefetch = pre
        try:
            for j in range(last + 1):
                block = self.blocks[j]
                t = self._sync()
                with self.onload(block, prefetch=pre):
                    if pre is not None and j < last:
                        pre.start(self.blocks[j + 1], self._dtype())
                    self.times["onload_s"] += self._sync() - t
                    step = BlockStep(self, j, block, hidden, per_block[j])
                    del hidden
                    try:
                        if j in want:
                            yield step
                        if j == last:
                            return
                        t = self._sync()
                        if step.next_hidden is not None:
                            hidden, owned = step.next_hidden, False
                        else:  # a block no consumer saw: its inputs go as its outputs come
                            hidden, owned = self._propagate(step, free_inputs=owned and j not in want), True
                        self.times["propagate_s"] += self._sync() - t
                    except torch.OutOfMemoryError as e:
                        raise AwqnbError(oom_message(f"computing block {j}", block, self.device)) from e
                    t = self._sync()
                self.times["onload_s"] += self._sync() - t  # the move back (queued, with prefetch and writes)
                per_block[j] = step = None
                if self.on_block is not None:
                    self.on_block(j)
        finally:
            self._prefetch = None
            if pre is not None:
                pre.close()

    @torch.no_grad()
    def _propagate(self, step: BlockStep, free_inputs: bool) -> list[torch.Tensor]:
        """`step.forward()`; with `free_inputs`, each input chunk is dropped from `step.hidden` once
        its output exists (peak: one set of activations plus a chunk, not two sets)."""
        if not free_inputs:
            return step.forward()
        outs = []
        for i in range(len(step.hidden)):
            outs.append(step.forward(chunks=[i])[0])
            step.hidden[i] = None
        return outs

    def outputs(self) -> list[torch.Tensor]:
        """The last block's output per chunk (on the activation device): every block run in turn,
        one on the device at a time, each input chunk dropped once its output exists."""
        out = None
        for step in self.walk([len(self.blocks) - 1]):
            t = self._sync()
            out = self._propagate(step, free_inputs=True)  # nothing else holds the last block's inputs
            self.times["propagate_s"] += self._sync() - t
        if self.on_block is not None:
            self.on_block(len(self.blocks) - 1)
        return out

    def run_blocks(self, indices: Iterable[int], hidden: list[torch.Tensor],
                   kwargs: list[list[dict]]) -> list[torch.Tensor]:
        """Run blocks `indices` in turn on `hidden` (each onloaded while it runs); kwargs[k] are
        the per-chunk kwargs of the k-th block run."""
        if self._prefetch is not None:
            self._prefetch.wait_home()  # a block sent home in the background may be one of these
        for j, kw in zip(indices, kwargs):
            with self.onload(self.blocks[j]):
                hidden = BlockStep(self, j, self.blocks[j], hidden, kw).forward()
        return hidden
