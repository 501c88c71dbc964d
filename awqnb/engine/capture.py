"""Forward hooks as context managers (always removed, even when the forward raises) and
streaming statistics, so activations need not all be kept in memory."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook to end a forward pass early once what is needed was captured."""


@contextlib.contextmanager
def hooks(handles_factory: Callable[[], list]) -> Iterator[None]:
    """Register hooks via `handles_factory()` and remove every one of them on exit."""
    handles = []
    try:
        handles.extend(handles_factory())
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_inputs(modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None]):
    """Call `sink(name, x)` with the first positional input of each module on every forward."""

    def make(name):
        def hook(_mod, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            sink(name, x)

        return hook

    with hooks(lambda: [m.register_forward_pre_hook(make(n), with_kwargs=True) for n, m in modules.items()]):
        yield


def block_output(out) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers 5) or a tuple whose first item is it."""
    return out[0] if isinstance(out, (tuple, list)) else out


class ChannelStats:
    """Streaming per-channel statistics of activations `[..., c]`: E|x|, E[x], E[x²], count."""

    def __init__(self):
        self.n = 0
        self.abs_sum = None
        self.sum = None
        self.sq_sum = None

    def update(self, x: torch.Tensor) -> None:
        # sums accumulate in float64 without a float64 copy of the chunk (memory at 8B scale)
        x = x.detach().reshape(-1, x.shape[-1])
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        if self.sum is None:
            c = x.shape[-1]
            self.abs_sum = torch.zeros(c, dtype=torch.float64, device=x.device)
            self.sum = torch.zeros_like(self.abs_sum)
            self.sq_sum = torch.zeros_like(self.abs_sum)
        self.n += x.shape[0]
        f64 = torch.float64
        self.abs_sum += x.abs().sum(0, dtype=f64)
        self.sum += x.sum(0, dtype=f64)
        self.sq_sum += x.square().sum(0, dtype=f64)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / self.n).float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / self.n).float()

    @property
    def mean_sq(self) -> torch.Tensor:
        return (self.sq_sum / self.n).float()

    @property
    def var(self) -> torch.Tensor:
        m = self.sum / self.n
        return (self.sq_sum / self.n - m * m).clamp(min=0).float()
