"""Optional Triton import and small launch helpers.

``kernels`` must import on machines without Triton (CPU-only CI, macOS): every module that
defines ``@triton.jit`` kernels does so under ``if HAS_TRITON:`` and its public dispatcher
falls back to the plain-torch reference when Triton is missing or the tensors are not on CUDA.

Triton decides between compiling and interpreting (``TRITON_INTERPRET=1``) when a kernel is
*decorated*, i.e. when the defining module is imported.  Tests that run kernels under the
interpreter must therefore set the variable before importing ``kernels`` (see
``tests/kernels/conftest.py``).
"""

from __future__ import annotations

import os

try:  # pragma: no cover - exercised implicitly by every import of the package
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install (e.g. missing libcuda bits)
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "triton", "tl", "cdiv", "next_power_of_2", "interpreting", "use_triton"]


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def use_triton(t: object) -> bool:
    """Whether a dispatcher should launch the Triton kernel for tensor ``t``.

    Triton is used on CUDA tensors when it is importable; everything else takes the torch path.
    """
    return HAS_TRITON and bool(getattr(t, "is_cuda", False))
