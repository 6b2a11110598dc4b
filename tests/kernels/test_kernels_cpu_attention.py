"""The C CPU paged-attention kernel vs the torch reference, and its batch invariance."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_attention
from kernels.attention import paged_attention_ref

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler")


def layout(lens: list[int], page_size: int, num_pages: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=gen).tolist()
    width = max(-(-n // page_size) for n in lens)
    table = torch.zeros(len(lens), width, dtype=torch.long)
    used = 0
    for b, n in enumerate(lens):
        pages = -(-n // page_size)
        table[b, :pages] = torch.tensor(perm[used : used + pages])
        used += pages
    return table


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,page_size",
    [(9, 3, 64, 16), (4, 4, 24, 4), (8, 1, 20, 5), (6, 2, 40, 16), (12, 2, 96, 7)],
)
def test_matches_reference_mixed_rows(heads, kv_heads, head_dim, page_size):
    torch.manual_seed(0)
    lens, q_lens = [7, 40, 1, 23], [3, 1, 1, 23]  # chunk over a prefix, decodes, full prefill
    table = layout(lens, page_size, 64)
    k = torch.randn(64, page_size, kv_heads, head_dim)
    v = torch.randn(64, page_size, kv_heads, head_dim)
    q = torch.randn(sum(q_lens), heads, head_dim)
    row_seq = torch.cat([torch.full((n,), b) for b, n in enumerate(q_lens)])
    row_pos = torch.cat([torch.arange(L - n, L) for L, n in zip(lens, q_lens)])
    got = cpu_attention.paged_attention_rows(q, k, v, table, row_seq, row_pos, 0.3)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    ref = paged_attention_ref(q, k, v, table.int(), cu, torch.tensor(lens, dtype=torch.int32), 0.3)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,dim", [(6, 2, 32), (9, 3, 64), (9, 3, 40), (8, 1, 20)])
def test_row_result_independent_of_batch_and_chunking(heads, kv_heads, dim):
    """A row alone (a decode: few tasks, so one task per query head) and among many rows (one
    task per KV head, its query heads together) gives the same bits."""
    torch.manual_seed(1)
    page_size = 4
    k = torch.randn(32, page_size, kv_heads, dim)
    v = torch.randn(32, page_size, kv_heads, dim)
    table = layout([30, 30, 30], page_size, 32)
    q = torch.randn(30, heads, dim)
    # all 30 rows of request 0 at once (a prefill)
    full = cpu_attention.paged_attention_rows(
        q, k, v, table, torch.zeros(30, dtype=torch.long), torch.arange(30), 0.2
    )
    # the last row alone (a decode), and inside a batch with rows of other requests
    alone = cpu_attention.paged_attention_rows(
        q[29:], k, v, table, torch.tensor([0]), torch.tensor([29]), 0.2
    )
    mixed_q = torch.cat([torch.randn(5, heads, dim), q[29:], torch.randn(2, heads, dim)])
    mixed = cpu_attention.paged_attention_rows(
        mixed_q,
        k,
        v,
        table,
        torch.tensor([1, 1, 1, 1, 1, 0, 2, 2]),
        torch.tensor([3, 4, 5, 6, 7, 29, 0, 1]),
        0.2,
    )
    assert torch.equal(full[29], alone[0]) and torch.equal(alone[0], mixed[5])
