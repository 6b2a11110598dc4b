"""Checksums a trainer compares with an engine's ``get_weights_checksum`` after a refit.

The checksum of a tensor is the SHA-256 (hex) of its raw bytes in row-major order -- dtype and
shape are not hashed, so compare tensors in the engine's dtype: a bf16 trainer checking an fp32
engine hashes ``t.float()``. The engine hashes the full (TP-gathered) tensor behind each
Hugging Face name, so the trainer hashes exactly what it sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch


def tensor_checksum(tensor: torch.Tensor) -> str:
    """SHA-256 hex digest of ``tensor``'s bytes (any device, dtype, layout; 0-d and empty ok)."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()  # no extra copy


def checksums_of(
    named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype | None = None,
) -> dict[str, str]:
    """``{name: tensor_checksum(t)}``; ``dtype`` casts first (the engine's dtype)."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    return {name: tensor_checksum(t if dtype is None else t.to(dtype)) for name, t in items}
