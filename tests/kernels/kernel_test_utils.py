"""Helpers shared by the kernel tests: random paged KV caches and a naive dense attention."""

from __future__ import annotations

import torch


def make_batch(
    seq_lens: list[int],
    q_lens: list[int],
    page_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict:
    """Random per-request KV scattered over shuffled pages of a NaN-poisoned cache.

    Unused cache rows hold NaN, so any read outside a request's causal window poisons the output.
    """
    gen = torch.Generator().manual_seed(seed)
    n_pages = [-(-s // page_size) for s in seq_lens]
    num_pages = sum(n_pages) + 3
    perm = torch.randperm(num_pages, generator=gen).tolist()
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    page_table = torch.zeros(len(seq_lens), max(n_pages) + 1, dtype=torch.int32)
    dense_k, dense_v = [], []
    for b, s in enumerate(seq_lens):
        pages = [perm.pop() for _ in range(n_pages[b])]
        page_table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        k = torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype)
        for p in range(s):
            k_cache[pages[p // page_size], p % page_size] = k[p]
            v_cache[pages[p // page_size], p % page_size] = v[p]
        dense_k.append(k)
        dense_v.append(v)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    q = torch.randn(int(cu[-1]), num_heads, head_dim, generator=gen).to(dtype)
    return dict(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        page_table=page_table,
        cu_q_lens=cu,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        dense_k=dense_k,
        dense_v=dense_v,
    )


def attn_args(batch: dict) -> tuple:
    """Positional arguments of ``paged_attention`` (without scale / kv_split)."""
    keys = ("q", "k_cache", "v_cache", "page_table", "cu_q_lens", "seq_lens")
    return tuple(batch[k] for k in keys)


def sub_batch(
    batch: dict, q: torch.Tensor, rows: list[int], q_lens: list[int], seq_lens: list[int]
):
    """Arguments for a call over requests ``rows`` (page-table rows) with the given lengths."""
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    return (
        q,
        batch["k_cache"],
        batch["v_cache"],
        batch["page_table"][rows].contiguous(),
        cu,
        torch.tensor(seq_lens, dtype=torch.int32),
    )


def dense_attention(batch: dict, scale: float) -> torch.Tensor:
    """Naive causal softmax attention in float64 over the dense per-request KV."""
    q, cu = batch["q"], batch["cu_q_lens"].tolist()
    num_heads = q.shape[1]
    outs = []
    for b, (k, v) in enumerate(zip(batch["dense_k"], batch["dense_v"], strict=True)):
        qb = q[cu[b] : cu[b + 1]].double()
        n, s = qb.shape[0], k.shape[0]
        group = num_heads // k.shape[1]
        kb = k.double().repeat_interleave(group, dim=1)
        vb = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qb, kb) * scale
        qpos = s - n + torch.arange(n)
        mask = torch.arange(s)[None, :] <= qpos[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vb))
    return torch.cat(outs)
