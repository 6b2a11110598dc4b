"""RMSNorm with HF Llama semantics (normalize in fp32, scale in the input dtype)."""

from __future__ import annotations

import torch
from torch import nn

from engine_core.layers.elementwise import TORCH, Elementwise
from engine_core.layers.sharded import WeightOwner


class RMSNorm(WeightOwner):
    def __init__(self, dim: int, eps: float, elementwise: Elementwise = TORCH):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.elementwise = elementwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.elementwise.rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, self(x + delta))``: the residual add and the norm after it."""
        return self.elementwise.add_rms_norm(x, delta, self.weight, self.eps)

    def full_shape(self, leaf, shard_id=None):
        return tuple(self.weight.shape)

    def shard_target(self, leaf, full, shard_id=None):
        return self.weight, full
