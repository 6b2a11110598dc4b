"""Tensor-parallel context: who this rank is and how its collectives reduce.

Passed explicitly to every shard-aware layer (no global state). With ``size == 1`` every
collective is the identity, so the single-process engine pays nothing. The group is a
standalone ProcessGroup (own store, outside any default world), so its methods are called
directly; backends are gloo on CPU and NCCL on CUDA.
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

    ``ordered_all_reduce``: every rank gathers all shards and sums them in rank order
    0..size-1, so the result is bitwise identical on every rank and every run (the native
    all-reduce may sum in any order, e.g. ring order that differs per rank).
    """

    rank: int = 0
    size: int = 1
    group: Any = None  # torch ProcessGroup
    ordered_all_reduce: bool = True

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        if not self.ordered_all_reduce:
            x = x.contiguous()
            self.group.allreduce([x]).wait()
            return x
        parts = self._all_gather(x)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's shard along the last dim, in rank order."""
        if self.size == 1:
            return x
        return torch.cat(self._all_gather(x), dim=-1)

    def _all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x]).wait()
        return parts


def check_tp_divisibility(num_heads: int, num_kv_heads: int, intermediate: int, tp_size: int):
    """Raise ValueError naming the sizes when the model cannot be split ``tp_size`` ways."""
    divide(num_heads, tp_size, "num_attention_heads")
    divide(intermediate, tp_size, "intermediate_size")
    if num_kv_heads >= tp_size:
        divide(num_kv_heads, tp_size, "num_key_value_heads")
    elif tp_size % num_kv_heads != 0:
        raise ValueError(
            f"tp_size={tp_size} is not a multiple of num_key_value_heads={num_kv_heads} "
            "(KV heads are replicated only when they divide tp_size evenly)"
        )
