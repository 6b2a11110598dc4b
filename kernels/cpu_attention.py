"""CPU paged attention in C (``csrc/paged_attention_cpu.c``), loaded through ctypes.

Reads K/V pages in place instead of gathering them, and is batch-invariant by construction
(each query row is reduced in a fixed order that depends only on its own data), so the engine's
default and deterministic modes both use it for fp32 decode on CPU.

The library is built by ``kernels._cbuild``; if it cannot be built here, ``available()`` is
False and callers use the torch path.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels._cbuild import load_typed

_SIGNATURES = {
    "paged_attention_f32": [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_float],
}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    # fp-contract off: one rounding per written op
    return load_typed("paged_attention_cpu", _SIGNATURES, ("-ffp-contract=off",))


def available() -> bool:
    return _library() is not None


def paged_attention_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    row_seq: torch.Tensor,
    row_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention for query rows ``q`` [T, Hq, D] (fp32, CPU). Row ``t`` belongs to request
    ``row_seq[t]`` (a row of ``page_table`` [B, max_pages], int64) and attends causally to KV
    positions ``0..row_pos[t]`` of that request, which must already be in the cache."""
    lib = _library()
    assert lib is not None, "C kernel unavailable; check available() first"
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float32, (q.dtype, k_cache.dtype)
    q = q.contiguous()
    page_table, row_seq, row_pos = (
        t.contiguous().to(torch.int64) for t in (page_table, row_seq, row_pos)
    )
    tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    failed = lib.paged_attention_f32(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        page_table.data_ptr(),
        row_seq.data_ptr(),
        row_pos.data_ptr(),
        out.data_ptr(),
        tokens,
        num_heads,
        num_kv_heads,
        head_dim,
        page_size,
        page_table.shape[1],
        scale,
    )
    if failed:
        raise MemoryError("paged_attention_f32: out of memory for the score buffer")
    return out
