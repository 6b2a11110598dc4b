"""Paged attention over a paged KV cache: one function for prefill, chunked prefill and decode.

Contracts (fixed by the engine):

* KV cache per layer: ``k_cache``, ``v_cache`` of shape
  ``[num_pages, page_size, num_kv_heads, head_dim]``, contiguous.
* ``page_table``: int32 ``[batch, max_pages_per_seq]`` (unused entries 0).  The token at absolute
  position ``p`` of request ``b`` lives at page ``page_table[b, p // page_size]``, row
  ``p % page_size``, i.e. at slot ``page * page_size + row``.
* ``store_kv(k_cache, v_cache, k, v, slot_mapping)`` (in ``kv_cache.py``, re-exported here)
  writes ``k, v [num_tokens, kv_heads, dim]`` to the int64 slots ``slot_mapping``; ``-1`` skips.
* ``paged_attention(q, k_cache, v_cache, page_table, cu_q_lens, seq_lens, scale, kv_split)``:
  ``q`` is packed varlen ``[total_q, num_heads, head_dim]``, ``cu_q_lens`` int32 ``[batch+1]``,
  ``seq_lens`` int32 ``[batch]`` is the KV length of each request *including* its new tokens
  (already stored).  Query ``i`` of request ``b`` sits at absolute position
  ``seq_lens[b] - q_len_b + i`` and attends causally to KV positions ``<=`` its own.  GQA: query
  head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``.  Returns ``[total_q, num_heads,
  head_dim]`` in ``q``'s dtype, computed in fp32.  Requires ``q_len_b <= seq_lens[b]``; a
  request with ``q_len_b == 0`` contributes no rows.

Determinism (fixed KV split): every query reduces its KV in chunks of ``kv_split`` positions,
chunk 0 upward, stopping at the chunk holding its own position, with an online softmax per chunk::

    s = (q . k_j) * scale   (masked to -inf for j > pos)      m' = max(m, max_j s)
    a = exp(m - m');  p = exp(s - m');  l = l * a + sum_j p;   acc = acc * a + sum_j p * v_j
    out = acc / l

The work for one query depends only on its q row, its position and its request's KV, never on
the batch composition, on ``q_len`` or on how a prefill was chunked.  The Triton kernel runs one
program per (query token, kv head); the torch reference vectorises over query tokens but gives
each token exactly the same sequence of elementwise ops and fixed-length (``kv_split`` or
``head_dim``) last-dim reductions, so it is bitwise batch invariant on CPU as well.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_power_of_2, tl, triton, use_triton
from .kv_cache import store_kv, store_kv_ref, store_kv_triton

__all__ = [
    "store_kv",
    "store_kv_ref",
    "store_kv_triton",
    "paged_attention",
    "paged_attention_ref",
    "paged_attention_triton",
]

Tensor = torch.Tensor
_REF_TOKEN_BLOCK = 256  # query tokens per vectorised step of the reference (bounds memory)


def _token_layout(cu_q_lens: Tensor, seq_lens: Tensor, total_q: int) -> tuple[Tensor, Tensor]:
    """(request index, absolute position) of every packed query token, both int64 ``[total_q]``."""
    cu = cu_q_lens.to(torch.int64)
    tok = torch.arange(total_q, device=cu.device, dtype=torch.int64)
    req = torch.searchsorted(cu[1:].contiguous(), tok, right=True)
    q_lens = cu[1:] - cu[:-1]
    pos = seq_lens.to(torch.int64)[req] - q_lens[req] + (tok - cu[req])
    return req, pos


def _ref_block(
    qf: Tensor,
    req: Tensor,
    pos: Tensor,
    k_flat: Tensor,
    v_flat: Tensor,
    pt: Tensor,
    page_size: int,
    scale: float,
    kv_split: int,
) -> Tensor:
    """Fixed-split online softmax for a block of tokens; ``qf`` is fp32 ``[n, kvh, g, d]``."""
    n, kvh, g, d = qf.shape
    dev = qf.device
    m = torch.full((n, kvh, g), float("-inf"), device=dev)
    l_sum = torch.zeros((n, kvh, g), device=dev)
    acc = torch.zeros((n, kvh, g, d), device=dev)
    n_chunks = pos // kv_split + 1
    offs = torch.arange(kv_split, device=dev, dtype=torch.int64)
    for c in range(int(n_chunks.max())):
        # Tokens whose own chunk range is exhausted are skipped (not masked): their state is final.
        act = None if bool((n_chunks > c).all()) else (n_chunks > c).nonzero().squeeze(1)
        q_a = qf if act is None else qf[act]
        req_a = req if act is None else req[act]
        pos_a = pos if act is None else pos[act]
        kpos = c * kv_split + offs  # [J]
        valid = kpos[None, :] <= pos_a[:, None]  # [a, J]
        page_col = (kpos // page_size).clamp(max=pt.shape[1] - 1)
        slot = torch.where(
            valid, pt[req_a[:, None], page_col[None, :]] * page_size + kpos % page_size, 0
        )
        kc = k_flat[slot].float().masked_fill(~valid[:, :, None, None], 0.0)  # [a, J, kvh, d]
        vc = v_flat[slot].float().masked_fill(~valid[:, :, None, None], 0.0)
        # scores: [a, kvh, g, J]; reduction over contiguous head_dim
        s = (q_a[:, :, :, None, :] * kc.permute(0, 2, 1, 3)[:, :, None, :, :]).sum(-1) * scale
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        m_a = m if act is None else m[act]
        m_new = torch.maximum(m_a, s.amax(-1))
        alpha = torch.exp(m_a - m_new)
        p = torch.exp(s - m_new[..., None])
        l_a = (l_sum if act is None else l_sum[act]) * alpha + p.sum(-1)
        # p @ v: [a, kvh, g, d, J] reduced over contiguous J
        pv = (p[:, :, :, None, :] * vc.permute(0, 2, 3, 1)[:, :, None, :, :]).sum(-1)
        acc_a = (acc if act is None else acc[act]) * alpha[..., None] + pv
        if act is None:
            m, l_sum, acc = m_new, l_a, acc_a
        else:
            m[act], l_sum[act], acc[act] = m_new, l_a, acc_a
    return acc / l_sum[..., None]


def paged_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    page_table: Tensor,
    cu_q_lens: Tensor,
    seq_lens: Tensor,
    scale: float,
    kv_split: int = 16,
) -> Tensor:
    """Plain-torch paged attention with the fixed-KV-split semantics (the engine's CPU path)."""
    total_q, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if total_q == 0:
        return out
    req, pos = _token_layout(cu_q_lens, seq_lens, total_q)
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    pt = page_table.to(torch.int64)
    qf = q.float().reshape(total_q, num_kv_heads, group, head_dim)
    for start in range(0, total_q, _REF_TOKEN_BLOCK):
        sl = slice(start, min(total_q, start + _REF_TOKEN_BLOCK))
        o = _ref_block(qf[sl], req[sl], pos[sl], k_flat, v_flat, pt, page_size, scale, kv_split)
        out[sl] = o.reshape(-1, num_heads, head_dim).to(q.dtype)
    return out


if HAS_TRITON:

    @triton.jit
    def _paged_attn_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        pt_ptr,
        req_ptr,
        pos_ptr,
        scale,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_ptb,
        PAGE_SIZE: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        KV_SPLIT: tl.constexpr,
    ):
        # One program = one query token x one kv head (all GROUP query heads that share it).
        t = tl.program_id(0)
        kvh = tl.program_id(1)
        req = tl.load(req_ptr + t).to(tl.int64)
        pos = tl.load(pos_ptr + t)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_j = tl.arange(0, KV_SPLIT)
        dmask = offs_d < HEAD_DIM
        qmask = (offs_g[:, None] < GROUP) & dmask[None, :]
        head = kvh * GROUP + offs_g
        q = tl.load(
            q_ptr + t * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=qmask,
            other=0.0,
        ).to(tl.float32)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        n_chunks = pos // KV_SPLIT + 1
        for c in range(0, n_chunks):
            kpos = c * KV_SPLIT + offs_j
            valid = kpos <= pos
            page = tl.load(pt_ptr + req * stride_ptb + kpos // PAGE_SIZE, mask=valid, other=0)
            slot = page.to(tl.int64) * PAGE_SIZE + kpos % PAGE_SIZE
            row = (slot * NUM_KV_HEADS + kvh) * HEAD_DIM  # contiguous cache
            kvmask = valid[:, None] & dmask[None, :]
            k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
            v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=kvmask, other=0.0)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, J]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = acc / l_sum[:, None]
        tl.store(
            o_ptr + t * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=qmask,
        )


