"""CPU linear layer in C (``csrc/linear_cpu.c``): ``y = x @ weight.T (+ bias)`` with fp32
activations, fp32 or bf16 weights and fp32 accumulation.

Contract: row ``r`` of the output is bitwise independent of the other rows of ``x``, of the
number of rows and of the thread count (the C file says why), and each output is the same
function of its row of ``x`` and of ``weight`` in every call. It is not bitwise equal to
``F.linear`` (another summation order); ``tests/kernels/test_cpu_linear.py`` checks it against
a float64 reference and checks the invariance.

Built by ``kernels._cbuild``; ``available()`` is False where it cannot be (no compiler, no
AVX2/FMA), and callers use torch instead.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from kernels._cbuild import load

# Up to this many rows the C kernel beats MKL's sgemm on the default model's shapes: the 121
# GEMMs of one step, cold weights, 2 cores (AVX2): 0.53x MKL's time at 1 row, 0.67x at 8, 0.81x
# at 32, even at 48, slower from 64 (docs/PERFORMANCE.md).
SMALL_ROWS = 32


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = load("linear_cpu")
    if lib is None:
        return None
    for name in ("f32w_linear", "bf16w_linear"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    return lib


def available() -> bool:
    return _library() is not None


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear`` takes these operands (CPU, fp32 input, fp32/bf16 weight)."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.dim() == 2
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] fp32, ``weight`` [N, K] fp32 or bf16, ``bias`` [N] or None: [..., N] fp32."""
    lib = _library()
    assert lib is not None, "C kernel unavailable; check available() first"
    assert supports(x, weight), (x.dtype, weight.dtype, x.device, weight.device)
    *lead, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k, f"x has {k} features, weight {tuple(weight.shape)}"
    x2 = x.reshape(-1, k).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    out = torch.empty((x2.shape[0], n), dtype=torch.float32)
    fn = lib.f32w_linear if w.dtype == torch.float32 else lib.bf16w_linear
    if x2.shape[0]:
        fn(
            x2.data_ptr(),
            w.data_ptr(),
            None if b is None else b.data_ptr(),
            out.data_ptr(),
            x2.shape[0],
            n,
            k,
        )
    return out.reshape(*lead, n)


def small_rows_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``linear`` for decode-sized inputs (at most ``SMALL_ROWS`` rows), ``F.linear`` above:
    the engine's default mode on CPU (not batch invariant, as ``F.linear`` is not)."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows <= SMALL_ROWS and supports(x, weight):
        return linear(x, weight, bias)
    return F.linear(x, weight, bias)
