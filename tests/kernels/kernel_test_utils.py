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


# ------------------------------------------------------------ BLAS probes (matmul tests) ------
#
# A BLAS is deterministic for a given call shape (and thread count), but which kernel -- and
# so which rounding -- a row gets can depend on the number of rows M *and* on the row's
# position inside one call (register blocks, edge kernels): numpy's OpenBLAS 0.3.31 on an AMD
# EPYC (Zen 3) rounds rows 6..11 and 18..31 of a (32, 64) @ (64, 64) sgemm differently from
# rows 0..5. Equalities that need more than "same shape, same position" are only asserted
# where these probes find the BLAS position-invariant.


def tile_rows_position_invariant(linear, tile_m: int, k: int, n: int, dtype, seed: int = 0):
    """True when ``linear`` on one ``tile_m``-row tile gives a row the same bits at every
    position inside the tile, whatever its partners (zeros or random rows)."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    row = torch.randn(1, k, generator=gen).to(dtype)
    ref = linear(row, w)[0]
    for pos in range(tile_m):
        for partners in (torch.zeros(tile_m, k), torch.randn(tile_m, k, generator=gen)):
            tile = partners.to(dtype)
            tile[pos] = row[0]
            if not torch.equal(linear(tile, w)[pos], ref):
                return False
    return True


def numpy_dot_position_invariant(block_m: int, block_k: int, block_n: int, seed: int = 0):
    """The same probe for the ``np.matmul`` the Triton interpreter runs for one ``tl.dot`` of
    fixed ``(block_m, block_k) @ (block_k, block_n)`` fp32 tiles (fp32 accumulator added)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b = rng.standard_normal((block_k, block_n)).astype(np.float32)
    acc = np.zeros((block_m, block_n), dtype=np.float32)
    row = rng.standard_normal(block_k).astype(np.float32)
    ref = None
    for pos in range(block_m):
        for partners in (np.zeros((block_m, block_k)), rng.standard_normal((block_m, block_k))):
            a = partners.astype(np.float32)
            a[pos] = row
            got = (np.matmul(a, b, dtype=np.float32) + acc)[pos]
            ref = got if ref is None else ref
            if not np.array_equal(got, ref):
                return False
    return True
