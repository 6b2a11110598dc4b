"""The shard protocol: how a layer that owns weights takes its part of a HF tensor.

Every module with loadable parameters derives from ``WeightOwner``; the loader, the checksum
gather and the rank's memory ask the protocol (which shards a HF name splits into, where a
shard goes, which rows are padding) instead of probing attributes.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightOwner(nn.Module):
    """A module whose parameters are loaded from HF tensors (one shard of them per TP rank)."""

    def shard_ids(self) -> tuple[object, ...]:
        """The parts one parameter is fused from, in HF order (``(None,)``: not fused)."""
        return (None,)

    def fused_rows(self) -> tuple[int, ...] | None:
        """Full (unsharded) rows of each part of a fused parameter, in ``shard_ids`` order, so a
        fused tensor (SGLang's ``qkv_proj`` / ``gate_up_proj`` names) splits into its parts;
        None when not fused."""
        return None

    def loaded_leaves(self) -> tuple[str, ...]:
        """Parameter leaves a complete checkpoint must provide for this module."""
        return tuple(leaf for leaf in ("weight", "bias") if getattr(self, leaf, None) is not None)

    def full_shape(self, leaf: str, shard_id: object = None) -> tuple[int, ...]:
        """The shape of the HF tensor (whole, not this rank's shard) behind ``leaf`` and
        ``shard_id``: the loader refuses any other, so nothing is cut short or left stale."""
        raise NotImplementedError

    def shard_target(
        self, leaf: str, full: torch.Tensor, shard_id: object = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(destination view of this rank's parameter, source slice of the HF tensor)``;
        shapes are validated by the caller."""
        raise NotImplementedError

    def shard_view(self, leaf: str, shard_id: object = None) -> torch.Tensor:
        """This rank's data behind one HF tensor (a view into a fused parameter)."""
        return getattr(self, leaf)

    def padding_rows(self) -> int | None:
        """First local row past the real vocabulary (rows that stay zero), if any."""
        return None
