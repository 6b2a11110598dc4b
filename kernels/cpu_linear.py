"""CPU linear layer in C (``csrc/linear_cpu.c``): ``y = x @ weight.T (+ bias)`` with fp32
activations, fp32 or bf16 weights and fp32 accumulation.

Weights are packed once into column panels (``pack``) and reused (``packed_linear``);
``linear`` packs per call. Contract: row ``r`` of the output is bitwise independent of the
other rows of ``x``, of the number of rows and of the thread count (the C file says why), and
each output is the same function of its row of ``x`` and of ``weight`` in every call, packed
once or per call. It is not bitwise equal to ``F.linear`` (another summation order);
``tests/kernels/test_cpu_linear.py`` checks it against a float64 reference and checks the
invariance.

Built by ``kernels._cbuild``; ``available()`` is False where it cannot be (no compiler, no
AVX2/FMA), and callers use torch instead.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels._cbuild import load

PANEL = 16  # outputs per packed panel (csrc/linear_cpu.c)

# Makes a pack's uninitialized panel tensor: (shape, dtype) -> contiguous CPU tensor.
Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]

_PREFIX = {torch.float32: "f32w", torch.bfloat16: "bf16w", torch.int8: "i8w"}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    # No contraction: the scale-then-bias epilogue must round the same way on every path.
    lib = load("linear_cpu", ("-ffp-contract=off",))
    if lib is None:
        return None
    for prefix in _PREFIX.values():
        fn = getattr(lib, f"{prefix}_packed_linear")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
        fn = getattr(lib, f"{prefix}_pack")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    return lib


@functools.cache
def _kernel(dtype: torch.dtype):
    lib = _library()
    assert lib is not None, "C kernel unavailable; check available() first"
    return getattr(lib, f"{_PREFIX[dtype]}_packed_linear")


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


@dataclass(frozen=True)
class PackedWeight:
    """A weight [N, K] as column panels [ceil(N / 16), K, 16] (outputs past N are zero);
    int8 panels come with per-output fp32 ``scales`` [N] (weight ~= panels * scale)."""

    panels: torch.Tensor
    out_features: int
    in_features: int
    scales: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.panels.nbytes + (0 if self.scales is None else self.scales.nbytes)


def _torch_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def pack(
    weight: torch.Tensor, into: PackedWeight | None = None, empty: Allocator = _torch_empty
) -> PackedWeight:
    """``weight`` [N, K] (fp32 or bf16, CPU) in the kernel's panel layout, same dtype;
    written over ``into``'s panels when given (same shape and dtype: a repack allocates
    nothing), else into a tensor from ``empty`` (e.g. ``huge_pages.HugePageArena.empty``)."""
    assert weight.dtype in (torch.float32, torch.bfloat16), weight.dtype
    return _pack_panels(weight.detach().contiguous(), into, None, empty)


def pack_int8(
    weight: torch.Tensor, into: PackedWeight | None = None, empty: Allocator = _torch_empty
) -> PackedWeight:
    """``weight`` [N, K] quantized to int8 panels, symmetric per output: ``scale[n] =
    max|w[n]| / 127`` (1 for an all-zero row), ``q = round(w / scale)``; the kernel computes
    ``(x . q[n]) * scale[n]``."""
    w = weight.detach().to(torch.float32)
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    if into is not None:
        assert into.scales is not None, "pack_int8 into a float pack"
        into.scales.copy_(scales)
        scales = into.scales
    return _pack_panels(q, into, scales, empty)


def _pack_panels(
    w: torch.Tensor, into: PackedWeight | None, scales: torch.Tensor | None, empty: Allocator
) -> PackedWeight:
    lib = _library()
    assert lib is not None, "C kernel unavailable; check available() first"
    assert w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous(), (w.device, w.shape)
    n, k = w.shape
    shape = (-(-n // PANEL), k, PANEL)
    if into is not None:
        assert into.panels.shape == shape and into.panels.dtype == w.dtype, "pack shape changed"
    panels = empty(shape, w.dtype) if into is None else into.panels
    getattr(lib, f"{_PREFIX[w.dtype]}_pack")(w.data_ptr(), panels.data_ptr(), n, k)
    return PackedWeight(panels, n, k, scales)


def packed_linear(
    x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` [..., K] fp32 times a packed weight, plus ``bias`` [N]: [..., N] fp32."""
    # Lean on purpose: a batch-1 decode step makes 121 of these calls, and each torch op or
    # device check here costs microseconds against a ~100 us kernel (docs/PERFORMANCE.md).
    k = x.shape[-1]
    n = weight.out_features
    if weight.in_features != k:  # the kernel would read past x's rows
        raise ValueError(f"x has {k} features, weight {n}x{weight.in_features}")
    if x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError(f"packed_linear takes fp32 CPU input, got {x.dtype} on {x.device}")
    if bias is not None and bias.numel() != n:  # the kernel reads n bias values
        raise ValueError(f"bias has {bias.numel()} values, weight has {n} outputs")
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, n), dtype=torch.float32)
    if rows:
        scales = weight.scales
        b = None if bias is None else bias.to(torch.float32).contiguous()
        _kernel(weight.panels.dtype)(
            x2.data_ptr(),
            weight.panels.data_ptr(),
            None if scales is None else scales.data_ptr(),
            None if b is None else b.data_ptr(),
            out.data_ptr(),
            rows,
            n,
            k,
        )
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], n)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] fp32, ``weight`` [N, K] fp32 or bf16, ``bias`` [N] or None: [..., N] fp32.

    Packs ``weight`` on every call (one extra pass over it): for weights that change each call
    (a trainer's). Engines keep packed weights (``engine_core.layers.packed_linear``); both give
    the same bits.
    """
    assert supports(x, weight), (x.dtype, weight.dtype, x.device, weight.device)
    return packed_linear(x, pack(weight), bias)
