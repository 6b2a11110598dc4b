"""Tensor-parallel linear layers.

Each layer owns one shard of a HF weight and knows how to cut that shard out of the full HF
tensor (``shard_target``), which is the single weight-ingest path for checkpoint load and refit.
Collectives happen only in ``RowParallelLinear`` (all-reduce of partial sums).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.layers.sharded import WeightOwner
from engine_core.parallel import TPContext, divide

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _empty_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ShardedLinear(WeightOwner):
    """Base: ``y = x @ W.T + b`` on this rank's shard; subclasses define the cut."""

    def __init__(self, in_local: int, out_local: int, bias: bool, tp: TPContext, fn: LinearFn):
        super().__init__()
        self.tp = tp
        self.fn = fn
        self.weight = _empty_param(out_local, in_local)
        self.bias = _empty_param(out_local) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight, self.bias)

    def _hf_shape(self, leaf: str, rows: int, cols: int) -> tuple[int, ...]:
        return (rows, cols) if leaf == "weight" else (rows,)


def _rank_slice(full: torch.Tensor, dim: int, tp: TPContext, what: str) -> torch.Tensor:
    size = divide(full.shape[dim], tp.size, what)
    return full.narrow(dim, tp.rank * size, size)


class ColumnParallelLinear(ShardedLinear):
    """Output features split across ranks; no communication."""

    def __init__(self, in_f: int, out_f: int, bias: bool, tp: TPContext, fn: LinearFn = F.linear):
        super().__init__(in_f, divide(out_f, tp.size, "output features"), bias, tp, fn)

    def full_shape(self, leaf, shard_id=None):
        return self._hf_shape(leaf, self.weight.shape[0] * self.tp.size, self.weight.shape[1])

    def shard_target(self, leaf, full, shard_id=None):
        return getattr(self, leaf), _rank_slice(full, 0, self.tp, f"{leaf} rows")


class MergedColumnParallelLinear(ShardedLinear):
    """Several column-parallel outputs (gate, up) fused; HF gives each as its own tensor."""

    def __init__(
        self, in_f: int, outs: list[int], bias: bool, tp: TPContext, fn: LinearFn = F.linear
    ):
        self.local_outs = [divide(o, tp.size, "merged output features") for o in outs]
        self.full_outs = tuple(outs)
        super().__init__(in_f, sum(self.local_outs), bias, tp, fn)

    def fused_rows(self) -> tuple[int, ...]:
        return self.full_outs

    def shard_ids(self) -> tuple[object, ...]:
        return tuple(range(len(self.local_outs)))

    def shard_view(self, leaf, shard_id=None):
        if shard_id is None:
            return getattr(self, leaf)
        index = int(shard_id)  # type: ignore[arg-type]
        return getattr(self, leaf).narrow(0, sum(self.local_outs[:index]), self.local_outs[index])

    def full_shape(self, leaf, shard_id=None):
        return self._hf_shape(leaf, self.full_outs[int(shard_id)], self.weight.shape[1])  # type: ignore[arg-type]

    def shard_target(self, leaf, full, shard_id=None):
        return self.shard_view(leaf, shard_id), _rank_slice(full, 0, self.tp, f"{leaf} rows")


class QKVParallelLinear(ShardedLinear):
    """Fused q/k/v projection. Query heads split across ranks; KV heads split too, or replicated
    (each rank keeps the KV head its query heads use) when there are fewer KV heads than ranks."""

    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TPContext,
        fn: LinearFn = F.linear,
    ):
        self.head_dim = head_dim
        self.local_heads = divide(num_heads, tp.size, "num_attention_heads")
        if num_kv_heads >= tp.size:
            self.local_kv_heads = divide(num_kv_heads, tp.size, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            divide(tp.size, num_kv_heads, "tp_size over num_key_value_heads")
            self.local_kv_heads = 1
            self.kv_replicas = tp.size // num_kv_heads
        q, kv = self.local_heads * head_dim, self.local_kv_heads * head_dim
        self.sizes = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
        self.full_rows = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
        super().__init__(hidden, q + 2 * kv, bias, tp, fn)

    def fused_rows(self) -> tuple[int, ...]:
        return self.full_rows

    def shard_ids(self) -> tuple[object, ...]:
        return ("q", "k", "v")

    def shard_view(self, leaf, shard_id=None):
        if shard_id is None:
            return getattr(self, leaf)
        offset, size = self.sizes[str(shard_id)]
        return getattr(self, leaf).narrow(0, offset, size)

    def full_shape(self, leaf, shard_id=None):
        rows = self.full_rows[self.shard_ids().index(shard_id)]
        return self._hf_shape(leaf, rows, self.weight.shape[1])

    def shard_target(self, leaf, full, shard_id=None):
        size = self.sizes[str(shard_id)][1]
        dst = self.shard_view(leaf, shard_id)
        if shard_id == "q":
            return dst, full.narrow(0, self.tp.rank * size, size)
        kv_rank = self.tp.rank // self.kv_replicas
        return dst, full.narrow(0, kv_rank * size, size)


class RowParallelLinear(ShardedLinear):
    """Input features split across ranks; partial outputs summed by the TP all-reduce."""

    def __init__(self, in_f: int, out_f: int, bias: bool, tp: TPContext, fn: LinearFn = F.linear):
        super().__init__(divide(in_f, tp.size, "input features"), out_f, bias, tp, fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.fn(x, self.weight, None))
        # Bias after the reduction so it is added once, not tp_size times.
        return y if self.bias is None else y + self.bias

    def full_shape(self, leaf, shard_id=None):
        return self._hf_shape(leaf, self.weight.shape[0], self.weight.shape[1] * self.tp.size)

    def shard_target(self, leaf, full, shard_id=None):
        if leaf == "bias":
            return self.bias, full
        return self.weight, _rank_slice(full, 1, self.tp, "weight columns")
