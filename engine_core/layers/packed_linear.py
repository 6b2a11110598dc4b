"""The engine's CPU matmul: every linear weight packed once into the C kernel's panel layout
(``kernels.cpu_linear``) and reused by every step until the weight changes.

The parameters stay the canonical copy (checkpoint load, refits, checksums and
``get_weights_by_name`` read and write them); the packs are derived from them. The rank repacks
after everything that writes parameters -- load, refit commit, resume from release -- and drops
the packs when the weights are released (``execution.rank``). As a safety net each pack
remembers which storage and version of its weight it was made from, and a forward on a weight
that changed any other way repacks it first, so a stale pack is never used.

Packs cost one more copy of the matrices (fp32 or bf16 as stored, a quarter of fp32 for int8);
the default KV budget counts it (``kv_budget``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from engine_core.layers.embed_head import ParallelLMHead
from engine_core.layers.linear import ShardedLinear
from kernels import cpu_linear
from kernels.huge_pages import HugePageArena


@dataclass
class _Pack:
    weight: torch.Tensor  # held so the id it is filed under stays this weight's
    made_from: tuple
    packed: cpu_linear.PackedWeight


def _identity(weight: torch.Tensor) -> tuple:
    """Changes whenever the weight's values may have: rebinding (``param.data = ...``) gives a
    new storage, writes through the parameter or its views bump its version."""
    return (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))


class PackedLinear:
    """A ``LinearFn`` on packed weights, the kernel at every row count: since it prefetches
    the next panel it beats the BLAS at prefill sizes too (139-178 vs 97-140 GFLOP/s at 256 to
    2048 rows on the default model's shapes, docs/PERFORMANCE.md), and it is row-invariant by
    construction (deterministic mode needs that; the BLAS is not)."""

    def __init__(self, int8: bool = False) -> None:
        # Packs live on huge pages: a decode step streams them whole, and at 1-8 rows that
        # is 5-13 % faster than on 4 KiB pages (kernels/huge_pages.py says why).
        self.arena = HugePageArena()
        # Opt-in (weight_dtype="int8"): the packs hold int8 weights with per-output scales,
        # the parameters stay in the compute dtype (loads, refits, checksums unchanged).
        pack = cpu_linear.pack_int8 if int8 else cpu_linear.pack
        self.pack = functools.partial(pack, empty=self.arena.empty)
        self._packs: dict[int, _Pack] = {}
        # Bumped whenever a pack is made, remade or dropped: a cheap "may any pack have
        # changed" for callers that hold pack addresses (the one-call layers).
        self.generation = 0

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return cpu_linear.packed_linear(x, self.packed(weight), bias)

    def packed(self, weight: torch.Tensor) -> cpu_linear.PackedWeight:
        """``weight``'s pack, made (again) first if the weight changed since it was packed."""
        entry = self._packs.get(id(weight))
        now = _identity(weight)
        if entry is not None and entry.made_from == now:
            return entry.packed
        if entry is not None and entry.made_from[2:] == now[2:]:
            # Same shape and dtype (every refit): repack in place, so refits allocate nothing.
            entry.packed = self.pack(weight, into=entry.packed)
            entry.made_from = now
            self.generation += 1
            return entry.packed
        self._packs.pop(id(weight), None)  # free the stale pack before making the new one
        entry = _Pack(weight, now, self.pack(weight))
        self._packs[id(weight)] = entry
        self.generation += 1
        return entry.packed

    def refresh(self, model: torch.nn.Module) -> None:
        """Pack (again) every weight of ``model``'s layers that use this op; after a load, a
        refit commit or a resume, so the next step does not pay for it."""
        for module in model.modules():
            if isinstance(module, ShardedLinear) and module.fn is self:
                self.packed(module.weight)
            elif isinstance(module, ParallelLMHead) and module.fn is self:
                self.packed(module.head_weight)

    def release(self) -> int:
        """Drop every pack (the weights are being released); returns the bytes freed."""
        freed = self.nbytes
        self._packs.clear()
        self.arena.reset()  # the chunks are unmapped as their last pack goes
        self.generation += 1
        return freed

    @property
    def nbytes(self) -> int:
        return sum(entry.packed.nbytes for entry in self._packs.values())
