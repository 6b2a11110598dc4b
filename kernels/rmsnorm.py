"""RMSNorm over the last dimension with HF Llama semantics.

Contract: ``rms_norm(x, weight, eps)`` for ``x [..., hidden]`` and ``weight [hidden]`` returns::

    h = x.float()
    h = h * rsqrt(mean(h * h, -1) + eps)
    out = (weight * h.to(x.dtype))          # weight applied after casting back, as HF does

in ``x``'s dtype.  The final product is computed in fp32 and rounded once to ``x.dtype``; for the
usual case ``weight.dtype == x.dtype`` this is bitwise what HF's ``weight * h.to(dtype)`` gives
(a product of two bf16/fp16 values is exact in fp32).

Batch invariance: each row is normalised independently (Triton: one program per row; torch: a
last-dim reduction whose per-row order does not depend on the number of rows), so a row's output
does not depend on the other rows.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_power_of_2, tl, triton, use_triton

__all__ = ["rms_norm", "rms_norm_ref", "rms_norm_triton"]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-torch RMSNorm (the engine's CPU path)."""
    h = x.float()
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return (weight.float() * h.to(x.dtype).float()).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, stride_x, stride_o, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        h = xf * (1.0 / tl.sqrt(var + eps))
        # round to the input dtype first (HF casts before the weight multiply)
        h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + row * stride_o + offs, (h * w).to(o_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm: one program per row, the whole row in one block."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_rows, n_cols = x2.shape
    out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows:
        _rms_norm_kernel[(n_rows,)](
            x2,
            weight.contiguous(),
            out,
            x2.stride(0),
            out.stride(0),
            n_cols,
            float(eps),
            BLOCK=next_power_of_2(n_cols),
        )
    return out.view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (Triton on CUDA, torch reference otherwise)."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)
