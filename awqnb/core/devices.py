"""Timing on a device: one clock that waits for the device's queued work first."""
from __future__ import annotations

import time

import torch


def sync(device) -> float:
    """`time.perf_counter()` after `device` (a torch.device, a name, or a module: its parameters'
    device) has finished its queued work; CPU work is synchronous already."""
    if isinstance(device, torch.nn.Module):
        p = next(device.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
