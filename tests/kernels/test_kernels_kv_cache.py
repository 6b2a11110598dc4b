"""store_kv: slots written, -1 skipped, everything else untouched; Triton == torch bitwise."""

from __future__ import annotations

import pytest
import torch

from kernels import paged_attention, store_kv
from kernels.kv_cache import store_kv_ref

PAGES, PAGE_SIZE, KV_HEADS, DIM = 6, 4, 2, 8


def _inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # k, v as non-contiguous views of a fused projection output, like the engine's qkv split
    qkv = torch.randn(5, 3 * KV_HEADS * DIM, generator=gen).to(dtype)
    k = qkv[:, KV_HEADS * DIM : 2 * KV_HEADS * DIM].view(5, KV_HEADS, DIM)
    v = qkv[:, 2 * KV_HEADS * DIM :].view(5, KV_HEADS, DIM)
    slots = torch.tensor([3, -1, 17, 4, 23], dtype=torch.int64)
    return k, v, slots


def _caches(dtype=torch.float32):
    shape = (PAGES, PAGE_SIZE, KV_HEADS, DIM)
    return torch.full(shape, -7.0, dtype=dtype), torch.full(shape, -9.0, dtype=dtype)


def test_ref_writes_slots_and_skips_minus_one():
    k, v, slots = _inputs()
    kc, vc = _caches()
    store_kv(kc, vc, k, v, slots)  # CPU dispatch = torch path
    flat_k, flat_v = kc.view(-1, KV_HEADS, DIM), vc.view(-1, KV_HEADS, DIM)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], k[t]) and torch.equal(flat_v[s], v[t])
            assert torch.equal(kc[s // PAGE_SIZE, s % PAGE_SIZE], k[t])
    untouched = torch.ones(PAGES * PAGE_SIZE, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert (flat_k[untouched] == -7.0).all() and (flat_v[untouched] == -9.0).all()


def test_store_then_attend_matches_dense():
    gen = torch.Generator().manual_seed(1)
    n = 7
    k = torch.randn(n, KV_HEADS, DIM, generator=gen)
    v = torch.randn(n, KV_HEADS, DIM, generator=gen)
    q = torch.randn(n, 2 * KV_HEADS, DIM, generator=gen)
    kc, vc = _caches()
    pages = torch.tensor([[4, 1]], dtype=torch.int32)
    pos = torch.arange(n)
    store_kv(kc, vc, k, v, pages[0, pos // PAGE_SIZE].long() * PAGE_SIZE + pos % PAGE_SIZE)
    out = paged_attention(
        q, kc, vc, pages, torch.tensor([0, n], dtype=torch.int32), torch.tensor([n]), 0.5, 4
    )
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * 0.5
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    dense = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


triton = pytest.importorskip("triton")
from kernels.kv_cache import store_kv_triton  # noqa: E402


@pytest.mark.parametrize(
    "src,cache", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
)
def test_triton_equals_ref_bitwise(src, cache):
    k, v, slots = _inputs(src, seed=2)
    kc_ref, vc_ref = _caches(cache)
    kc, vc = _caches(cache)
    store_kv_ref(kc_ref, vc_ref, k, v, slots)
    store_kv_triton(kc, vc, k, v, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
