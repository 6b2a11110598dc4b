"""RMSNorm with HF Llama semantics (normalize in fp32, scale in the input dtype)."""

from __future__ import annotations

import torch
from torch import nn

from engine_core.layers.sharded import WeightOwner


class RMSNorm(WeightOwner):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def shard_target(self, leaf, full, shard_id=None):
        return self.weight, full
