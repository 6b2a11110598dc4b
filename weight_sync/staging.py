"""Engine side of the distributed path for all-or-nothing loaders: receive a whole update into
a reusable staging arena, then hand out ``(name, view)`` pairs into it.

:class:`~weight_sync.receiver.WeightReceiver` hands buckets to a ``load_fn`` one at a time from
two reused slots, which suits loaders that copy as they go. An engine that must not touch its
weights before the *whole* update arrived (a dead sender mid-update must leave the old weights
intact) needs every byte at once; receiving each bucket straight into its own slice of one buffer
costs no extra copy, reusing the buffers keeps memory flat across refits, and having two lets
the engine keep a received update as its weights (no copy at commit either).

Two wire formats, both bounded by the group's timeout:

- :meth:`StagingArena.receive` -- our protocol: an :class:`~weight_sync.spec.UpdatePlan` shipped
  by RPC, then per bucket a header and the bucket bytes (what ``WeightSender.send`` streams).
- :meth:`StagingArena.receive_tensors` -- SGLang's ``update_weights_from_distributed`` protocol:
  ``(name, dtype, shape)`` lists by RPC, then one plain broadcast per tensor, no headers.
"""

from __future__ import annotations

from collections.abc import Sequence, Set

import torch

from weight_sync.bucket import ALIGN_BYTES, NamedMeta, typed_view, unpack
from weight_sync.group import PendingOp, WeightGroup
from weight_sync.header import PendingHeader, aborted_error, check_header, post_bucket
from weight_sync.spec import BucketMeta, TensorMeta, UpdatePlan, dtype_to_str

Pairs = list[tuple[str, torch.Tensor]]


def _aligned(nbytes: int) -> int:
    # Every slice starts on an ALIGN_BYTES boundary: what a fresh allocation would give the
    # tensors in it, if the engine keeps them as its weights (see weight_sync.bucket).
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


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
    """Owner of two reusable byte buffers on ``device``; each holds a whole update.

    Every ``receive*`` goes into a buffer that the caller does not use (``in_use``: data
    pointers of storages still referenced, e.g. by parameters that adopted an earlier update),
    so an engine can make a received update its parameters' storage and receive the next one
    into the other buffer (double buffering, no copy at commit). Buffers grow to the largest
    update seen and are reused; if both are in use, a one-off buffer is allocated.

    Views returned by ``receive*`` alias a buffer: unless their storage is passed in
    ``in_use`` later, they are valid only until the next ``receive*``, ``release_unused`` or
    ``close``.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._buffers: list[torch.Tensor | None] = [None, None]

    @property
    def nbytes(self) -> int:
        """Bytes currently held by the arena's own buffers (0 after ``close``)."""
        return sum(b.numel() for b in self._buffers if b is not None)

    def _pick(self, total: int, in_use: Set[int]) -> torch.Tensor:
        free = [i for i, b in enumerate(self._buffers) if b is None or _ptr(b) not in in_use]
        if not free:
            return torch.empty(max(total, 1), dtype=torch.uint8, device=self.device)
        # Prefer a buffer that is already big enough (no allocation, no page faults).
        fits = [i for i in free if (b := self._buffers[i]) is not None and b.numel() >= total]
        slot = fits[0] if fits else free[0]
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < total:
            self._buffers[slot] = None  # free the old buffer before allocating the larger one
            buffer = torch.empty(max(total, 1), dtype=torch.uint8, device=self.device)
            self._buffers[slot] = buffer
        return buffer

    def _slices(self, buckets: Sequence[BucketMeta], in_use: Set[int]) -> list[torch.Tensor]:
        offsets, total = [], 0
        for bucket in buckets:
            offsets.append(total)
            total += _aligned(bucket.nbytes)
        buffer = self._pick(total + ALIGN_BYTES, in_use)
        pad = -buffer.data_ptr() % ALIGN_BYTES
        return [buffer[pad + o : pad + o + _aligned(b.nbytes)] for o, b in zip(offsets, buckets)]

    def receive(
        self,
        group: WeightGroup,
        plan: UpdatePlan,
        src_rank: int = 0,
        in_use: Set[int] = frozenset(),
    ) -> Pairs:
        """Receive every bucket of ``plan`` (header-checked, as ``WeightSender.send`` streams
        them) and return all ``(name, view)`` pairs in plan order.

        Raises ``WeightSyncError`` if the sender aborted (the stream stays in sync) or the
        stream does not match ``plan``/the sender died (destroy the group), and
        ``WeightSyncTimeout`` past the group timeout.
        """
        fingerprint = plan.fingerprint()
        slices = self._slices(plan.buckets, in_use)
        n = len(plan.buckets)

        def post(i: int) -> tuple[PendingHeader, PendingOp | None]:
            return post_bucket(group, src_rank, plan, i, slices[i])

        posted = post(0) if n else None
        for i in range(n):
            assert posted is not None
            header, data = posted
            aborted = check_header(group, header, plan, fingerprint)
            if not aborted and i + 1 < n:
                posted = post(i + 1)  # bucket i + 1 is posted while bucket i is on the wire
            if data is not None:
                data.wait()
            if aborted:
                raise aborted_error(group, plan, i)
        return self._pairs(plan.buckets, slices)

    def receive_tensors(
        self,
        group: WeightGroup,
        named_metas: Sequence[NamedMeta],
        src_rank: int = 0,
        in_use: Set[int] = frozenset(),
    ) -> Pairs:
        """SGLang's protocol: one plain broadcast per tensor, in ``named_metas`` order.

        Receives are posted back to back (the group runs them in order), so the wire never
        waits on this side. No headers: a sender that sends something else is only caught by
        the size check of the transport, or later by the loader's validation.
        """
        buckets = tensor_buckets(named_metas)  # validates the dtype strings
        slices = self._slices(buckets, in_use)
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

    def reserve_spare(self, in_use: Set[int] = frozenset()) -> None:
        """Make sure a buffer outside ``in_use``, as large as the largest held, exists and has
        been touched: the next ``receive`` then allocates nothing, and the process's memory
        stays flat from the first update on (instead of growing again at the second)."""
        sizes = [b.numel() for b in self._buffers if b is not None]
        if not sizes:
            return
        free = [i for i, b in enumerate(self._buffers) if b is None or _ptr(b) not in in_use]
        if not free or any(
            (b := self._buffers[i]) is not None and b.numel() >= max(sizes) for i in free
        ):
            return
        slot = free[0]
        self._buffers[slot] = None
        spare = torch.empty(max(sizes), dtype=torch.uint8, device=self.device)
        spare.zero_()  # first touch (page faults) now, not inside the next transfer
        self._buffers[slot] = spare

    def buffers(self) -> list[tuple[int, int]]:
        """``(data pointer, bytes)`` of each buffer held."""
        return [(_ptr(b), b.numel()) for b in self._buffers if b is not None]

    def release_unused(self, in_use: Set[int] = frozenset()) -> int:
        """Free the buffers not in ``in_use``; returns the bytes freed."""
        freed = 0
        for i, buffer in enumerate(self._buffers):
            if buffer is not None and _ptr(buffer) not in in_use:
                freed += buffer.numel()
                self._buffers[i] = None
        return freed

    def close(self) -> None:
        """Drop both buffers (idempotent; memory still viewed elsewhere lives on with those
        views); the object stays usable and reallocates on demand."""
        self._buffers = [None, None]


def _ptr(buffer: torch.Tensor) -> int:
    return buffer.untyped_storage().data_ptr()
