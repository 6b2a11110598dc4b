"""Token choice for fp32 logits on CPU in C (``csrc/sampling_cpu.c``): greedy argmax and
seeded sampling with temperature, top-k, top-p and min-p, a few passes per row.

Contracts (``tests/kernels/test_cpu_sampling.py``):

- ``argmax_rows(logits)`` is ``logits.argmax(-1)`` exactly (first maximum; a NaN wins);
- ``seeded_uniform(seeds, positions, vocab)`` is ``kernels.sampling.seeded_uniform_ref``
  bit for bit;
- ``sample_rows(...)`` follows ``kernels.sampling``'s torch formulation: the same uniforms and
  formulas, with the C file's exp/log polynomials and top-p masses summed in double, so a
  token can differ from the torch path's only where float rounding decides (two perturbed
  scores, or a top-p boundary, within rounding of each other).

Each row is computed alone, so results are batch invariant. ``available()`` is False where
the C file cannot be built (no compiler, no AVX2/FMA); callers keep torch.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels._cbuild import load_typed

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "sample_rows_f32": [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I],
    "argmax_rows_f32": [_P, _P, _I, _I],
    "seeded_uniform_f32": [_P, _P, _P, _I, _I],
}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    # fp-contract off: the scalar tail must round like the vector lanes.
    return load_typed("sampling_cpu", _SIGNATURES, ("-ffp-contract=off",))


def available() -> bool:
    return _library() is not None


def takes(logits: torch.Tensor) -> bool:
    """Whether these kernels take ``logits`` (2-D fp32 on CPU, contiguous rows, built here)."""
    return (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.dim() == 2
        and logits.is_contiguous()
        and available()
    )


def _column(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values.to(device="cpu", dtype=dtype).contiguous()


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """int64 ``[rows]``: the first maximum of each row (``takes(logits)`` must hold)."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64)
    _library().argmax_rows_f32(logits.data_ptr(), out.data_ptr(), rows, vocab)
    return out


def sample_rows(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """int64 ``[rows]``: greedy where the temperature is <= 0, else sampled with the row's
    temperature, top-k, top-p, min-p, seed and position (``takes(logits)`` must hold)."""
    rows, vocab = logits.shape
    cols = [
        _column(temperatures, torch.float32),
        _column(top_ks, torch.int64),
        _column(top_ps, torch.float32),
        _column(min_ps, torch.float32),
        _column(seeds, torch.int64),
        _column(positions, torch.int64),
    ]
    out = torch.empty(rows, dtype=torch.int64)
    failed = _library().sample_rows_f32(
        logits.data_ptr(), *(c.data_ptr() for c in cols), out.data_ptr(), rows, vocab
    )
    if failed:  # a thread could not get its scratch rows
        raise MemoryError(f"sample_rows: no memory for scratch rows of {vocab} tokens")
    return out


def seeded_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 ``[rows, vocab]``: ``seeded_uniform_ref``'s uniforms, computed in C."""
    seeds64, pos64 = _column(seeds, torch.int64), _column(positions, torch.int64)
    out = torch.empty((seeds64.shape[0], vocab), dtype=torch.float32)
    _library().seeded_uniform_f32(
        seeds64.data_ptr(), pos64.data_ptr(), out.data_ptr(), seeds64.shape[0], vocab
    )
    return out
