"""Trainer side of the distributed path: plan once, then stream buckets with overlap.

Protocol per update (the receiver mirrors it, see :mod:`weight_sync.receiver`):

1. ``plan = sender.plan(named_tensors, weight_version)`` -- metadata only.
2. The caller ships ``plan`` (or ``plan.to_json()``) to every engine in ONE RPC that makes the
   engine call :func:`weight_sync.receiver.receive` and returns without waiting for it.
3. ``sender.send(named_tensors, plan)`` -- for each bucket: broadcast a small header, then the
   bucket bytes. Bucket ``i + 1`` is packed by a background thread into the other half of a
   double buffer while bucket ``i`` is on the wire.

A tensor that does not match the plan is detected before anything is sent; the sender then
broadcasts an ABORT header (receivers raise ``WeightSyncError`` immediately, the group stays
usable) and raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from weight_sync.bucket import (
    DEFAULT_BUCKET_BYTES,
    as_bytes,
    check_tensor,
    metas_of,
    pack,
    plan_buckets,
    typed_view,
)
from weight_sync.errors import WeightSyncError
from weight_sync.group import WeightGroup
from weight_sync.header import STATUS_ABORT, STATUS_OK, send_header
from weight_sync.spec import BucketMeta, UpdatePlan

NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class TransferStats:
    """What one update moved; ``seconds`` is wall time of the whole send/receive."""

    num_buckets: int
    num_tensors: int
    total_bytes: int
    seconds: float

    @property
    def gbytes_per_s(self) -> float:
        return self.total_bytes / max(self.seconds, 1e-9) / 1e9


def as_dict(named_tensors: NamedTensors) -> dict[str, torch.Tensor]:
    """Normalise a mapping or ``(name, tensor)`` iterable; rejects duplicate names."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    out: dict[str, torch.Tensor] = {}
    for name, tensor in items:
        if name in out:
            raise ValueError(f"duplicate tensor name {name!r}")
        out[name] = tensor
    return out


class WeightSender:
    """Streams named tensors from ``src_rank`` of ``group`` to every other rank.

    Owns a double buffer of up to ``2 * bucket_bytes`` on ``group.device`` that is reused across
    updates; :meth:`close` frees it. Does not own ``group``.
    """

    def __init__(
        self, group: WeightGroup, src_rank: int = 0, bucket_bytes: int = DEFAULT_BUCKET_BYTES
    ) -> None:
        if group.rank != src_rank:
            raise ValueError(f"WeightSender on rank {group.rank}, but src_rank is {src_rank}")
        if bucket_bytes <= 0:
            raise ValueError("bucket_bytes must be positive")
        self.group = group
        self.src_rank = src_rank
        self.bucket_bytes = bucket_bytes
        self._buffers: list[torch.Tensor | None] = [None, None]

    def plan(self, named_tensors: NamedTensors, weight_version: int | str = 0) -> UpdatePlan:
        """Bucket layout for ``named_tensors`` (metadata only; nothing is sent)."""
        named = as_dict(named_tensors)
        buckets = plan_buckets(metas_of(named.items()), self.bucket_bytes)
        return UpdatePlan(buckets=tuple(buckets), weight_version=weight_version)

    def send(self, named_tensors: NamedTensors, plan: UpdatePlan) -> TransferStats:
        """Broadcast every bucket of ``plan``; returns once the last bucket has been sent.

        ``named_tensors`` must be exactly the tensors ``plan`` was made from (same names,
        dtypes, shapes; values may have changed). Raises ``ValueError`` on a mismatch (after
        telling the receivers to abort) and ``WeightSyncError``/``WeightSyncTimeout`` on a
        transport failure (then destroy the group).
        """
        start = time.perf_counter()
        named = as_dict(named_tensors)
        fingerprint = plan.fingerprint()
        try:
            _check_against_plan(named, plan)
        except ValueError:
            self._abort(plan, fingerprint, 0)
            raise
        self._stream(named, plan, fingerprint)
        seconds = time.perf_counter() - start
        return TransferStats(len(plan.buckets), plan.num_tensors, plan.total_bytes, seconds)

    def _stream(self, named: dict[str, torch.Tensor], plan: UpdatePlan, fingerprint: int) -> None:
        n = len(plan.buckets)
        if n == 0:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync-pack") as pool:
            future = pool.submit(self._materialize, named, plan.buckets[0], 0)
            for i in range(n):
                flat = self._result_or_abort(future, plan, fingerprint, i)
                send_header(self.group, self.src_rank, plan, fingerprint, i, STATUS_OK)
                op = None
                if flat.numel():
                    what = f"bucket {i}/{n} ({plan.buckets[i].nbytes} bytes)"
                    op = self.group.broadcast_async(flat, self.src_rank, what)
                if i + 1 < n:
                    # Packs into the other buffer slot, which the previous bucket released.
                    future = pool.submit(self._materialize, named, plan.buckets[i + 1], i + 1)
                if op is not None:
                    op.wait()

    def _result_or_abort(
        self, future: Future[torch.Tensor], plan: UpdatePlan, fingerprint: int, index: int
    ) -> torch.Tensor:
        try:
            return future.result()
        except Exception:
            # Packing failed (e.g. a tensor changed shape after the check): unblock receivers.
            self._abort(plan, fingerprint, index)
            raise

    def _abort(self, plan: UpdatePlan, fingerprint: int, index: int) -> None:
        """Tell receivers waiting for header ``index`` that this update is abandoned."""
        if index >= len(plan.buckets):
            return
        # Best effort: if the receivers are gone too, the caller's original error matters more.
        with contextlib.suppress(WeightSyncError):
            send_header(self.group, self.src_rank, plan, fingerprint, index, STATUS_ABORT)

    def _materialize(
        self, named: dict[str, torch.Tensor], bucket: BucketMeta, index: int
    ) -> torch.Tensor:
        """Bucket bytes ready to broadcast, as a 1-D uint8 tensor on ``group.device``."""
        if len(bucket.tensors) == 1:
            only = named[bucket.tensors[0].name].detach()
            if only.is_contiguous() and only.device == self.group.device:
                return as_bytes(only)  # a lone contiguous tensor goes out without a copy
        buffer = self._buffer(index % 2, bucket.nbytes)
        pack(named, bucket, out=typed_view(buffer, bucket))
        if buffer.is_cuda:
            # This thread packed on its own current stream; NCCL only orders itself after the
            # *calling* thread's stream, so finish the copies before handing the buffer over.
            torch.cuda.current_stream(buffer.device).synchronize()
        return buffer[: bucket.nbytes]

    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            self._buffers[slot] = None  # free the old one before allocating the larger one
            size = max(nbytes, min(self.bucket_bytes, 1 << 20))
            buffer = torch.empty(size, dtype=torch.uint8, device=self.group.device)
            self._buffers[slot] = buffer
        return buffer

    def close(self) -> None:
        """Free the staging buffers (the sender stays usable and reallocates on demand)."""
        self._buffers = [None, None]


def _check_against_plan(named: dict[str, torch.Tensor], plan: UpdatePlan) -> None:
    expected = plan.names()
    if set(named) != set(expected):
        missing = sorted(set(expected) - set(named))[:5]
        extra = sorted(set(named) - set(expected))[:5]
        raise ValueError(f"tensors do not match the plan: missing {missing}, unexpected {extra}")
    for bucket in plan.buckets:
        for meta in bucket.tensors:
            check_tensor(meta, named[meta.name])
