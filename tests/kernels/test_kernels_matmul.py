"""Batch-invariant linear: the CPU torch path is bitwise row-invariant across batch sizes and
tile positions, and the Triton kernel (interpreter) matches the reference."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize(
    "k,n,dtype",
    [
        (576, 1536, torch.float32),
        (1536, 576, torch.float32),
        (576, 49152, torch.float32),
        (576, 1536, torch.bfloat16),
        (1536, 576, torch.bfloat16),
    ],
)
def test_ref_rows_bitwise_invariant_over_batch_sizes(k, n, dtype):
    """Row i of linear(x[:m]) is bitwise the same for m in 1..64, for a lone row (position 0
    with zero padding as partners) and at every position inside a tile."""
    gen = torch.Generator().manual_seed(k + n)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    x = torch.randn(64, k, generator=gen).to(dtype)
    full = linear_ref(x, w)
    # the lm-head shape is ~20 ms per tile: a subset of batch sizes keeps the test fast
    ms = range(1, 64) if n < 10000 else [1, 2, 3, 5, 8, 9, 15, 16, 17, 31, 33, 47, 63]
    for m in ms:
        assert torch.equal(linear_ref(x[:m], w), full[:m]), f"M={m}"
    for i in (0, 1, 7, 15, 16, 30, 63):
        assert torch.equal(linear_ref(x[i : i + 1], w)[0], full[i]), f"lone row {i}"
    # rows 0..7 shifted to every offset inside a tile, with different partners
    for off in range(1, DEFAULT_TILE_M):
        out = linear_ref(torch.cat([x[40 : 40 + off], x[:8]]), w)
        assert torch.equal(out[off:], full[:8]), f"offset {off}"


triton = pytest.importorskip("triton")
from kernels.matmul import linear_triton  # noqa: E402


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


def test_triton_rows_invariant():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(40, 70, generator=gen)
    w = torch.randn(20, 70, generator=gen)
    full = linear_triton(x, w)
    for i in (0, 17, 39):
        assert torch.equal(linear_triton(x[i : i + 1], w)[0], full[i])
    assert torch.equal(linear_triton(x[5:12], w), full[5:12])
