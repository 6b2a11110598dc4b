"""Paged attention over the KV cache: the layer, and the backends that compute it.

Cache layout per layer: ``[num_pages, page_size, num_kv_heads, head_dim]``. New K/V rows are
written by slot (``page * page_size + row``), then each query attends causally to its request's
cached KV. The backend is chosen once per engine (``choose_backend``); it builds its own
metadata from a step's plan once per step (``build``), which every layer then uses:

- ``PagedKernelAttention``: the varlen kernel ``kernels.paged_attention`` (Triton on CUDA; its
  batch-invariant torch reference on a CPU without the C kernel in deterministic mode);
- ``CpuKernelAttention``: fp32 on CPU: the C kernel reads pages in place, every row (decode
  and prefill) through it, in both modes;
- ``SdpaAttention``: CPU without the C kernel: all decode rows in one SDPA call (GQA folded
  into the query axis), one SDPA per prefill chunk, over gathered pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.scheduling.step_plan import StepPlan


class AttentionBackend(Protocol):
    def build(self, plan: StepPlan, page_size: int, device: torch.device) -> object: ...
    def forward(self, layer: PagedAttention, q, k, v, meta) -> torch.Tensor: ...


class PagedAttention(nn.Module):
    """Attention for this rank's heads; K/V caches are bound by the rank's KV cache."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = scale
        self.backend = backend
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hk, D] -> [T, Hq * D]."""
        return self.backend.forward(self, q, k, v, meta)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, k)
        self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, v)


def choose_backend(device: torch.device, dtype: torch.dtype, deterministic: bool):
    """The one attention backend of an engine (see the module docstring)."""
    from engine_core.layers import attention_backends as b

    if device.type == "cuda":
        return b.PagedKernelAttention()
    from kernels import cpu_attention

    if dtype == torch.float32 and cpu_attention.available():
        return b.CpuKernelAttention()
    if deterministic:  # no C kernel (no compiler, or not fp32): the batch-invariant reference
        return b.PagedKernelAttention()
    return b.SdpaAttention()


# ---------------------------------------------------------------- SDPA pieces (CPU)
@dataclass
class DecodeGroup:
    """Decode rows (one query each) batched together; ``mask`` is True where a row may attend."""

    rows: torch.Tensor | None  # indices into the step's tokens; None when every row decodes
    page_table: torch.Tensor  # int64 [B, max_pages]
    mask: torch.Tensor  # bool [B, 1, 1, max_pages * page_size]


@dataclass
class PrefillSeq:
    """One request's chunk of ``q_len`` new tokens ending at KV length ``kv_len``."""

    row_start: int
    q_len: int
    kv_len: int
    pages: torch.Tensor  # int64 [ceil(kv_len / page_size)]
    mask: torch.Tensor  # bool [q_len, kv_len]


def gather_pages(layer: PagedAttention, cache: torch.Tensor, page_table: torch.Tensor):
    """[B, max_pages] page ids -> [B, Hk, max_pages * page_size, D]."""
    batch = page_table.shape[0]
    return cache[page_table].view(batch, -1, layer.num_kv_heads, layer.head_dim).transpose(1, 2)


def sdpa_decode(layer: PagedAttention, q: torch.Tensor, out: torch.Tensor, group: DecodeGroup):
    qd = q if group.rows is None else q[group.rows]
    batch = qd.shape[0]
    # [B, Hk, G, D]: the G query heads sharing a KV head act as G query rows.
    qd = qd.view(batch, layer.num_kv_heads, layer.group, layer.head_dim)
    keys = gather_pages(layer, layer.k_cache, group.page_table)
    values = gather_pages(layer, layer.v_cache, group.page_table)
    o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=group.mask, scale=layer.scale)
    o = o.reshape(batch, layer.num_heads, layer.head_dim)
    if group.rows is None:
        out.copy_(o)
    else:
        out[group.rows] = o


def sdpa_prefill(layer: PagedAttention, q: torch.Tensor, out: torch.Tensor, seq: PrefillSeq):
    n, hk, g, d = seq.q_len, layer.num_kv_heads, layer.group, layer.head_dim
    qs = q[seq.row_start : seq.row_start + n].view(n, hk, g, d).permute(1, 2, 0, 3)
    qs = qs.reshape(1, hk, g * n, d)
    keys = gather_pages(layer, layer.k_cache, seq.pages.unsqueeze(0))[:, :, : seq.kv_len]
    values = gather_pages(layer, layer.v_cache, seq.pages.unsqueeze(0))[:, :, : seq.kv_len]
    mask = seq.mask.repeat(g, 1)  # rows are (head-in-group, position)
    o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=layer.scale)
    o = o.view(hk, g, n, d).permute(2, 0, 1, 3).reshape(n, layer.num_heads, d)
    out[seq.row_start : seq.row_start + n] = o
