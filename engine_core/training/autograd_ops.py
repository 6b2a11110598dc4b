"""Differentiable forms of the engine's batch-invariant ops, for the trainer's model.

The forward of each is the engine's own kernel, so its values are bitwise the engine's; the
backward is the exact gradient of the same mathematical function computed with plain torch (a
kernel's reduction order changes the last bits of a forward, never what the gradient means).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class _KernelLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fn):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with torch.no_grad():
            return fn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = flat_grad.t() @ flat_x if ctx.needs_input_grad[1] else None
        grad_b = flat_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def differentiable_linear(fn: LinearFn) -> LinearFn:
    """``fn`` (a batch-invariant linear: forward values bitwise ``fn``'s) with linear's grads."""
    if fn is F.linear:
        return fn

    def linear(x, weight, bias=None):
        if not torch.is_grad_enabled():
            return fn(x, weight, bias)
        return _KernelLinear.apply(x, weight, bias, fn)

    return linear


@dataclass
class SequenceLayout:
    """How packed token rows form sequences, in the engine's terms: a scratch paged cache
    (``page_size`` slots per page), each sequence's pages, and each row's sequence and
    position. Built once per forward by ``PolicyModel``; used by every layer."""

    page_size: int
    num_pages: int
    slots: torch.Tensor  # int64 [T]: the cache slot of each row's K/V
    page_table: torch.Tensor  # int64 [B, max_pages]
    row_seq: torch.Tensor  # int64 [T]
    row_pos: torch.Tensor  # int64 [T]
    cu_lens: list[int]  # row offsets of the sequences, [B + 1]

    @classmethod
    def of(cls, lengths: list[int], page_size: int, device: torch.device) -> SequenceLayout:
        slots, table, row_seq, row_pos, cu = [], [], [], [], [0]
        next_page = 0
        for index, length in enumerate(lengths):
            pages = list(range(next_page, next_page + -(-length // page_size)))
            next_page += len(pages)
            table.append(pages)
            slots.extend(pages[p // page_size] * page_size + p % page_size for p in range(length))
            row_seq.extend([index] * length)
            row_pos.extend(range(length))
            cu.append(cu[-1] + length)
        width = max(len(t) for t in table)
        table = [t + [0] * (width - len(t)) for t in table]
        i64 = dict(dtype=torch.long, device=device)
        return cls(
            page_size,
            max(next_page, 1),
            torch.tensor(slots, **i64),
            torch.tensor(table, **i64),
            torch.tensor(row_seq, **i64),
            torch.tensor(row_pos, **i64),
            cu,
        )


def reference_attention(q, k, v, layout: SequenceLayout, scale: float) -> torch.Tensor:
    """Causal attention per sequence with plain torch (differentiable); q [T, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    outs = []
    for start, end in zip(layout.cu_lens, layout.cu_lens[1:]):
        qs = q[start:end].transpose(0, 1)  # [Hq, L, D]
        ks = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


class _KernelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, kernel):
        ctx.save_for_backward(q, k, v)
        ctx.layout, ctx.scale = layout, scale
        with torch.no_grad():
            return kernel(q, k, v, layout, scale)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = reference_attention(*inputs, ctx.layout, ctx.scale)
            grads = torch.autograd.grad(out, inputs, grad)
        return (*grads, None, None, None)


def _scratch_cache(k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout):
    shape = (layout.num_pages, layout.page_size, k.shape[1], k.shape[2])
    k_cache = k.new_zeros(shape)
    v_cache = v.new_zeros(shape)
    k_cache.view(-1, k.shape[1], k.shape[2]).index_copy_(0, layout.slots, k)
    v_cache.view(-1, v.shape[1], v.shape[2]).index_copy_(0, layout.slots, v)
    return k_cache, v_cache


def c_kernel_attention(q, k, v, layout: SequenceLayout, scale: float) -> torch.Tensor:
    """The engine's C kernel (deterministic mode on CPU): every row in its fixed order."""
    from kernels.cpu_attention import paged_attention_rows

    k_cache, v_cache = _scratch_cache(k, v, layout)
    return paged_attention_rows(
        q, k_cache, v_cache, layout.page_table, layout.row_seq, layout.row_pos, scale
    )


def varlen_kernel_attention(q, k, v, layout: SequenceLayout, scale: float) -> torch.Tensor:
    """``kernels.paged_attention`` (Triton on CUDA, its batch-invariant torch reference on a
    CPU without the C kernel): the engine's deterministic path there."""
    import kernels

    k_cache, v_cache = _scratch_cache(k, v, layout)
    i32 = dict(dtype=torch.int32, device=q.device)
    lens = [b - a for a, b in zip(layout.cu_lens, layout.cu_lens[1:])]
    return kernels.paged_attention(
        q,
        k_cache,
        v_cache,
        layout.page_table.to(torch.int32),
        torch.tensor(layout.cu_lens, **i32),
        torch.tensor(lens, **i32),
        scale,
    )


class TrainingAttention:
    """An attention backend for ``PagedAttention`` layers over whole sequences (no KV cache
    kept): ``kernel`` gives the forward (None: plain torch, differentiable as it is)."""

    def __init__(self, kernel: Callable | None) -> None:
        self.kernel = kernel

    def forward(self, layer, q, k, v, layout: SequenceLayout) -> torch.Tensor:
        if self.kernel is None:
            out = reference_attention(q, k, v, layout, layer.scale)
        elif torch.is_grad_enabled():
            out = _KernelAttention.apply(q, k, v, layout, layer.scale, self.kernel)
        else:
            out = self.kernel(q, k, v, layout, layer.scale)
        return out.reshape(q.shape[0], -1)