def paged_attention_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    page_table: Tensor,
    cu_q_lens: Tensor,
    seq_lens: Tensor,
    scale: float,
    kv_split: int = 16,
) -> Tensor:
    """Triton paged attention (same semantics as :func:`paged_attention_ref`)."""
    total_q, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    assert kv_split > 0 and kv_split & (kv_split - 1) == 0, "kv_split must be a power of two"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    out = torch.empty_like(q)
    if total_q == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    req, pos = _token_layout(cu_q_lens, seq_lens, total_q)
    group = num_heads // num_kv_heads
    _paged_attn_kernel[(total_q, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        page_table,
        req.to(torch.int32),
        pos.to(torch.int32),
        float(scale),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        page_table.stride(0),
        PAGE_SIZE=page_size,
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        BLOCK_G=next_power_of_2(group),
        HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim),
        KV_SPLIT=kv_split,
    )
    return out


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    page_table: Tensor,
    cu_q_lens: Tensor,
    seq_lens: Tensor,
    scale: float,
    kv_split: int = 16,
) -> Tensor:
    """Causal paged attention with a fixed KV split (Triton on CUDA, torch reference otherwise)."""
    if use_triton(q):
        return paged_attention_triton(
            q, k_cache, v_cache, page_table, cu_q_lens, seq_lens, scale, kv_split
        )
    return paged_attention_ref(
        q, k_cache, v_cache, page_table, cu_q_lens, seq_lens, scale, kv_split
    )
