"""The fused elementwise C kernels (``kernels/cpu_fused.py``) against plain torch: RoPE bitwise
equal to ``apply_rope``; RMSNorm and SiLU-mul against float64 references; every row the same
bits alone as in any batch, at any thread count; and the engine's two ``Elementwise`` choices
agreeing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_core.layers.elementwise import CpuFusedElementwise, TorchElementwise, split_qkv
from engine_core.layers.rotary import RotaryEmbedding, apply_rope
from kernels import cpu_fused

pytestmark = pytest.mark.skipif(not cpu_fused.available(), reason="no C compiler / AVX2+FMA")
TOL = {"rtol": 1e-5, "atol": 1e-5}  # a few ulp: another summation order, a polynomial exp


def rms_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.double()
    return (w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).float()


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    heads=st.integers(1, 6),
    kv_heads=st.integers(1, 3),
    half=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_rope_is_bitwise_torch(rows, heads, kv_heads, half, seed):
    head_dim = 2 * half
    qkv = randn(rows, (heads + 2 * kv_heads) * head_dim, seed=seed, scale=3.0)
    rope = RotaryEmbedding(head_dim, 512, 10000.0, {})
    positions = torch.randint(0, 512, (rows,), generator=torch.Generator().manual_seed(seed))
    tables = rope.tables(positions, torch.float32)
    q, k, v = split_qkv(qkv, heads, kv_heads, head_dim)
    want_q, want_k = apply_rope(tables, q, k)
    got = cpu_fused.rope_qk_(qkv.clone(), tables.cos, tables.sin, heads, kv_heads, head_dim)
    got_q, got_k, got_v = split_qkv(got, heads, kv_heads, head_dim)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(got_v, v)  # v is left alone


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), dim=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_norms_match_the_float64_reference(rows, dim, seed):
    x, d = randn(rows, dim, seed=seed, scale=4.0), randn(rows, dim, seed=seed + 1)
    w = randn(dim, seed=seed + 2)
    eps = 1e-5
    torch.testing.assert_close(cpu_fused.rms_norm(x, w, eps), rms_reference(x, w, eps), **TOL)
    total, normed = cpu_fused.add_rms_norm(x, d, w, eps)
    assert torch.equal(total, x + d)  # one IEEE add per element, as torch does
    torch.testing.assert_close(normed, rms_reference(x + d, w, eps), **TOL)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), inter=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_silu_mul_matches_the_float64_reference(rows, inter, seed):
    gate_up = randn(rows, 2 * inter, seed=seed, scale=6.0)
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(cpu_fused.silu_mul(gate_up), (F.silu(gate) * up).float(), **TOL)


def test_silu_mul_extremes():
    gate = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 87.0, -87.0, 100.0, -100.0] * 2)
    up = torch.ones_like(gate)
    got = cpu_fused.silu_mul(torch.cat([gate, up]).unsqueeze(0))[0]
    want = F.silu(gate.double()).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-30)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_are_batch_and_thread_invariant(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows, dim, inter = 200, 576, 1536  # big enough for the parallel path
        x, d, w = randn(rows, dim, seed=1), randn(rows, dim, seed=2), randn(dim, seed=3)
        gate_up = randn(rows, 2 * inter, seed=4)
        batch = (cpu_fused.add_rms_norm(x, d, w, 1e-6)[1], cpu_fused.silu_mul(gate_up))
        for r in (0, 7, 199):
            alone = (
                cpu_fused.add_rms_norm(x[r : r + 1], d[r : r + 1], w, 1e-6)[1],
                cpu_fused.silu_mul(gate_up[r : r + 1]),
            )
            assert torch.equal(batch[0][r], alone[0][0]) and torch.equal(batch[1][r], alone[1][0])
    finally:
        torch.set_num_threads(before)


def test_fused_elementwise_agrees_with_torch_and_falls_back():
    fused, plain = CpuFusedElementwise(), TorchElementwise()
    x, w = randn(5, 64, seed=5), randn(64, seed=6)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6), plain.rms_norm(x, w, 1e-6))
    t = x.t()  # not contiguous: the torch formula, bit for bit
    assert torch.equal(fused.rms_norm(t, w[:5], 1e-6), plain.rms_norm(t, w[:5], 1e-6))
    bf = x.to(torch.bfloat16)
    assert torch.equal(fused.silu_mul(bf), plain.silu_mul(bf))


def test_engines_choose_fused_ops_only_for_fp32_cpu():
    from engine_core.layers.elementwise import TORCH, choose_elementwise

    cpu = torch.device("cpu")
    assert isinstance(choose_elementwise(cpu, torch.float32), CpuFusedElementwise)
    assert choose_elementwise(cpu, torch.bfloat16) is TORCH
    assert choose_elementwise(torch.device("meta"), torch.float32) is TORCH
