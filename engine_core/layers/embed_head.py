"""Vocab-parallel embedding and LM head. The vocab is padded to a multiple of tp_size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.layers.linear import LinearFn
from engine_core.layers.sharded import WeightOwner
from engine_core.parallel import TPContext


class VocabParallelEmbedding(WeightOwner):
    """Each rank holds a contiguous slice of vocab rows; lookups outside it give zeros, and the
    all-reduce fills them in from the owning rank (exactly one rank contributes a non-zero row)."""

    def __init__(self, vocab: int, hidden: int, tp: TPContext):
        super().__init__()
        self.tp = tp
        self.vocab = vocab
        self.rows = -(-vocab // tp.size)
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)

    def full_shape(self, leaf, shard_id=None):
        return (self.vocab, self.weight.shape[1])

    def shard_target(self, leaf, full, shard_id=None):
        return _vocab_rows(self.weight, self.start, self.rows, full)

    def padding_rows(self) -> int | None:
        return max(0, min(self.rows, self.vocab - self.start))


class ParallelLMHead(WeightOwner):
    """Logits for this rank's vocab slice, gathered across ranks and trimmed to the real vocab.

    When embeddings are tied it reuses the embedding's parameter and loads nothing itself.
    """

    def __init__(self, embed: VocabParallelEmbedding, tied: bool, fn: LinearFn):
        super().__init__()
        self.tp = embed.tp
        self.vocab = embed.vocab
        self.fn = fn
        self.tied = tied
        if tied:
            self._embed = [embed]  # a list hides it from nn.Module, so the weight is owned once
        else:
            self.weight = nn.Parameter(torch.zeros_like(embed.weight), requires_grad=False)
            self.start, self.rows = embed.start, embed.rows

    @property
    def head_weight(self) -> torch.Tensor:
        return self._embed[0].weight if self.tied else self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(self.fn(hidden, self.head_weight, None))
        return logits[..., : self.vocab]

    def loaded_leaves(self) -> tuple[str, ...]:
        return () if self.tied else ("weight",)  # tied: the embedding loads it

    def shard_view(self, leaf, shard_id=None):
        return self.head_weight if leaf == "weight" else None

    def full_shape(self, leaf, shard_id=None):
        return (self.vocab, self.head_weight.shape[1])

    def shard_target(self, leaf, full, shard_id=None):
        if self.tied:
            return self._embed[0].shard_target(leaf, full, shard_id)
        return _vocab_rows(self.weight, self.start, self.rows, full)

    def padding_rows(self) -> int | None:
        return None if self.tied else max(0, min(self.rows, self.vocab - self.start))


def _vocab_rows(weight: torch.Tensor, start: int, rows: int, full: torch.Tensor):
    """This rank's vocab rows of ``full``; padding rows beyond the real vocab stay zero."""
    count = max(0, min(start + rows, full.shape[0]) - start)
    return weight.narrow(0, 0, count), full.narrow(0, start, count)
