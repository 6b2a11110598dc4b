"""Wire metadata for one weight update: pure Python, picklable and JSON-able.

An :class:`UpdatePlan` is computed once per update on the trainer and shipped to every engine in
ONE RPC; afterwards only raw bucket bytes travel. Dtypes are strings such as ``"float32"`` or
``"bfloat16"`` (``str(torch.float32)`` without the ``torch.`` prefix) so the metadata never needs
torch to be unpickled/parsed.

Layout contract: a bucket is a flat 1-D buffer of ``numel`` elements of ``dtype``; tensor ``t``
occupies elements ``[t.offset, t.offset + t.numel)`` and is row-major with ``t.shape``. Tensors in
a bucket are ordered by offset and never overlap.
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


def dtype_to_str(dtype: torch.dtype) -> str:
    """``torch.bfloat16 -> "bfloat16"``; raises ``TypeError`` for non-dtypes."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"expected a torch.dtype, got {dtype!r}")
    return str(dtype).removeprefix("torch.")


def dtype_from_str(name: str) -> torch.dtype:
    """``"bfloat16" -> torch.bfloat16``; raises ``ValueError`` for unknown names.

    Only canonical names are accepted (``"float32"``, not the alias ``"float"``) so that string
    comparisons between plans and tensors are exact.
    """
    if not isinstance(name, str):
        raise ValueError(f"unknown dtype string {name!r}")
    return _dtype_from_str(name)


@functools.lru_cache(maxsize=64)  # every TensorMeta of a plan checks its dtype: keep it cheap
def _dtype_from_str(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype string {name!r}")
    if dtype_to_str(dtype) != name:
        raise ValueError(f"non-canonical dtype string {name!r}; use {dtype_to_str(dtype)!r}")
    return dtype


def element_size(dtype: str) -> int:
    """Bytes per element of a dtype string."""
    return dtype_from_str(dtype).itemsize


@dataclass(frozen=True)
class TensorMeta:
    """One named tensor inside a bucket (``offset``/``numel`` are in elements, not bytes)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    numel: int

    def __post_init__(self) -> None:
        # JSON turns tuples into lists: normalise so equality and hashing keep working.
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        dtype_from_str(self.dtype)
        if not self.name:
            raise ValueError("tensor name must be non-empty")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"{self.name}: negative dimension in shape {self.shape}")
        if self.numel != math.prod(self.shape):
            raise ValueError(f"{self.name}: numel {self.numel} != prod(shape {self.shape})")
        if self.offset < 0:
            raise ValueError(f"{self.name}: negative offset {self.offset}")


@dataclass(frozen=True)
class BucketMeta:
    """A flat per-dtype bucket: ``numel`` elements of ``dtype`` holding ``tensors``."""

    dtype: str
    numel: int
    tensors: tuple[TensorMeta, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        dtype_from_str(self.dtype)
        end = 0
        for t in self.tensors:
            if t.dtype != self.dtype:
                raise ValueError(f"{t.name}: dtype {t.dtype} in a {self.dtype} bucket")
            if t.offset < end:
                raise ValueError(f"{t.name}: offset {t.offset} overlaps the previous tensor")
            end = t.offset + t.numel
        if end > self.numel:
            raise ValueError(f"bucket numel {self.numel} smaller than its tensors ({end})")

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


@dataclass(frozen=True)
class UpdatePlan:
    """All buckets of one update, in streaming order, tagged with the trainer's weight version.

    ``weight_version`` is an int (e.g. the training step) or a string (the engine's version
    label); it is echoed in errors and covered by :meth:`fingerprint`.
    """

    buckets: tuple[BucketMeta, ...]
    weight_version: int | str

    def __post_init__(self) -> None:
        object.__setattr__(self, "buckets", tuple(self.buckets))
        if isinstance(self.weight_version, bool) or not isinstance(self.weight_version, int | str):
            raise ValueError(f"weight_version must be int or str, got {self.weight_version!r}")
        names = [t.name for b in self.buckets for t in b.tensors]
        if len(names) != len(set(names)):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate tensor names in plan: {dup[:5]}")

    @property
    def num_tensors(self) -> int:
        return sum(len(b.tensors) for b in self.buckets)

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def names(self) -> list[str]:
        return [t.name for b in self.buckets for t in b.tensors]

    def fingerprint(self) -> int:
        """CRC32 of the canonical JSON: lets receivers check they hold the sender's plan."""
        return zlib.crc32(self.to_json().encode())

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight_version": self.weight_version,
            "buckets": [
                {
                    "dtype": b.dtype,
                    "numel": b.numel,
                    "tensors": [[t.name, list(t.shape), t.offset, t.numel] for t in b.tensors],
                }
                for b in self.buckets
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UpdatePlan:
        buckets = [
            BucketMeta(
                dtype=b["dtype"],
                numel=int(b["numel"]),
                tensors=[
                    TensorMeta(name, b["dtype"], tuple(shape), int(offset), int(numel))
                    for name, shape, offset, numel in b["tensors"]
                ],
            )
            for b in data["buckets"]
        ]
        return cls(buckets=tuple(buckets), weight_version=data["weight_version"])

    @classmethod
    def from_json(cls, text: str) -> UpdatePlan:
        return cls.from_dict(json.loads(text))
