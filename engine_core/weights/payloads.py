"""How a refit's tensors reach the ranks: the payload shapes the refit verbs accept, and the
shared segments a TP engine packs in-process tensors into (each rank maps them, no copy)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch

from engine_core.weights.sglang_payloads import FLATTENED_BUCKET  # also our bucket handles
from weight_sync import (
    DEFAULT_BUCKET_BYTES,
    BucketHandle,
    ColocatedBuckets,
    SegmentPool,
    UpdatePlan,
)


def plan_of(names: Any) -> UpdatePlan | None:
    """The bucket protocol's plan if ``names`` is one (object, dict or JSON), else None."""
    if isinstance(names, UpdatePlan):
        return names
    if isinstance(names, str):
        return UpdatePlan.from_json(names)
    if isinstance(names, Mapping) and "buckets" in names:
        return UpdatePlan.from_dict(names)
    return None


def handles_of(named_tensors: Any, load_format: str | None) -> list[BucketHandle] | None:
    """Colocated bucket handles if that is what was passed, else None (named tensors)."""
    if isinstance(named_tensors, ColocatedBuckets):
        named_tensors = named_tensors.handles
    items = list(named_tensors) if isinstance(named_tensors, list | tuple) else None
    is_handles = bool(items) and all(isinstance(h, BucketHandle) for h in items)
    if load_format == FLATTENED_BUCKET:
        if not is_handles:
            raise ValueError(
                f"load_format={FLATTENED_BUCKET!r} takes SGLang's serialized payloads (one per "
                "TP rank), a FlattenedTensorBucket dict, or a list of BucketHandle"
            )
        return items
    if load_format not in (None, "direct"):
        raise ValueError(
            f"unknown load_format {load_format!r} (None, 'direct' or {FLATTENED_BUCKET!r})"
        )
    return items if is_handles else None


def pairs_of(named_tensors: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(named_tensors, Mapping):
        named_tensors = list(named_tensors.items())
    pairs = list(named_tensors)
    for item in pairs:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(f"named_tensors must be (name, tensor) pairs, got {item!r:.80}")
        if not isinstance(name := item[0], str):
            raise ValueError(f"weight name {name!r:.80} is of type {type(name).__name__}, not str")
    return [(name, t) for name, t in pairs]


class RefitSegments:
    """The shared segments a TP engine's tensor refits pack into, kept between refits
    (creating 500 MB of shared memory is slow); one pool per engine, made at first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards ``_current``; held briefly only
        self._current: tuple[str, SegmentPool, threading.Lock] | None = None

    @contextmanager
    def packed(self, pairs: list[tuple[str, torch.Tensor]]):
        """Pack ``pairs`` into the pool's segments; yields their handles (one refit at once)."""
        with self._lock:
            if self._current is None:
                name = f"rlr-refit-{uuid.uuid4().hex[:12]}"  # per engine: no clash on a node
                self._current = (name, SegmentPool(), threading.Lock())
            prefix, pool, busy = self._current
        with busy, ColocatedBuckets(pairs, prefix, DEFAULT_BUCKET_BYTES, pool=pool) as buckets:
            yield buckets.handles

    def release(self, blocking: bool = True) -> None:
        """Unlink the segments (weights released, shutdown); the next refit makes them again.
        ``blocking=False``: skip it if a refit is packing right now (the loop thread must not
        wait for one: the refit waits for the loop)."""
        with self._lock:
            current = self._current
        if current is None or not current[2].acquire(blocking=blocking):
            return
        try:
            with self._lock:
                if self._current is current:
                    self._current = None
            current[1].close()
        finally:
            current[2].release()
