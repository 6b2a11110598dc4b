"""The trainer's differentiable forms of the fused elementwise ops: forward values bitwise the
engine's kernels', gradients equal to the torch formulas' (same function, rounding apart)."""

from __future__ import annotations

import pytest
import torch

from engine_core.layers.elementwise import CpuFusedElementwise, TorchElementwise
from engine_core.layers.rotary import RotaryEmbedding
from engine_core.training.autograd_elementwise import differentiable_elementwise
from kernels import cpu_fused

pytestmark = pytest.mark.skipif(not cpu_fused.available(), reason="no C compiler / AVX2+FMA")


def leaf(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).requires_grad_(True)


def grads(fn, *inputs):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(9)) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return outs, torch.autograd.grad(loss, inputs)


CASES = {
    "rms_norm": (lambda ew, x, w: ew.rms_norm(x, w, 1e-6), [(7, 64), (64,)]),
    "add_rms_norm": (lambda ew, x, d, w: ew.add_rms_norm(x, d, w, 1e-6), [(7, 64), (7, 64), (64,)]),
    "silu_mul": (lambda ew, g: ew.silu_mul(g), [(7, 96)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_values_are_the_kernels_and_gradients_the_formulas(name):
    op, shapes = CASES[name]
    fused, plain = CpuFusedElementwise(), TorchElementwise()
    trainer = differentiable_elementwise(fused)
    inputs = [leaf(*s, seed=i) for i, s in enumerate(shapes)]
    outs, got = grads(lambda *a: op(trainer, *a), *inputs)
    with torch.no_grad():
        engine = op(fused, *[t.detach() for t in inputs])
    engine = engine if isinstance(engine, tuple) else (engine,)
    assert all(torch.equal(o, e) for o, e in zip(outs, engine))
    _, want = grads(lambda *a: op(plain, *a), *inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_rope_gradient_and_input_left_alone():
    heads, kv_heads, head_dim = 3, 1, 16
    tables = RotaryEmbedding(head_dim, 64, 10000.0, {}).tables(torch.arange(5), torch.float32)
    qkv = leaf(5, (heads + 2 * kv_heads) * head_dim, seed=3)
    before = qkv.detach().clone()
    trainer = differentiable_elementwise(CpuFusedElementwise())
    outs, got = grads(lambda t: trainer.rope_qkv(tables, t, heads, kv_heads, head_dim), qkv)
    assert torch.equal(qkv.detach(), before)  # the in-place kernel ran on a copy
    plain_outs, want = grads(
        lambda t: TorchElementwise().rope_qkv(tables, t, heads, kv_heads, head_dim), qkv
    )
    assert all(torch.equal(a, b) for a, b in zip(outs, plain_outs))  # RoPE: bitwise torch
    torch.testing.assert_close(got[0], want[0])


def test_torch_formulas_stay_as_they_are():
    plain = TorchElementwise()
    assert differentiable_elementwise(plain) is plain
