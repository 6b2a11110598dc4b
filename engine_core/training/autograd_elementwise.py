"""The engine's fused elementwise ops (``layers.elementwise``) made differentiable for the
trainer's model: the forward is the engine's kernel (so its values are the engine's, bit for
bit), the backward is the gradient of the plain-torch formula (``TorchElementwise``) at the
same inputs -- the same mathematical function, so the same gradient up to rounding."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine_core.layers.elementwise import Elementwise, TorchElementwise, split_qkv


class _KernelForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: Callable, reference: Callable, *inputs: torch.Tensor):
        ctx.reference = reference
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return kernel(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(need) for t, need in
                  zip(ctx.saved_tensors, ctx.needs_input_grad[2:])]  # fmt: skip
        with torch.enable_grad():
            outs = ctx.reference(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        wanted = [t for t in inputs if t.requires_grad]
        got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True) if wanted else ())
        return (None, None, *(next(got) if t.requires_grad else None for t in inputs))


def _run(kernel: Callable, reference: Callable, *inputs: torch.Tensor):
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
        return kernel(*inputs)
    return _KernelForward.apply(kernel, reference, *inputs)


class DifferentiableElementwise:
    """``fused``'s values with the torch formulas' gradients."""

    def __init__(self, fused: Elementwise) -> None:
        self.fused = fused
        self.torch = TorchElementwise()

    def rms_norm(self, x, weight, eps):
        return _run(
            lambda a, w: self.fused.rms_norm(a, w, eps),
            lambda a, w: self.torch.rms_norm(a, w, eps),
            x,
            weight,
        )

    def add_rms_norm(self, x, delta, weight, eps):
        return _run(
            lambda a, d, w: self.fused.add_rms_norm(a, d, w, eps),
            lambda a, d, w: self.torch.add_rms_norm(a, d, w, eps),
            x,
            delta,
            weight,
        )

    def silu_mul(self, gate_up):
        return _run(self.fused.silu_mul, self.torch.silu_mul, gate_up)

    def rope_qkv(self, rope, qkv, heads, kv_heads, head_dim):
        def rotated(ew: Elementwise) -> Callable:
            def run(t: torch.Tensor) -> torch.Tensor:
                # the fused kernel rotates in place: never the caller's tensor
                q, k, v = ew.rope_qkv(rope, t.clone(), heads, kv_heads, head_dim)
                return torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=-1)

            return run

        out = _run(rotated(self.fused), rotated(self.torch), qkv)
        return split_qkv(out, heads, kv_heads, head_dim)


def differentiable_elementwise(ew: Elementwise) -> Elementwise:
    """``ew`` with gradients (the torch formulas are differentiable as they are)."""
    return ew if isinstance(ew, TorchElementwise) else DifferentiableElementwise(ew)
