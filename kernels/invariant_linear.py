"""Batch-invariant linear on CPU at (nearly) no cost, when the BLAS allows it.

MKL's sgemm on this class of machine computes rows in blocks of 4; a leftover of 1-3 rows
(M = 1 is even sent to gemv) goes through other kernels that round differently. Measured:
with M = 5..7 or 9..11, the rows past the last full block differ from the same rows computed
alone. Padding M up to a multiple of ``ROW_BLOCK`` leaves no leftover, and then every row's
result is independent of the batch — but that is a property of one BLAS build, not a
guarantee. The
engine therefore *proves* it for each weight shape at start-up with ``rows_invariant`` and, if
the proof fails, *imposes* invariance with the tiled path in ``kernels.matmul`` instead.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

ROW_BLOCK = 4
_PROBE_ROWS = (1, 2, 3, 5, 6, 7, 9, 11, 13, 18, 31, 64, 129)


def padded_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` with the rows padded up to a multiple of ``ROW_BLOCK`` (sliced back)."""
    rows = x.shape[0]
    if x.dim() == 2 and rows % ROW_BLOCK:
        padded = x.new_zeros(rows + ROW_BLOCK - rows % ROW_BLOCK, x.shape[1])
        padded[:rows] = x
        return F.linear(padded, weight, bias)[:rows]
    return F.linear(x, weight, bias)


@functools.lru_cache(maxsize=64)
def rows_invariant(in_features: int, out_features: int, dtype: torch.dtype, threads: int) -> bool:
    """Check that ``padded_linear``'s rows do not depend on the batch for this shape.

    Every row of batches of several sizes must be bitwise equal to the same row computed
    alone. ``threads`` is part of the cache key because the BLAS
    may partition work differently with another thread count.
    """
    assert threads == torch.get_num_threads()
    gen = torch.Generator().manual_seed(1234)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    x = torch.randn(max(_PROBE_ROWS), in_features, generator=gen).to(dtype)
    alone = torch.cat([padded_linear(x[i : i + 1], weight) for i in range(len(x))])
    return all(torch.equal(padded_linear(x[:rows], weight), alone[:rows]) for rows in _PROBE_ROWS)
