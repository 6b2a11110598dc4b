"""Batch-invariant linear: what the CPU torch path and the Triton kernel (interpreter) guarantee
bitwise, on any x86_64 CPU, and the Triton kernel matches the reference.

Both paths issue one fixed-shape matmul per tile of rows: ``linear_ref`` a ``(tile_m, K) @
(K, N)`` ``torch.mm`` per 16-row tile, the Triton kernel a ``(BLOCK_M, BLOCK_K) @ (BLOCK_K,
BLOCK_N)`` ``tl.dot`` per program -- which the CPU interpreter hands to numpy's BLAS, always
with M = BLOCK_M (masked rows load as zeros). A BLAS is deterministic for one call shape, so a
row that sits at the same position inside its tile gets the same bits whatever the batch size,
the tile index and the partner rows: that is asserted unconditionally. Equality for a row at
*different* positions inside a tile also needs the BLAS to round every position alike, which
not every BLAS does (see ``kernel_test_utils``): those checks run only where a probe finds it.
"""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import numpy_dot_position_invariant, tile_rows_position_invariant

from kernels import batch_invariant_linear
from kernels.matmul import DEFAULT_TILE_M, linear_ref


@pytest.mark.parametrize("bias", [False, True])
def test_ref_matches_matmul(bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 19, 40, generator=gen)
    w = torch.randn(24, 40, generator=gen)
    b = torch.randn(24, generator=gen) if bias else None
    out = linear_ref(x, w, b)
    assert out.shape == (2, 19, 24) and out.dtype == x.dtype
    expect = x.double() @ w.double().T + (b.double() if bias else 0)
    torch.testing.assert_close(out.double(), expect, atol=1e-4, rtol=1e-5)
    assert torch.equal(batch_invariant_linear(x, w, b), out)  # CPU dispatch = torch path


SHAPES = [
    (576, 1536, torch.float32),
    (1536, 576, torch.float32),
    (576, 49152, torch.float32),
    (576, 1536, torch.bfloat16),
    (1536, 576, torch.bfloat16),
]


def _rows(k, n, dtype):
    gen = torch.Generator().manual_seed(k + n)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    x = torch.randn(64, k, generator=gen).to(dtype)
    return x, w


@pytest.mark.parametrize("k,n,dtype", SHAPES)
def test_ref_rows_bitwise_invariant_over_batch_sizes(k, n, dtype):
    """Row i of linear(x[:m]) is bitwise the same for m in 1..64 (its tile has the same shape
    and the row the same position in it; only the partners -- real rows or zero padding --
    change), and so is a row moved to another tile at the same offset with other partners."""
    x, w = _rows(k, n, dtype)
    full = linear_ref(x, w)
    # the lm-head shape is ~20 ms per tile: a subset of batch sizes keeps the test fast
    ms = range(1, 64) if n < 10000 else [1, 2, 3, 5, 8, 9, 15, 16, 17, 31, 33, 47, 63]
    for m in ms:
        assert torch.equal(linear_ref(x[:m], w), full[:m]), f"M={m}"
    t = DEFAULT_TILE_M
    for i in (0, 16, 32, 48):  # a lone row at offset 0 of its tile
        assert torch.equal(linear_ref(x[i : i + 1], w)[0], full[i]), f"lone row {i}"
    # rows 0..7 behind 1..3 whole tiles of other rows, and rows 40..47 (offsets 8..15) as the
    # second half of a tile led by other rows
    for lead in (1, 2, 3):
        out = linear_ref(torch.cat([x[64 - lead * t :].flip(0), x[:8]]), w)
        assert torch.equal(out[lead * t :], full[:8]), f"{lead} tiles ahead"
    out = linear_ref(torch.cat([x[8:16].flip(0), x[40:48], x[:5]]), w)
    assert torch.equal(out[8:16], full[40:48])


