"""Writing new keys/values into the paged KV cache.

Contract (fixed by the engine): ``k_cache``, ``v_cache`` are contiguous
``[num_pages, page_size, num_kv_heads, head_dim]``; ``k``, ``v`` are
``[num_tokens, num_kv_heads, head_dim]`` (last dim contiguous, any token/head stride);
``slot_mapping`` is int64 ``[num_tokens]`` with ``slot = page * page_size + row``; slot ``-1``
means "skip this token".  Values are cast to the cache dtype.  Writes happen in place.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_power_of_2, tl, triton, use_triton

__all__ = ["store_kv", "store_kv_ref", "store_kv_triton"]

Tensor = torch.Tensor


def store_kv_ref(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor
) -> None:
    """Torch reference of :func:`store_kv` (in place)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v[keep].to(v_cache.dtype)


if HAS_TRITON:

    @triton.jit
    def _store_kv_kernel(
        k_ptr,
        v_ptr,
        kc_ptr,
        vc_ptr,
        slot_ptr,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        NUM_KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # one program per token; a negative slot masks every store
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        dst_slot = tl.zeros([BLOCK_H, BLOCK_D], tl.int64) + slot
        mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM) & (dst_slot >= 0)
        dst = dst_slot * (NUM_KV_HEADS * HEAD_DIM) + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask)
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask)
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor
) -> None:
    """Triton :func:`store_kv` (one program per token)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=next_power_of_2(num_kv_heads),
        BLOCK_D=next_power_of_2(head_dim),
    )


def store_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Write ``k, v`` into the paged caches at ``slot_mapping`` (Triton on CUDA, else torch)."""
    if use_triton(k_cache):
        store_kv_triton(k_cache, v_cache, k, v, slot_mapping)
    else:
        store_kv_ref(k_cache, v_cache, k, v, slot_mapping)
