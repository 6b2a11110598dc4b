"""The elementwise ops of a decoder layer (RMSNorm, residual add + RMSNorm, SiLU-mul, RoPE on
the fused qkv output), chosen once per engine like the matmul and the attention backend.

- ``TorchElementwise``: the plain-torch formulas (HF's semantics; every device and dtype).
- ``CpuFusedElementwise``: one C pass each (``kernels.cpu_fused``) for contiguous fp32 CPU
  tensors, torch for anything else. RoPE is bitwise torch's; the norms and SiLU are within a
  few ulp of it (another summation order, a polynomial exp), batch invariant either way.

Both are batch invariant (each row computed alone, in a fixed order), so deterministic mode
uses the fused ops too; the trainer's ``PolicyModel`` runs the same kernels forward, with the
torch formulas' gradients (``training.autograd_elementwise``), so its logprobs stay the
engine's bit for bit.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from engine_core.layers.rotary import RopeTables, apply_rope


class Elementwise(Protocol):
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...

    def rope_qkv(
        self, rope: RopeTables, qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def split_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """[T, (H + 2 Hk) D] -> q [T, H, D], k and v [T, Hk, D] (views)."""
    tokens = qkv.shape[0]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (
        q.reshape(tokens, heads, head_dim),
        k.reshape(tokens, kv_heads, head_dim),
        v.reshape(tokens, kv_heads, head_dim),
    )


class TorchElementwise:
    def rms_norm(self, x, weight, eps):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(dtype)

    def add_rms_norm(self, x, delta, weight, eps):
        total = x + delta
        return total, self.rms_norm(total, weight, eps)

    def silu_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_qkv(self, rope, qkv, heads, kv_heads, head_dim):
        q, k, v = split_qkv(qkv, heads, kv_heads, head_dim)
        q, k = apply_rope(rope, q, k)
        return q, k, v


class CpuFusedElementwise:
    def __init__(self) -> None:
        from kernels import cpu_fused

        self.kernels = cpu_fused
        self.torch = TorchElementwise()

    def rms_norm(self, x, weight, eps):
        if self.kernels.takes(x) and weight.dtype == torch.float32:
            return self.kernels.rms_norm(x, weight, eps)
        return self.torch.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, delta, weight, eps):
        if self.kernels.takes(x) and delta.dtype == x.dtype and weight.dtype == torch.float32:
            return self.kernels.add_rms_norm(x, delta, weight, eps)
        return self.torch.add_rms_norm(x, delta, weight, eps)

    def silu_mul(self, gate_up):
        if self.kernels.takes(gate_up):
            return self.kernels.silu_mul(gate_up)
        return self.torch.silu_mul(gate_up)

    def rope_qkv(self, rope, qkv, heads, kv_heads, head_dim):
        cos, sin = rope
        if self.kernels.takes(qkv) and qkv.dim() == 2 and cos.dtype == torch.float32:
            self.kernels.rope_qk_(qkv, cos, sin, heads, kv_heads, head_dim)  # in place
            return split_qkv(qkv, heads, kv_heads, head_dim)
        return self.torch.rope_qkv(rope, qkv, heads, kv_heads, head_dim)


TORCH = TorchElementwise()


def choose_elementwise(device: torch.device, dtype: torch.dtype):
    """Fused C ops for fp32 on CPU where they build; torch otherwise."""
    if device.type != "cpu" or dtype != torch.float32:
        return TORCH
    from kernels import cpu_fused

    return CpuFusedElementwise() if cpu_fused.available() else TORCH