@pytest.mark.parametrize("k,n,dtype", SHAPES[:2] + SHAPES[3:])
def test_ref_rows_bitwise_invariant_across_tile_offsets_where_the_blas_is(k, n, dtype):
    """A lone row and rows shifted to every offset of a tile equal the full batch's -- which
    also needs torch's BLAS to round all positions of one (16, K) @ (K, N) mm alike."""
    if not tile_rows_position_invariant(linear_ref, DEFAULT_TILE_M, k, n, dtype):
        pytest.skip("this BLAS rounds rows of one fixed-shape mm by position")
    x, w = _rows(k, n, dtype)
    full = linear_ref(x, w)
    for i in (1, 7, 15, 30, 63):
        assert torch.equal(linear_ref(x[i : i + 1], w)[0], full[i]), f"lone row {i}"
    for off in range(1, DEFAULT_TILE_M):
        out = linear_ref(torch.cat([x[40 : 40 + off], x[:8]]), w)
        assert torch.equal(out[off:], full[:8]), f"offset {off}"


triton = pytest.importorskip("triton")
from kernels.matmul import BLOCK_K, BLOCK_M, BLOCK_N, linear_triton  # noqa: E402


@pytest.mark.parametrize("m,k,n,bias", [(5, 40, 72, True), (33, 70, 20, False), (1, 16, 64, True)])
def test_triton_matches_ref(m, k, n, bias):
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    out = linear_triton(x, w, b)
    assert out.shape == (m, n) and out.dtype == x.dtype
    torch.testing.assert_close(out, linear_ref(x, w, b), atol=1e-4, rtol=1e-5)


def test_triton_bf16_matches_ref():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 80, generator=gen).to(torch.bfloat16)
    w = (torch.randn(40, 80, generator=gen) * 0.1).to(torch.bfloat16)
    b = torch.randn(40, generator=gen).to(torch.bfloat16)
    out = linear_triton(x, w, b)
    assert out.dtype == torch.bfloat16
    expect = x.double() @ w.double().T + b.double()
    torch.testing.assert_close(out.double(), expect, atol=2e-2, rtol=1e-2)


def _triton_rows():
    # K = 70 and N = 72: two K steps and two column tiles, each with a masked tail
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3 * BLOCK_M, 70, generator=gen)
    w = torch.randn(72, 70, generator=gen)
    b = torch.randn(72, generator=gen)
    others = torch.randn(3 * BLOCK_M, 70, generator=gen)
    return x, w, b, others


def test_triton_rows_invariant_at_a_fixed_tile_offset():
    """The kernel's fixed tiles: a row at offset o of its BLOCK_M tile gets the same bits in a
    1-row call, behind 1-2 whole tiles of other rows, and with or without partners after it
    (zero-masked or real) -- every tl.dot has the same shape whatever M is."""
    x, w, b, others = _triton_rows()
    full = linear_triton(x, w, b)
    for i in (0, BLOCK_M, 2 * BLOCK_M):  # a 1-row call
        assert torch.equal(linear_triton(x[i : i + 1], w, b)[0], full[i]), f"lone row {i}"
    for i in (0, 5, 17, BLOCK_M - 1, BLOCK_M + 7, 3 * BLOCK_M - 1):
        off = i % BLOCK_M
        for lead in (0, 1, 2):
            for tail in (0, 3, BLOCK_M):
                head = others[: lead * BLOCK_M + off]
                out = linear_triton(torch.cat([head, x[i : i + 1], others[:tail]]), w, b)
                assert torch.equal(out[len(head)], full[i]), f"row {i}, {lead} tiles, +{tail}"


def test_triton_rows_invariant_across_tile_offsets_where_the_dot_is():
    """A lone row and a shifted slice equal the full batch's -- under the interpreter this also
    needs numpy's BLAS to round all rows of one fixed-shape tl.dot alike."""
    if not numpy_dot_position_invariant(BLOCK_M, BLOCK_K, BLOCK_N):
        pytest.skip("numpy's BLAS rounds rows of one fixed-shape matmul by position here")
    x, w, b, _ = _triton_rows()
    full = linear_triton(x, w, b)
    for i in (17, 39, 3 * BLOCK_M - 1):
        assert torch.equal(linear_triton(x[i : i + 1], w, b)[0], full[i])
    assert torch.equal(linear_triton(x[5:12], w, b), full[5:12])
