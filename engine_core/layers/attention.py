"""Paged attention over the KV cache.

Cache layout per layer: ``[num_pages, page_size, num_kv_heads, head_dim]``. New K/V rows are
written by slot (``page * page_size + row``), then each query attends causally to its request's
cached KV. On CUDA the Triton kernel from ``kernels`` runs; on CPU this module batches all decode
rows into one SDPA call (GQA folded into the query axis) and runs one SDPA per prefill chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
    mask: torch.Tensor | None  # bool [q_len, kv_len]; None for a causal prefill from position 0


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step; built once by the runner, used by all layers."""

    slot_mapping: torch.Tensor  # int64 [T]
    decode: DecodeGroup | None
    prefills: list[PrefillSeq]
    # Row form for the C kernel: every token row's request (row of all_pages) and position.
    all_pages: torch.Tensor | None = None  # int64 [B, max_pages]
    row_seq: torch.Tensor | None = None  # int64 [T]
    row_pos: torch.Tensor | None = None  # int64 [T]
    fixed_order: bool = False  # deterministic mode: every row through the batch-invariant kernel
    kernel_path: bool = False  # use kernels.paged_attention (Triton on CUDA, reference on CPU)
    # Varlen form for the Triton kernel (CUDA): int32 tensors.
    page_table: torch.Tensor | None = None
    cu_q_lens: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None


class PagedAttention(nn.Module):
    """Attention for this rank's heads; K/V caches are bound by the model runner."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q: [T, Hq, D]; k, v: [T, Hk, D] -> [T, Hq * D]."""
        if q.is_cuda or meta.kernel_path:
            return self._forward_kernels(q, k, v, meta)
        page_size = self.k_cache.shape[1]
        flat_k = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_k.index_copy_(0, meta.slot_mapping, k)
        flat_v.index_copy_(0, meta.slot_mapping, v)
        if meta.fixed_order:
            return self._rows(q, meta, None).view(q.shape[0], -1)
        out = torch.empty_like(q)
        if meta.decode is not None:
            if meta.row_seq is not None:
                rows = meta.decode.rows
                o = self._rows(q if rows is None else q[rows], meta, rows)
                if rows is None:
                    out = o
                else:
                    out[rows] = o
            else:
                self._decode(q, out, meta.decode)
        for seq in meta.prefills:
            self._prefill(q, out, seq, page_size)
        return out.view(q.shape[0], -1)

    def _rows(self, q: torch.Tensor, meta: AttentionMetadata, rows: torch.Tensor | None):
        """C kernel over the given query rows: pages read in place, fixed reduction order."""
        from kernels.cpu_attention import paged_attention_rows

        row_seq, row_pos = meta.row_seq, meta.row_pos
        if rows is not None:
            row_seq, row_pos = row_seq[rows], row_pos[rows]
        return paged_attention_rows(
            q, self.k_cache, self.v_cache, meta.all_pages, row_seq, row_pos, self.scale
        )

    def _decode(self, q: torch.Tensor, out: torch.Tensor, group: DecodeGroup) -> None:
        qd = q if group.rows is None else q[group.rows]
        batch = qd.shape[0]
        # [B, Hk, G, D]: the G query heads sharing a KV head act as G query rows.
        qd = qd.view(batch, self.num_kv_heads, self.group, self.head_dim)
        keys = self._gather(self.k_cache, group.page_table)
        values = self._gather(self.v_cache, group.page_table)
        o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=group.mask, scale=self.scale)
        o = o.reshape(batch, self.num_heads, self.head_dim)
        if group.rows is None:
            out.copy_(o)
        else:
            out[group.rows] = o

    def _gather(self, cache: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
        """[B, max_pages] page ids -> [B, Hk, max_pages * page_size, D]."""
        batch = page_table.shape[0]
        return cache[page_table].view(batch, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)

    def _prefill(self, q: torch.Tensor, out: torch.Tensor, seq: PrefillSeq, page_size: int) -> None:
        n, hk, g, d = seq.q_len, self.num_kv_heads, self.group, self.head_dim
        qs = q[seq.row_start : seq.row_start + n].view(n, hk, g, d).permute(1, 2, 0, 3)
        qs = qs.reshape(1, hk, g * n, d)
        keys = self._gather(self.k_cache, seq.pages.unsqueeze(0))[:, :, : seq.kv_len]
        values = self._gather(self.v_cache, seq.pages.unsqueeze(0))[:, :, : seq.kv_len]
        if seq.mask is None:
            # Rows are (head-in-group, position); causal per position, so build the tiled mask.
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril_()
        else:
            mask = seq.mask
        mask = mask.repeat(g, 1)
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=self.scale)
        o = o.view(hk, g, n, d).permute(2, 0, 1, 3).reshape(n, self.num_heads, d)
        out[seq.row_start : seq.row_start + n] = o

    def _forward_kernels(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        import kernels

        kernels.store_kv(self.k_cache, self.v_cache, k, v, meta.slot_mapping)
        o = kernels.paged_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.page_table,
            meta.cu_q_lens,
            meta.seq_lens,
            self.scale,
        )
        return o.reshape(q.shape[0], -1)
