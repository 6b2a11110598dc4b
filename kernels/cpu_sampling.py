"""Token choice for fp32 logits on CPU in C (``csrc/sampling_cpu.c``): greedy argmax and
seeded sampling with temperature and min-p, one pass per row.

Contracts (``tests/kernels/test_cpu_sampling.py``):

- ``argmax_rows(logits)`` is ``logits.argmax(-1)`` exactly (first maximum; a NaN wins);
- ``seeded_uniform(seeds, positions, vocab)`` is ``kernels.sampling.seeded_uniform_ref``
  bit for bit;
- ``sample_rows(...)`` follows ``kernels.sampling.sample_tokens``'s semantics for rows whose
  top-k and top-p are off (the caller routes the others to torch): the same uniforms and the
  same formulas, with this file's exp/log polynomials, so a token can differ from the torch
  path's only where two perturbed scores tie to float rounding.

Each row is computed alone, so results are batch invariant. ``available()`` is False where
the C file cannot be built (no compiler, no AVX2/FMA); callers keep torch.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels._cbuild import load

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "sample_rows_f32": [_P, _P, _P, _P, _P, _P, _I, _I],
    "argmax_rows_f32": [_P, _P, _I, _I],
    "seeded_uniform_f32": [_P, _P, _P, _I, _I],
}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    # fp-contract off: the scalar tail must round like the vector lanes.
    lib = load("sampling_cpu", ("-ffp-contract=off",))
    if lib is None:
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
    return lib


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
    min_ps: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """int64 ``[rows]``: greedy where the temperature is <= 0, else sampled with the row's
    temperature, min-p, seed and position (top-k and top-p off)."""
    rows, vocab = logits.shape
    temps = _column(temperatures, torch.float32)
    mins = _column(min_ps, torch.float32)
    seeds64, pos64 = _column(seeds, torch.int64), _column(positions, torch.int64)
    out = torch.empty(rows, dtype=torch.int64)
    failed = _library().sample_rows_f32(
        logits.data_ptr(), temps.data_ptr(), mins.data_ptr(), seeds64.data_ptr(),
        pos64.data_ptr(), out.data_ptr(), rows, vocab,
    )  # fmt: skip
    if failed:  # a thread could not get its scratch row
        raise MemoryError(f"sample_rows: no memory for a {vocab}-float scratch row")
    return out


def seeded_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 ``[rows, vocab]``: ``seeded_uniform_ref``'s uniforms, computed in C."""
    seeds64, pos64 = _column(seeds, torch.int64), _column(positions, torch.int64)
    out = torch.empty((seeds64.shape[0], vocab), dtype=torch.float32)
    _library().seeded_uniform_f32(
        seeds64.data_ptr(), pos64.data_ptr(), out.data_ptr(), seeds64.shape[0], vocab
    )
    return out
