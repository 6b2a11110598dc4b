"""Fused elementwise ops of a decoder layer on CPU, fp32 (``csrc/fused_cpu.c``).

Contracts (each against the plain-torch formula named, checked in
``tests/kernels/test_cpu_fused.py``):

- ``rms_norm(x, w, eps)`` / ``add_rms_norm(x, d, w, eps) -> (x + d, rms_norm(x + d))``: HF's
  RMSNorm (``w * (x * rsqrt(mean(x^2) + eps))``) within a few ulp (another summation order);
- ``silu_mul(gate_up) -> silu(gate) * up`` for the two halves of the last dimension, within a
  few ulp (a polynomial ``exp``);
- ``rope_qk_(qkv, cos, sin, q_heads, k_heads, head_dim)``: rotates the q and k parts of a fused
  qkv output in place, **bitwise** equal to ``layers.rotary.apply_rope``.

Each row is computed alone in a fixed order, so outputs are batch invariant. ``available()``
is False where the C file cannot be built (no compiler, no AVX2/FMA); callers keep torch.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels._cbuild import load_typed

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "rms_norm_f32": [_P, _P, _P, _I, _I, _F],
    "add_rms_norm_f32": [_P, _P, _P, _P, _P, _I, _I, _F],
    "silu_mul_f32": [_P, _P, _I, _I],
    "rope_qk_f32": [_P, _P, _P, _I, _I, _I, _I, _I],
}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    # fp-contract off: RoPE must round its two products before the sum, as torch does.
    return load_typed("fused_cpu", _SIGNATURES, ("-ffp-contract=off",))


def available() -> bool:
    return _library() is not None


def takes(x: torch.Tensor) -> bool:
    """Whether these kernels take ``x`` (a contiguous fp32 CPU tensor)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dim = x.shape[-1]
    out = torch.empty_like(x)
    w = weight.contiguous()
    _library().rms_norm_f32(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, rms_norm(x + delta))`` in one pass; ``delta`` is made contiguous."""
    dim = x.shape[-1]
    d = delta.contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    w = weight.contiguous()
    _library().add_rms_norm_f32(
        x.data_ptr(), d.data_ptr(), total.data_ptr(), w.data_ptr(), out.data_ptr(),
        x.numel() // dim, dim, eps,
    )  # fmt: skip
    return total, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    inter = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype)
    _library().silu_mul_f32(
        gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter), inter
    )
    return out


def rope_qk_(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_heads: int,
    k_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """Rotate, in place, the q and k heads at the start of each row of ``qkv`` [T, width];
    ``cos``/``sin`` hold one contiguous ``head_dim`` row per token."""
    rows, width = qkv.shape
    _library().rope_qk_f32(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows, width, q_heads, k_heads, head_dim
    )
    return qkv
