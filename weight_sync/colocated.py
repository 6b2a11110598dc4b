"""Zero-copy colocated transport: trainer and engine share a host (and maybe a GPU).

The trainer packs flattened per-dtype buckets straight into shared memory and hands the engine
small picklable :class:`BucketHandle` objects; the engine maps them and passes ``(name, view)``
pairs to its loader. Tensor data never goes through pickle.

- CPU tensors: one ``/dev/shm`` file per bucket named ``f"{prefix}-{i}"`` (the caller picks
  ``prefix``, e.g. ``f"rlr-{engine_id}-{version}"``); engines map it with ``torch.frombuffer``.
- CUDA tensors: one flat CUDA buffer per bucket, shared through a CUDA IPC handle from
  ``torch.multiprocessing.reductions.reduce_tensor``. This branch is untested here (no GPU).

Ownership protocol::

    with ColocatedBuckets(named_tensors, prefix) as buckets:      # trainer: creates segments
        engine_rpc(buckets.handles)   # engine: load_colocated(handles, load_fn); returns = ack
    # leaving the block unlinks the segments / frees the CUDA buffers

A trainer that refits every step keeps a :class:`SegmentPool` and passes ``pool=`` so every
update packs into the same segments (the pool unlinks them at its ``close``).

The engine must copy the data out (``load_fn`` copies into its parameters) before it
acknowledges; the trainer must not close before every engine acknowledged.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import reduce_tensor

from weight_sync.bucket import (
    DEFAULT_BUCKET_BYTES,
    metas_of,
    pack,
    plan_buckets,
    typed_view,
    unpack,
)
from weight_sync.sender import NamedTensors, as_dict
from weight_sync.shm import SharedSegment, check_name, map_segment
from weight_sync.spec import BucketMeta, UpdatePlan

LoadFn = Callable[[Iterable[tuple[str, torch.Tensor]]], object]


@dataclass(frozen=True)
class BucketHandle:
    """Picklable reference to one shared bucket: a shm name or a CUDA IPC handle, + layout."""

    meta: BucketMeta
    weight_version: int | str
    shm_name: str | None = None
    cuda_ipc: tuple[Any, tuple[Any, ...]] | None = None  # (rebuild_fn, args) from reduce_tensor


class SegmentPool:
    """Owner of shared segments kept across updates (``/dev/shm`` files named by the caller).

    Creating a 500 MB segment costs more than filling it (tmpfs allocates and zeroes every page,
    the writer faults every page in, unlinking frees them all again): a trainer that refits
    every step passes one pool to each :class:`ColocatedBuckets` of one stream of updates (the
    same ``prefix`` every time), which then packs into the same segments. Segments the latest
    update did not use are unlinked; an update that fails (no acknowledgement: an engine may
    still be reading) unlinks its segments instead of keeping them, so the next update never
    overwrites pages a late reader maps. :meth:`close` unlinks everything (idempotent; also at
    garbage collection). Not thread-safe; one update at a time.
    """

    def __init__(self) -> None:
        self._segments: dict[str, SharedSegment] = {}
        self._finalizer = weakref.finalize(self, _release, self._segments, [])

    def evict(self, names: Iterable[str]) -> None:
        """Unlink these segments (mappings that still read them keep their pages)."""
        for name in list(names):
            segment = self._segments.pop(name, None)
            if segment is not None:
                segment.close()

    def keep_only(self, names: Iterable[str]) -> None:
        """Unlink every segment not in ``names`` (segments of an older, larger layout)."""
        wanted = set(names)
        self.evict([n for n in self._segments if n not in wanted])

    def get(self, name: str, nbytes: int) -> SharedSegment:
        """The segment ``name`` of exactly ``nbytes`` bytes, reused when it already exists."""
        segment = self._segments.get(name)
        if segment is not None and segment.nbytes != nbytes:
            segment.close()
            segment = None
        if segment is None:
            segment = SharedSegment(name, nbytes)
            self._segments[name] = segment
        return segment

    @property
    def segment_names(self) -> list[str]:
        return sorted(self._segments)

    def close(self) -> None:
        self._finalizer()


class ColocatedBuckets:
    """Owner of the shared buckets of one update; :meth:`close` releases them (idempotent).

    ``device`` selects the transport: CUDA -> IPC handles on that device, anything else ->
    ``/dev/shm`` (default: the device of the first tensor). A segment name collision raises
    ``FileExistsError`` (see :func:`weight_sync.shm.remove_segments`); whatever was already
    created is released before the error propagates.
    """

    def __init__(
        self,
        named_tensors: NamedTensors,
        prefix: str,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        weight_version: int | str = 0,
        device: torch.device | None = None,
        pool: SegmentPool | None = None,
    ) -> None:
        check_name(prefix)
        self._pool = pool  # CPU: take segments from it and leave them there at close
        named = as_dict(named_tensors)
        buckets = plan_buckets(metas_of(named.items()), bucket_bytes)
        self.plan = UpdatePlan(buckets=tuple(buckets), weight_version=weight_version)
        self.prefix = prefix
        self.device = _pick_device(named, device)
        self._segments: list[SharedSegment] = []
        self._cuda_buffers: list[torch.Tensor] = []
        # Safety net: unlink on garbage collection / interpreter exit if close() is forgotten.
        self._finalizer = weakref.finalize(self, _release, self._segments, self._cuda_buffers)
        try:
            self.handles = [self._share(named, b, i) for i, b in enumerate(buckets)]
        except BaseException:
            self.close()
            raise

    def _share(self, named: dict[str, torch.Tensor], bucket: BucketMeta, i: int) -> BucketHandle:
        version = self.plan.weight_version
        if self.device.type == "cuda":
            # At least one byte: CUDA IPC cannot share an empty allocation.
            flat = torch.empty(max(bucket.nbytes, 1), dtype=torch.uint8, device=self.device)
            pack(named, bucket, out=typed_view(flat, bucket))
            self._cuda_buffers.append(flat)
            # The consumer reads on its own stream: the pack kernels must be finished first.
            torch.cuda.synchronize(self.device)
            return BucketHandle(bucket, version, cuda_ipc=reduce_tensor(flat))
        name = f"{self.prefix}-{i}"
        if self._pool is not None:
            segment = self._pool.get(name, bucket.nbytes)
        else:
            segment = SharedSegment(name, bucket.nbytes)
            self._segments.append(segment)
        pack(named, bucket, out=typed_view(segment.tensor(), bucket))
        return BucketHandle(bucket, version, shm_name=segment.name)

    @property
    def segment_names(self) -> list[str]:
        return [h.shm_name for h in self.handles if h.shm_name is not None]

    def close(self) -> None:
        """Unlink every segment (pooled ones stay with their pool) / drop every CUDA buffer.
        Call after all engines acknowledged."""
        self._finalizer()

    def __enter__(self) -> ColocatedBuckets:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._pool is not None:
            names = self.segment_names
            # Success: the engines acknowledged, the pool keeps exactly this layout. Failure:
            # an engine may still be reading; never refill those pages, unlink them.
            if exc_type is None:
                self._pool.keep_only(names)
            else:
                self._pool.evict(names)
        self.close()


def _release(segments, cuda_buffers: list[torch.Tensor]) -> None:
    """Close ``segments`` (a list, or a pool's dict) and drop ``cuda_buffers``."""
    for segment in list(segments.values() if isinstance(segments, dict) else segments):
        segment.close()
    segments.clear()
    cuda_buffers.clear()


def _pick_device(named: dict[str, torch.Tensor], device: torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(iter(named.values()), None)
    return first.device if first is not None else torch.device("cpu")


def open_bucket(handle: BucketHandle) -> list[tuple[str, torch.Tensor]]:
    """Map a shared bucket (no data copy) and return its ``(name, view)`` pairs.

    The views keep the mapping alive; drop them once the data has been copied out.
    """
    if handle.shm_name is not None:
        raw = map_segment(handle.shm_name, handle.meta.nbytes)
    elif handle.cuda_ipc is not None:
        rebuild, args = handle.cuda_ipc
        raw = rebuild(*args)
    else:
        raise ValueError("BucketHandle has neither a shm name nor a CUDA IPC handle")
    return unpack(typed_view(raw, handle.meta), handle.meta)


def iter_colocated(handles: Iterable[BucketHandle]) -> Iterator[tuple[str, torch.Tensor]]:
    """All ``(name, view)`` pairs of the shared buckets, mapped lazily in order (no copy).

    Each view keeps its own bucket's mapping alive, so unlike the distributed receiver the
    views stay valid across buckets (and even after the trainer unlinks the segments). With a
    trainer's :class:`SegmentPool` their *contents* change at the next update: copy them out
    before acknowledging.
    """
    for handle in handles:
        yield from open_bucket(handle)


def load_colocated(handles: Iterable[BucketHandle], load_fn: LoadFn) -> int:
    """Engine side: call ``load_fn(pairs)`` per bucket; returns the number of tensors loaded.

    ``load_fn`` must copy the data (views are released after each call). Return from the RPC
    only after this returns: that is the acknowledgement that lets the trainer close.
    """
    loaded = 0
    for handle in handles:
        pairs = open_bucket(handle)
        load_fn(pairs)
        loaded += len(pairs)
        del pairs  # release the mapping before opening the next bucket
    return loaded
