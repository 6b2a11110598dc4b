"""Batch-invariant linear layer: ``linear(x, weight, bias=None) = x @ weight.T (+ bias)``.

``weight`` is ``[N, K]`` as in ``nn.Linear``; ``x`` is ``[..., K]``; the output is ``[..., N]`` in
``x``'s dtype.  Contract: row ``r`` of the output is bitwise independent of the other rows of
``x`` and of the number of rows ``M`` (the engine's deterministic mode relies on it).

Triton (CUDA): fixed ``BLOCK_M/N/K`` tiles for every shape (no autotuning on M, no split-K), K
reduced in one fixed order, fp32 accumulation, bias added in fp32 before the single rounding.

Torch (CPU): plain ``F.linear`` is NOT batch invariant.  Measured with MKL 2024.2 (torch 2.13,
AVX512, 2 threads), fp32, K x N in {576x1536, 1536x576, 576x49152}: row 0 takes three different
values for M=1 (gemv), M=2..3 and M>=4; in bf16, M=1 differs from M>1 for 1536x576.  The torch
path therefore pads M up to a multiple of ``tile_m`` (default 16) and issues one ``torch.mm`` of
identical shape ``(tile_m, K) @ (K, N)`` per tile, so every row always goes through the same MKL
kernel with the same blocking and thread partition.  Verified in
``tests/kernels/test_kernels_matmul.py`` (fp32 and bf16, the three shapes above, batch sizes
1..63 -- a subset for the lm head --, lone rows and every offset inside a tile); tile sizes
1/4/8/16/32 all passed the same check in exploration, 16 was chosen for cost (below).  Results
are bitwise self-consistent, not bitwise equal to ``F.linear``'s.

Cost vs ``F.linear`` (K=576, N=1536, fp32, 2 threads; ``python -m kernels.bench_matmul``, best of
5 medians of 60 calls on a shared 2-core AMD EPYC, microseconds; run-to-run spread ~20%)::

    M      F.linear   tile 8   tile 16   tile 32
    1          70       251      266       433
    8         173       256      309       431
    32        405       776      557       433
    128      1426      3452     2164      1906

Tile 16 costs ~3.8x at M=1 (the gemv path that plain M=1 takes is exactly what breaks
invariance; a 16-row MKL sgemm re-packs the whole weight on every call), ~1.8x at M=8 and
~1.4x at M=32..128.  Tile 8 is cheaper for M <= 8 but 2x worse from M=32 on; 32 is worse for
decode-sized batches.  The path is only used in deterministic mode.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, cdiv, interpreting, tl, triton, use_triton

__all__ = ["linear", "linear_ref", "linear_triton", "DEFAULT_TILE_M"]

DEFAULT_TILE_M = 16
# Triton tile configuration: fixed for every shape (changing it changes the reduction order).
BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 64


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile_m: int = DEFAULT_TILE_M,
) -> torch.Tensor:
    """Batch-invariant torch linear: fixed ``(tile_m, K) @ (K, N)`` mm per tile of rows."""
    *lead, k = x.shape
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    n_tiles = cdiv(m, tile_m)
    if m != n_tiles * tile_m or not x2.is_contiguous():
        xp = x2.new_zeros((n_tiles * tile_m, k))
        xp[:m] = x2
    else:
        xp = x2
    out = torch.empty((n_tiles * tile_m, n), dtype=x.dtype, device=x.device)
    wt = weight.to(x.dtype).t()
    for i in range(0, n_tiles * tile_m, tile_m):
        torch.mm(xp[i : i + tile_m], wt, out=out[i : i + tile_m])
    out = out[:m]
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*lead, n)


if HAS_TRITON:

    @triton.jit
    def _linear_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        o_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        mmask = offs_m < M
        nmask = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # one fixed K order, no split-K
            kk = k0 + offs_k
            kmask = kk < K
            a = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                mask=mmask[:, None] & kmask[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + kk[:, None],
                mask=kmask[:, None] & nmask[None, :],
                other=0.0,
            )
            if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong; products are exact in fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            o_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
            acc.to(o_ptr.dtype.element_ty),
            mask=mmask[:, None] & nmask[None, :],
        )


def linear_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton batch-invariant linear with the fixed tile configuration above."""
    *lead, k = x.shape
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        grid = (cdiv(m, BLOCK_M), cdiv(n, BLOCK_N))
        _linear_kernel[grid](
            x2,
            w,
            bias if bias is not None else w,
            out,
            m,
            n,
            k,
            x2.stride(0),
            w.stride(0),
            out.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
            INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            UPCAST=interpreting(),
        )
    return out.reshape(*lead, n)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile_m: int = DEFAULT_TILE_M,
) -> torch.Tensor:
    """Batch-invariant ``x @ weight.T (+ bias)`` (Triton on CUDA, tiled torch.mm otherwise)."""
    if use_triton(x):
        return linear_triton(x, weight, bias)
    return linear_ref(x, weight, bias, tile_m)
