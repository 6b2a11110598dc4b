"""RoPE tables gathered once per step (issue 15) rotate as HF's rotate-half does, and give the
same bits as the per-call path (so HF parity and the trainer's bit-exact logprobs hold)."""

from __future__ import annotations

import torch

from engine_core.layers.rotary import RotaryEmbedding, apply_rope


def test_rope_tables_once_per_step_rotate_as_hf():
    dim, theta = 64, 10000.0
    rope = RotaryEmbedding(dim, 512, theta, {})
    positions = torch.tensor([0, 5, 17, 511, 3])
    q, k = torch.randn(5, 4, dim), torch.randn(5, 2, dim)
    # HF reference: angles from inv_freq at each position, rotate-half layout
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    ang = positions.float()[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None]

    def rot(x):
        return torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1)

    tables = rope.tables(positions, torch.float32)
    q2, k2 = apply_rope(tables, q, k)
    torch.testing.assert_close(q2, q * cos + rot(q) * sin, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(k2, k * cos + rot(k) * sin, rtol=1e-5, atol=1e-4)
    q3, k3 = rope(positions, q, k)  # the per-call path gives the same bits
    assert torch.equal(q2, q3) and torch.equal(k2, k3)
