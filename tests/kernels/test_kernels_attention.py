"""Paged attention: reference vs naive dense attention, Triton (interpreter) vs reference, and
bitwise batch invariance / chunking invariance of both paths."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import attn_args, dense_attention, make_batch, sub_batch

from kernels import paged_attention
from kernels.attention import paged_attention_ref

SCALE = 0.3

# (seq_lens, q_lens): decode rows, a full prefill, a chunk over a cached prefix; GQA everywhere.
MIXED = ([9, 23, 1, 14], [1, 23, 1, 6])


@pytest.mark.parametrize(
    "page_size,kv_split,heads,kv_heads,dim",
    [(4, 16, 4, 2, 16), (3, 4, 6, 2, 8), (16, 8, 2, 2, 32), (5, 16, 3, 1, 16)],
)
def test_ref_matches_dense_attention(page_size, kv_split, heads, kv_heads, dim):
    batch = make_batch(*MIXED, page_size, heads, kv_heads, dim, seed=page_size)
    out = paged_attention_ref(*attn_args(batch), SCALE, kv_split)
    assert out.dtype == torch.float32 and out.shape == batch["q"].shape
    torch.testing.assert_close(out.double(), dense_attention(batch, SCALE), atol=1e-5, rtol=1e-5)


def test_dispatcher_uses_reference_on_cpu():
    batch = make_batch(*MIXED, 4, 4, 2, 16, seed=1)
    assert torch.equal(
        paged_attention(*attn_args(batch), SCALE), paged_attention_ref(*attn_args(batch), SCALE)
    )


def test_ref_bf16_output_dtype_and_accuracy():
    batch = make_batch(*MIXED, 4, 4, 2, 16, dtype=torch.bfloat16, seed=2)
    out = paged_attention_ref(*attn_args(batch), SCALE, 4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), dense_attention(batch, SCALE), atol=2e-2, rtol=2e-2)


def _alone_vs_batched(attn, batch, seq_lens, q_lens):
    """Every request alone must equal its rows of the batched result, bitwise."""
    full = attn(*attn_args(batch), SCALE)
    cu = batch["cu_q_lens"].tolist()
    for b in range(len(seq_lens)):
        q = batch["q"][cu[b] : cu[b + 1]]
        alone = attn(*sub_batch(batch, q, [b], [q_lens[b]], [seq_lens[b]]), SCALE)
        assert torch.equal(alone, full[cu[b] : cu[b + 1]]), f"request {b}"
    # a different partner set and order: the last request, then request 1
    rows = [len(seq_lens) - 1, 1]
    q = torch.cat([batch["q"][cu[b] : cu[b + 1]] for b in rows])
    pair = attn(
        *sub_batch(batch, q, rows, [q_lens[b] for b in rows], [seq_lens[b] for b in rows]), SCALE
    )
    assert torch.equal(pair, torch.cat([full[cu[b] : cu[b + 1]] for b in rows]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_batch_invariant(dtype):
    seq_lens, q_lens = [40, 23, 1, 70, 33], [1, 23, 1, 13, 1]
    batch = make_batch(seq_lens, q_lens, 4, 6, 2, 32, dtype=dtype, seed=3)
    _alone_vs_batched(paged_attention_ref, batch, seq_lens, q_lens)


def _chunking_invariance(attn, length, chunks, page_size, kv_split, heads, kv_heads, dim):
    """Prefill at once == chunked prefill (with a partner request) == one decode step per token."""
    batch = make_batch([length, 11], [length, 1], page_size, heads, kv_heads, dim, seed=4)
    q_all = batch["q"][:length]
    q_other = batch["q"][length:]
    full = attn(*sub_batch(batch, q_all, [0], [length], [length]), SCALE, kv_split)
    start = 0
    for end in chunks:
        # partner decode row first, so the chunk's rows also move inside the packed batch
        q = torch.cat([q_other, q_all[start:end]])
        args = sub_batch(batch, q, [1, 0], [1, end - start], [11, end])
        out = attn(*args, SCALE, kv_split)[1:]
        assert torch.equal(out, full[start:end]), f"chunk {start}:{end}"
        start = end
    for p in range(length):
        out = attn(*sub_batch(batch, q_all[p : p + 1], [0], [1], [p + 1]), SCALE, kv_split)
        assert torch.equal(out[0], full[p]), f"decode step at position {p}"


def test_ref_prefill_chunked_decode_identical():
    _chunking_invariance(paged_attention_ref, 45, [7, 8, 25, 45], 4, 16, 6, 2, 32)
    _chunking_invariance(paged_attention_ref, 30, [16, 17, 30], 3, 4, 4, 4, 16)


def test_ref_matches_dense_long_prefill_multiple_token_blocks(monkeypatch):
    import kernels.attention as attention

    monkeypatch.setattr(attention, "_REF_TOKEN_BLOCK", 8)  # exercise the token-block loop
    batch = make_batch([30, 5], [30, 2], 4, 4, 2, 16, seed=5)
    out = attention.paged_attention_ref(*attn_args(batch), SCALE, 4)
    torch.testing.assert_close(out.double(), dense_attention(batch, SCALE), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- Triton (interpreter) ----------

triton = pytest.importorskip("triton")
from kernels.attention import paged_attention_triton  # noqa: E402


@pytest.mark.parametrize(
    "page_size,kv_split,heads,kv_heads,dim",
    [(4, 16, 4, 2, 16), (3, 4, 6, 2, 8), (5, 8, 3, 1, 16), (16, 16, 2, 2, 32)],
)
def test_triton_matches_ref(page_size, kv_split, heads, kv_heads, dim):
    batch = make_batch(*MIXED, page_size, heads, kv_heads, dim, seed=6)
    args = attn_args(batch)
    out = paged_attention_triton(*args, SCALE, kv_split)
    ref = paged_attention_ref(*args, SCALE, kv_split)
    assert out.dtype == ref.dtype and not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), dense_attention(batch, SCALE), atol=1e-5, rtol=1e-5)


def test_triton_bf16_matches_ref():
    batch = make_batch([9, 6], [1, 6], 4, 4, 2, 16, dtype=torch.bfloat16, seed=7)
    out = paged_attention_triton(*attn_args(batch), SCALE)
    assert out.dtype == torch.bfloat16
    ref = paged_attention_ref(*attn_args(batch), SCALE)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_triton_batch_invariant():
    seq_lens, q_lens = [12, 5, 9], [1, 5, 3]
    batch = make_batch(seq_lens, q_lens, 4, 4, 2, 16, seed=8)
    _alone_vs_batched(paged_attention_triton, batch, seq_lens, q_lens)


def test_triton_prefill_chunked_decode_identical():
    _chunking_invariance(paged_attention_triton, 10, [3, 10], 3, 4, 2, 1, 16)
