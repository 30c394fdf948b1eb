"""An exponential moving average of a module's weights, which the trainer keeps beside a module."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An exponential moving average copy of a module's parameters (buffers are copied)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = copy.deepcopy(module).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)
