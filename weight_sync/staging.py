"""Engine side of the distributed path for all-or-nothing loaders: receive a whole update into
one reusable staging arena, then hand out ``(name, view)`` pairs that stay valid until the next
update.

:class:`~weight_sync.receiver.WeightReceiver` hands buckets to a ``load_fn`` one at a time from
two reused slots, which suits loaders that copy as they go. An engine that must not touch its
weights before the *whole* update arrived (a dead sender mid-update must leave the old weights
intact) needs every byte at once; receiving each bucket straight into its own slice of one arena
costs no extra copy, and reusing the arena keeps memory flat across refits.

Two wire formats, both bounded by the group's timeout:

- :meth:`StagingArena.receive` -- our protocol: an :class:`~weight_sync.spec.UpdatePlan` shipped
  by RPC, then per bucket a header and the bucket bytes (what ``WeightSender.send`` streams).
- :meth:`StagingArena.receive_tensors` -- SGLang's ``update_weights_from_distributed`` protocol:
  ``(name, dtype, shape)`` lists by RPC, then one plain broadcast per tensor, no headers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weight_sync.bucket import NamedMeta, typed_view, unpack
from weight_sync.group import PendingOp, WeightGroup
from weight_sync.header import recv_header
from weight_sync.spec import BucketMeta, TensorMeta, UpdatePlan, dtype_to_str

_ALIGN = 64  # bytes: every slice starts aligned for any dtype view (and for vector loads)

Pairs = list[tuple[str, torch.Tensor]]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def tensor_buckets(named_metas: Sequence[NamedMeta]) -> list[BucketMeta]:
    """One single-tensor bucket per ``(name, dtype, shape)``, in order (the per-tensor layout of
    SGLang's protocol). ``dtype`` may be a ``torch.dtype`` or a string with or without the
    ``torch.`` prefix."""
    buckets = []
    for name, dtype, shape in named_metas:
        key = dtype_to_str(dtype) if isinstance(dtype, torch.dtype) else str(dtype)
        key = key.removeprefix("torch.")
        shape = tuple(int(d) for d in shape)
        numel = 1
        for d in shape:
            numel *= d
        buckets.append(BucketMeta(key, numel, (TensorMeta(name, key, shape, 0, numel),)))
    return buckets


class StagingArena:
    """Owner of one reusable byte buffer on ``device`` that holds a whole update.

    The buffer grows to the largest update seen and is reused afterwards; :meth:`close` frees
    it. Views returned by ``receive*`` alias the buffer: they are valid until the next
    ``receive*`` or ``close`` (the caller must finish with them -- copy, or discard -- first).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._buffer: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes currently held (0 after ``close``)."""
        return 0 if self._buffer is None else self._buffer.numel()

    def _slices(self, buckets: Sequence[BucketMeta]) -> list[torch.Tensor]:
        offsets, total = [], 0
        for bucket in buckets:
            offsets.append(total)
            total += _aligned(bucket.nbytes)
        if self._buffer is None or self._buffer.numel() < total:
            self._buffer = None  # free the old arena before allocating the larger one
            self._buffer = torch.empty(max(total, 1), dtype=torch.uint8, device=self.device)
        return [self._buffer[o : o + _aligned(b.nbytes)] for o, b in zip(offsets, buckets)]

    def receive(self, group: WeightGroup, plan: UpdatePlan, src_rank: int = 0) -> Pairs:
        """Receive every bucket of ``plan`` (header-checked, as ``WeightSender.send`` streams
        them) and return all ``(name, view)`` pairs in plan order.

        Raises ``WeightSyncError`` if the sender aborted (the stream stays in sync) or the
        stream does not match ``plan``/the sender died (destroy the group), and
        ``WeightSyncTimeout`` past the group timeout.
        """
        fingerprint = plan.fingerprint()
        slices = self._slices(plan.buckets)
        n = len(plan.buckets)
        for i, (bucket, raw) in enumerate(zip(plan.buckets, slices)):
            recv_header(group, src_rank, plan, fingerprint, i)
            if bucket.nbytes:  # the sender skips empty buckets too
                what = f"bucket {i}/{n} ({bucket.nbytes} bytes, version {plan.weight_version})"
                group.broadcast_async(raw[: bucket.nbytes], src_rank, what).wait()
        return self._pairs(plan.buckets, slices)

    def receive_tensors(
        self, group: WeightGroup, named_metas: Sequence[NamedMeta], src_rank: int = 0
    ) -> Pairs:
        """SGLang's protocol: one plain broadcast per tensor, in ``named_metas`` order.

        Receives are posted back to back (the group runs them in order), so the wire never
        waits on this side. No headers: a sender that sends something else is only caught by
        the size check of the transport, or later by the loader's validation.
        """
        buckets = tensor_buckets(named_metas)  # validates the dtype strings
        slices = self._slices(buckets)
        ops: list[PendingOp] = []
        for bucket, raw in zip(buckets, slices):
            if bucket.nbytes:
                view = typed_view(raw, bucket)  # the sender broadcasts typed tensors
                what = f"tensor {bucket.tensors[0].name!r}"
                ops.append(group.broadcast_async(view, src_rank, what))
        for op in ops:
            op.wait()
        return self._pairs(buckets, slices)

    @staticmethod
    def _pairs(buckets: Sequence[BucketMeta], slices: list[torch.Tensor]) -> Pairs:
        pairs: Pairs = []
        for bucket, raw in zip(buckets, slices):
            pairs.extend(unpack(typed_view(raw, bucket), bucket))
        return pairs

    def close(self) -> None:
        """Free the arena (idempotent); the object stays usable and reallocates on demand."""
        self._buffer = None
