"""Tensor-parallel context: who this rank is and how its collectives reduce.

Passed explicitly to every shard-aware layer (no global state). With ``size == 1`` every
collective is the identity, so the single-process engine pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division, or a ValueError naming the sizes (TP divisibility is checked here)."""
    if numerator % denominator != 0:
        raise ValueError(f"{what}={numerator} is not divisible by tp_size={denominator}")
    return numerator // denominator


@dataclass
class TPContext:
    """This rank's place in the TP group and the reduction it uses.

    ``ordered_all_reduce``: every rank sums the shards in rank order 0..size-1 (all-gather then
    an ordered sum), so the result is bitwise identical on every rank and every run.
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    ordered_all_reduce: bool = True

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        import torch.distributed as dist

        if not self.ordered_all_reduce:
            dist.all_reduce(x, group=self.group)
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's shard along the last dim, in rank order."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
