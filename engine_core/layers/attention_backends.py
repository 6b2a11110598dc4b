"""The attention backends (chosen once per engine by ``layers.attention.choose_backend``).

Each builds the metadata it needs from a step's ``StepPlan`` once per step, and computes
attention for every layer from it. Only these and the model runner turn plans into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_core.layers.attention import (
    DecodeGroup,
    PagedAttention,
    PrefillSeq,
    sdpa_decode,
    sdpa_prefill,
)
from engine_core.scheduling.step_plan import StepPlan


def slot_mapping(plan: StepPlan, page_size: int, device: torch.device) -> torch.Tensor:
    """The cache slot of every token row of the step."""
    slots: list[int] = []
    for seq in plan.seqs:
        for pos in range(seq.start, seq.start + len(seq.token_ids)):
            slots.append(seq.pages[pos // page_size] * page_size + pos % page_size)
    return torch.tensor(slots, dtype=torch.long, device=device)


def _page_table(plan: StepPlan, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    width = max(len(s.pages) for s in plan.seqs)
    table = [s.pages + [0] * (width - len(s.pages)) for s in plan.seqs]
    return torch.tensor(table, dtype=dtype, device=device)


def _decode_rows(plan: StepPlan) -> tuple[list[int], int]:
    """Token rows of decoding sequences (one query each), and the step's row count."""
    rows, row = [], 0
    for seq in plan.seqs:
        if len(seq.token_ids) == 1:
            rows.append(row)
        row += len(seq.token_ids)
    return rows, row


def _prefill_seqs(plan: StepPlan, page_size: int, device: torch.device) -> list[PrefillSeq]:
    out, row = [], 0
    for seq in plan.seqs:
        q_len = len(seq.token_ids)
        if q_len > 1:
            kv_len = seq.start + q_len
            pages = seq.pages[: -(-kv_len // page_size)]
            q_pos = torch.arange(seq.start, kv_len, device=device).unsqueeze(1)
            mask = torch.arange(kv_len, device=device).unsqueeze(0) <= q_pos
            pages_t = torch.tensor(pages, dtype=torch.long, device=device)
            out.append(PrefillSeq(row, q_len, kv_len, pages_t, mask))
        row += q_len
    return out


# ---------------------------------------------------------------- SDPA (CPU, no C kernel)
@dataclass
class SdpaMeta:
    slot_mapping: torch.Tensor
    decode: DecodeGroup | None
    prefills: list[PrefillSeq]


class SdpaAttention:
    def build(self, plan: StepPlan, page_size: int, device: torch.device) -> SdpaMeta:
        return SdpaMeta(
            slot_mapping(plan, page_size, device),
            self._decode_group(plan, page_size, device),
            _prefill_seqs(plan, page_size, device),
        )

    @staticmethod
    def _decode_group(plan: StepPlan, page_size: int, device: torch.device):
        rows, total = _decode_rows(plan)
        if not rows:
            return None
        decoding = [s for s in plan.seqs if len(s.token_ids) == 1]
        lens = [s.start + 1 for s in decoding]
        tables = [s.pages[: -(-n // page_size)] for s, n in zip(decoding, lens)]
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        kv_pos = torch.arange(width * page_size, device=device)
        mask = kv_pos.unsqueeze(0) < torch.tensor(lens, device=device).unsqueeze(1)
        return DecodeGroup(
            rows=None
            if len(rows) == total
            else torch.tensor(rows, dtype=torch.long, device=device),
            page_table=torch.tensor(padded, dtype=torch.long, device=device),
            mask=mask.view(len(rows), 1, 1, -1),
        )

    def forward(self, layer: PagedAttention, q, k, v, meta: SdpaMeta) -> torch.Tensor:
        layer.write_kv(k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.decode is not None:
            sdpa_decode(layer, q, out, meta.decode)
        for seq in meta.prefills:
            sdpa_prefill(layer, q, out, seq)
        return out.view(q.shape[0], -1)


# ---------------------------------------------------------------- C kernel (CPU, fp32)
@dataclass
class RowsMeta:
    slot_mapping: torch.Tensor
    all_pages: torch.Tensor  # int64 [B, max_pages]
    row_seq: torch.Tensor  # int64 [T]: each token row's sequence (row of all_pages)
    row_pos: torch.Tensor  # int64 [T]: each token row's position


class CpuKernelAttention:
    """Every row -- decode and prefill -- through the C kernel, which reduces each query over
    its own KV in a fixed order (batch-invariant, so deterministic mode needs nothing more).
    It also beats SDPA over gathered pages on CPU for batches of short prompts (2.5x for 21
    prompts of 96 tokens) and is within ~7 % of it for one 2048-token prompt
    (docs/PERFORMANCE.md)."""

    def build(self, plan: StepPlan, page_size: int, device: torch.device) -> RowsMeta:
        row_seq, row_pos = [], []
        for index, seq in enumerate(plan.seqs):
            row_seq.extend([index] * len(seq.token_ids))
            row_pos.extend(range(seq.start, seq.start + len(seq.token_ids)))
        i64 = dict(dtype=torch.long, device=device)
        return RowsMeta(
            slot_mapping(plan, page_size, device),
            _page_table(plan, torch.long, device),
            torch.tensor(row_seq, **i64),
            torch.tensor(row_pos, **i64),
        )

    def forward(self, layer: PagedAttention, q, k, v, meta: RowsMeta) -> torch.Tensor:
        """C kernel over every query row: pages read in place, fixed reduction order."""
        from kernels.cpu_attention import paged_attention_rows

        layer.write_kv(k, v, meta.slot_mapping)
        out = paged_attention_rows(
            q, layer.k_cache, layer.v_cache, meta.all_pages, meta.row_seq, meta.row_pos, layer.scale
        )
        return out.view(q.shape[0], -1)


# ---------------------------------------------------------------- varlen kernel
@dataclass
class VarlenMeta:
    slot_mapping: torch.Tensor
    page_table: torch.Tensor  # int32 [B, max_pages]
    cu_q_lens: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]


class PagedKernelAttention:
    def build(self, plan: StepPlan, page_size: int, device: torch.device) -> VarlenMeta:
        cu = [0]
        for s in plan.seqs:
            cu.append(cu[-1] + len(s.token_ids))
        i32 = dict(dtype=torch.int32, device=device)
        return VarlenMeta(
            slot_mapping(plan, page_size, device),
            _page_table(plan, torch.int32, device),
            torch.tensor(cu, **i32),
            torch.tensor([s.start + len(s.token_ids) for s in plan.seqs], **i32),
        )

    def forward(self, layer: PagedAttention, q, k, v, meta: VarlenMeta) -> torch.Tensor:
        import kernels

        kernels.store_kv(layer.k_cache, layer.v_cache, k, v, meta.slot_mapping)
        o = kernels.paged_attention(
            q,
            layer.k_cache,
            layer.v_cache,
            meta.page_table,
            meta.cu_q_lens,
            meta.seq_lens,
            layer.scale,
        )
        return o.reshape(q.shape[0], -1)
