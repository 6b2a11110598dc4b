"""Trainer side of the distributed path: plan once, then stream buckets with overlap.

Protocol per update (the receiver mirrors it, see :mod:`weight_sync.receiver`):

1. ``plan = sender.plan(named_tensors, weight_version)`` -- metadata only.
2. The caller ships ``plan`` (or ``plan.to_json()``) to every engine in ONE RPC that makes the
   engine call :func:`weight_sync.receiver.receive` and returns without waiting for it.
3. ``sender.send(named_tensors, plan)`` -- for each bucket: broadcast a small header, then the
   bucket bytes, both asynchronously (two buckets in flight). Bucket ``i + 1`` is packed by a
   background thread into the other half of a double buffer while bucket ``i`` is on the wire.
   A bucket whose tensors already lie back to back in one storage (a lone tensor, or
   parameters kept in a flat buffer, see :func:`weight_sync.trainer.flatten_parameters`) is
   sent from that memory, without packing.

A tensor that does not match the plan is detected before anything is sent; the sender then
broadcasts an ABORT header and a dummy bucket (receivers raise ``WeightSyncError`` at once, the
group stays usable) and raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from weight_sync.bucket import (
    DEFAULT_BUCKET_BYTES,
    align_elements,
    as_bytes,
    check_tensor,
    contiguous_span,
    metas_of,
    pack,
    plan_buckets,
    typed_view,
)
from weight_sync.errors import WeightSyncError
from weight_sync.group import PendingOp, WeightGroup
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
    updates; :meth:`close` frees it. Does not own ``group``. ``bucket_bytes``: 512 MB by
    default; over gloo on CPU ``weight_sync.bucket.CPU_BUCKET_BYTES`` (64 MB) lets packing
    overlap the wire better.
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

    def plan(
        self, named_tensors: NamedTensors, weight_version: int | str = 0, merge_spans: bool = True
    ) -> UpdatePlan:
        """Bucket layout for ``named_tensors`` (metadata only; nothing is sent).

        ``merge_spans``: neighbouring buckets whose tensors already lie back to back in one
        storage (see :func:`weight_sync.trainer.flatten_parameters`) become one bucket beyond
        ``bucket_bytes``: they need no pack buffer, and fewer messages move faster. Receivers
        that stream bucket by bucket (``WeightReceiver``) then need buffers that large; turn it
        off for them. The engine's staging arena holds whole updates anyway.
        """
        named = as_dict(named_tensors)
        buckets = plan_buckets(metas_of(named.items()), self.bucket_bytes)
        if merge_spans:
            buckets = _merge_spans(buckets, named, self.group.device)
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
        # Two buckets in flight: bucket i + 1 is packed into the slot bucket i - 1 used, so
        # only that one must have left before packing starts.
        in_flight: list[list[PendingOp]] = [[], []]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync-pack") as pool:
            future = pool.submit(self._materialize, named, plan.buckets[0], 0)
            for i in range(n):
                flat = self._result_or_abort(future, plan, fingerprint, i)
                ops = [send_header(self.group, self.src_rank, plan, fingerprint, i, STATUS_OK)]
                if flat.numel():
                    what = f"bucket {i}/{n} ({plan.buckets[i].nbytes} bytes)"
                    ops.append(self.group.broadcast_async(flat, self.src_rank, what))
                in_flight[i % 2] = ops
                if i + 1 < n:
                    _wait_all(in_flight[(i + 1) % 2])
                    future = pool.submit(self._materialize, named, plan.buckets[i + 1], i + 1)
            for ops in in_flight:
                _wait_all(ops)

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
            ops = [send_header(self.group, self.src_rank, plan, fingerprint, index, STATUS_ABORT)]
            nbytes = plan.buckets[index].nbytes
            if nbytes:  # receivers posted this bucket with its header: fill it (see header.py)
                dummy = torch.zeros(nbytes, dtype=torch.uint8, device=self.group.device)
                ops.append(self.group.broadcast_async(dummy, self.src_rank, "aborted bucket"))
            _wait_all(ops)

    def _materialize(
        self, named: dict[str, torch.Tensor], bucket: BucketMeta, index: int
    ) -> torch.Tensor:
        """Bucket bytes ready to broadcast, as a 1-D uint8 tensor on ``group.device``."""
        span = contiguous_span([named[m.name] for m in bucket.tensors], bucket)
        if span is not None and span.device == self.group.device:
            return as_bytes(span)  # already laid out as the bucket: goes out without a copy
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


def _wait_all(ops: list[PendingOp]) -> None:
    for op in ops:
        op.wait()


def _merge_spans(
    buckets: list[BucketMeta], named: dict[str, torch.Tensor], device: torch.device
) -> list[BucketMeta]:
    """Fuse runs of neighbouring same-dtype buckets that form one contiguous span in memory on
    ``device`` (a span elsewhere must be packed, i.e. copied, so it keeps its bucket size)."""
    merged: list[BucketMeta] = []
    last_span: torch.Tensor | None = None
    for bucket in buckets:
        span = contiguous_span([named[t.name] for t in bucket.tensors], bucket)
        if span is not None and span.device != device:
            span = None
        if merged and last_span is not None and span is not None and _follows(last_span, span):
            last = merged[-1]
            start = align_elements(last.numel, last.dtype)
            shifted = tuple(replace(t, offset=t.offset + start) for t in bucket.tensors)
            merged[-1] = BucketMeta(last.dtype, start + bucket.numel, last.tensors + shifted)
            last_span = last_span.as_strided(
                (start + bucket.numel,), (1,), last_span.storage_offset()
            )
            continue
        merged.append(bucket)
        last_span = span
    return merged


def _follows(first: torch.Tensor, second: torch.Tensor) -> bool:
    """``second`` starts where the next tensor after the 1-D ``first`` would (the plan's
    alignment), in the same storage and dtype."""
    return (
        first.dtype == second.dtype
        and first.device == second.device
        and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        and first.storage_offset() + align_elements(first.numel(), first.dtype)
        == second.storage_offset()
    )
