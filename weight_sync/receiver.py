"""Engine side of the distributed path: receive buckets and hand ``(name, tensor)`` pairs over.

Call :meth:`WeightReceiver.receive` (or the one-shot :func:`receive`) on every non-source rank
with the :class:`~weight_sync.spec.UpdatePlan` the trainer sent by RPC, while the trainer runs
``WeightSender.send``. The receiver keeps two byte buffers: bucket ``i + 1`` is on the wire while
``load_fn`` consumes bucket ``i``. A long-lived :class:`WeightReceiver` reuses them across
updates (on CPU, fresh 512 MB buffers cost page faults on every update).

Timeouts: the sender cannot push bucket ``i + 2`` before this side has posted it, i.e. before
``load_fn`` returned for bucket ``i``; the group's ``timeout_s`` must exceed the slowest
``load_fn`` call, or the sender times out.

View lifetime contract: the tensors passed to ``load_fn`` are views into a reused buffer and are
valid only during that call; ``load_fn`` must copy them (e.g. ``param.copy_(t)``) before
returning. Staging/validating for atomicity is the engine's job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import torch

from weight_sync.bucket import typed_view, unpack
from weight_sync.group import PendingOp, WeightGroup
from weight_sync.header import PendingHeader, aborted_error, check_header, post_bucket
from weight_sync.sender import TransferStats
from weight_sync.spec import UpdatePlan

LoadFn = Callable[[Iterable[tuple[str, torch.Tensor]]], object]


class BucketStream:
    """Iterates the buckets of one update as ``list[(name, view)]``, in plan order.

    A list's views stay valid until the iterator is advanced again (its buffer slot is then
    reused for bucket ``i + 2``). Use :meth:`drain` to consume the rest of the stream without
    using it, which keeps the group in sync with the sender after a consumer-side error.
    ``buffers`` is a 2-slot list of uint8 tensors (or ``None``) that is grown in place as needed,
    so a caller can reuse it across updates. With ``owned=True`` each bucket is cloned once
    (one memcpy) and the yielded tensors stay valid forever.
    """

    def __init__(
        self,
        group: WeightGroup,
        plan: UpdatePlan,
        src_rank: int = 0,
        device: torch.device | None = None,
        buffers: list[torch.Tensor | None] | None = None,
        owned: bool = False,
    ) -> None:
        if group.rank == src_rank:
            raise ValueError(f"rank {group.rank} is the source; it cannot receive")
        self.group = group
        self.plan = plan
        self.src_rank = src_rank
        self.device = group.device if device is None else torch.device(device)
        self.owned = owned
        self._fingerprint = plan.fingerprint()
        self._buffers = [None, None] if buffers is None else buffers
        for slot in (0, 1):
            self._ensure(slot)
        self._posted = 0  # buckets whose receive has been started
        self._consumed = 0  # buckets handed to the consumer
        self._pending: tuple[PendingHeader, PendingOp | None] | None = None

    def _ensure(self, slot: int) -> None:
        # Each slot only needs to hold the largest bucket that will land in it.
        need = max((b.nbytes for b in self.plan.buckets[slot::2]), default=0)
        current = self._buffers[slot]
        if current is None or current.numel() < need or current.device != self.device:
            self._buffers[slot] = None  # free the old buffer before allocating the new one
            self._buffers[slot] = torch.empty(need, dtype=torch.uint8, device=self.device)

    def _slot(self, i: int) -> torch.Tensor:
        buffer = self._buffers[i % 2]
        assert buffer is not None  # allocated in __init__
        return buffer

    def _post(self, i: int) -> None:
        """Post the receives of header ``i`` and bucket ``i`` (into its slot)."""
        self._pending = post_bucket(self.group, self.src_rank, self.plan, i, self._slot(i))
        self._posted = i + 1

    def __iter__(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        n = len(self.plan.buckets)
        while self._consumed < n:
            i = self._consumed
            if self._posted == i:
                self._post(i)
            assert self._pending is not None
            header, data = self._pending
            self._pending = None
            aborted = check_header(self.group, header, self.plan, self._fingerprint)
            if not aborted and i + 1 < n:
                # Bucket i + 1 goes into the slot of bucket i - 1, which the consumer is done
                # with; it flies while bucket i finishes and is consumed.
                self._post(i + 1)
            if data is not None:
                data.wait()
            if aborted:
                raise aborted_error(self.group, self.plan, i)
            bucket = self.plan.buckets[i]
            flat = typed_view(self._slot(i), bucket)
            pairs = unpack(flat.clone() if self.owned else flat, bucket)
            self._consumed = i + 1
            yield pairs

    def drain(self) -> None:
        """Receive and discard whatever is left of the update."""
        for _ in self:
            pass


class WeightReceiver:
    """Engine side of one group: owns the receive buffers (reused across updates).

    Does not own ``group``. ``device`` is where receive buffers live (default ``group.device``:
    CPU for gloo, the group's GPU for NCCL).
    """

    def __init__(
        self, group: WeightGroup, src_rank: int = 0, device: torch.device | None = None
    ) -> None:
        if group.rank == src_rank:
            raise ValueError(f"rank {group.rank} is the source; it cannot receive")
        self.group = group
        self.src_rank = src_rank
        self.device = group.device if device is None else torch.device(device)
        self._buffers: list[torch.Tensor | None] = [None, None]

    def stream(self, plan: UpdatePlan, owned: bool = False) -> BucketStream:
        """Iterate the buckets of ``plan`` yourself (see :class:`BucketStream`)."""
        return BucketStream(self.group, plan, self.src_rank, self.device, self._buffers, owned)

    def iter_pairs(self, plan: UpdatePlan) -> Iterator[tuple[str, torch.Tensor]]:
        """All ``(name, tensor)`` pairs of the update, in plan order, as owned tensors.

        For loaders that validate everything before copying and so keep references across
        buckets (e.g. an engine's all-or-nothing ``apply(named)``): each bucket is cloned once,
        so the tensors never alias the reused receive buffers. Exhaust or ``close()`` the
        iterator; if it is closed early, the rest of the update is drained to keep the group
        in sync with the sender.
        """
        stream = self.stream(plan, owned=True)
        try:
            for pairs in stream:
                yield from pairs
        except GeneratorExit:
            stream.drain()
            raise

    def receive(self, plan: UpdatePlan, load_fn: LoadFn) -> TransferStats:
        """Receive one update and call ``load_fn(pairs)`` once per bucket, in plan order.

        Errors:

        - ``WeightSyncTimeout``: the sender sent nothing within the group timeout (or stalled).
        - ``WeightSyncError``: the sender died mid-bucket, aborted the update, or the stream
          does not match ``plan``. Except for a sender abort, destroy the group afterwards.
        - anything ``load_fn`` raises: the remaining buckets are drained first, so the sender
          and the other receivers finish normally and the group stays usable; then re-raised.
        """
        start = time.perf_counter()
        stream = self.stream(plan)
        for pairs in stream:
            try:
                load_fn(pairs)
            except Exception:
                stream.drain()
                raise
        seconds = time.perf_counter() - start
        return TransferStats(len(plan.buckets), plan.num_tensors, plan.total_bytes, seconds)

    def close(self) -> None:
        """Free the receive buffers (the receiver stays usable and reallocates on demand)."""
        self._buffers[:] = [None, None]


def receive(
    group: WeightGroup,
    plan: UpdatePlan,
    load_fn: LoadFn,
    src_rank: int = 0,
    device: torch.device | None = None,
) -> TransferStats:
    """One-shot :meth:`WeightReceiver.receive` (allocates fresh buffers for this update)."""
    return WeightReceiver(group, src_rank, device).receive(plan, load_fn)
