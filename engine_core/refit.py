"""Refits from a trainer: the weight-sync half of the ``Engine`` API (SGLang names).

``Engine`` inherits :class:`WeightSyncAPI`. Every refit is atomic and versioned like
``update_weights_from_disk``: all TP ranks stage (receive / map, then validate names, shapes and
dtypes through ``ModelRunner.stage_weights``, the one ingest path) before any rank writes; a
failure anywhere leaves the old weights bitwise intact and the old ``weight_version``. Staging
and commit run on the engine loop between two steps (a tp_size 1 engine receives a distributed
update beside the loop first, so it keeps generating meanwhile), so requests in flight continue
on the new weights from their next token, and each output token records the version that
produced it.

Transports (``weight_sync``): colocated shared memory / CUDA IPC buckets
(``update_weights_from_tensor``) and a standalone gloo/NCCL group in which TP rank ``r`` of this
engine is rank ``rank_offset + r`` (``init_weights_update_group`` ...). Tensors must have the
engine's dtype (``get_server_info()["config"]``; fp32 on CPU): refits never cast silently.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from weight_sync import (
    DEFAULT_BUCKET_BYTES,
    BucketHandle,
    ColocatedBuckets,
    SegmentPool,
    UpdatePlan,
)

log = logging.getLogger(__name__)

FLATTENED_BUCKET = "flattened_bucket"  # load_format of colocated bucket handles
DEFAULT_GROUP = "weight_update_group"
_SEGMENTS_LOCK = threading.Lock()


def _plan_of(names: Any) -> UpdatePlan | None:
    if isinstance(names, UpdatePlan):
        return names
    if isinstance(names, str):
        return UpdatePlan.from_json(names)
    if isinstance(names, Mapping) and "buckets" in names:
        return UpdatePlan.from_dict(names)
    return None


def _handles_of(named_tensors: Any, load_format: str | None) -> list[BucketHandle] | None:
    if isinstance(named_tensors, ColocatedBuckets):
        named_tensors = named_tensors.handles
    items = list(named_tensors) if isinstance(named_tensors, list | tuple) else None
    is_handles = bool(items) and all(isinstance(h, BucketHandle) for h in items)
    if load_format == FLATTENED_BUCKET:
        if not is_handles:
            raise ValueError(f"load_format={FLATTENED_BUCKET!r} takes a list of BucketHandle")
        return items
    if load_format not in (None, "direct"):
        raise ValueError(f"unknown load_format {load_format!r} (None or {FLATTENED_BUCKET!r})")
    return items if is_handles else None


def _pairs_of(named_tensors: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(named_tensors, Mapping):
        return list(named_tensors.items())
    pairs = list(named_tensors)
    for item in pairs:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"named_tensors must be (name, tensor) pairs, got {item!r:.80}")
    return [(name, t) for name, t in pairs]


class WeightSyncAPI:
    """Mixin of ``Engine`` (needs its ``weights``, ``executor``, ``loop`` and ``config``)."""

    weights: Any
    executor: Any
    loop: Any
    config: Any
    _held_update: dict[str, Any] | None = None  # engine-level view of the held update
    _joined_groups = False  # whether any rank may hold a group to close at shutdown
    # (prefix, pool, lock) of the shared segments TP tensor refits pack into
    _tp_segments: tuple[str, SegmentPool, threading.Lock] | None = None

    # ---------------------------------------------------------------- colocated
    def update_weights_from_tensor(
        self,
        named_tensors: Any,
        load_format: str | None = None,
        flush_cache: bool = True,
        weight_version: str | None = None,
    ) -> dict:
        """Load tensors handed over in memory, without a pickled copy of their data.

        ``named_tensors``: ``(name, tensor)`` pairs or a dict (HF names; any subset of the
        parameters), or -- with ``load_format="flattened_bucket"`` -- the ``BucketHandle``s of a
        trainer's ``weight_sync.ColocatedBuckets`` (shared memory on CPU, CUDA IPC on GPU), which
        the trainer keeps open until this returns. With tp_size 1 pairs are staged in place;
        with TP they are packed once into shared buckets and every rank maps them. Returns
        ``{"success", "num_tensors", "weight_version"}``; raises (``ModelLoadError`` for a bad
        name/shape/dtype) with weights and version unchanged.
        """
        handles = _handles_of(named_tensors, load_format)
        if handles is not None:
            return self._stage_commit(weight_version, flush_cache, "stage_colocated", handles)
        pairs = _pairs_of(named_tensors)
        if self.config.tp_size == 1:
            return self._stage_commit(weight_version, flush_cache, "stage_pairs", pairs)
        with _SEGMENTS_LOCK:  # one pool per engine, kept: creating 500 MB of shm is slow
            if self._tp_segments is None:
                prefix = f"rlr-refit-{uuid.uuid4().hex[:12]}"
                self._tp_segments = (prefix, SegmentPool(), threading.Lock())
        prefix, pool, lock = self._tp_segments
        with lock, ColocatedBuckets(pairs, prefix, DEFAULT_BUCKET_BYTES, pool=pool) as buckets:
            return self._stage_commit(
                weight_version, flush_cache, "stage_colocated", buckets.handles
            )

    # ---------------------------------------------------------------- distributed
    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = DEFAULT_GROUP,
        backend: str = "gloo",
        timeout_s: float = 300.0,
    ) -> dict:
        """Join a weight-update group (separate from the TP group): TP rank ``r`` becomes rank
        ``rank_offset + r`` of ``world_size``. Blocks until every member joined (the trainer,
        normally rank 0, calls ``weight_sync.create_group`` concurrently); ``timeout_s`` bounds
        the rendezvous and every later transfer of this group."""
        tp = self.config.tp_size
        if rank_offset < 0 or rank_offset + tp > world_size:
            raise ValueError(
                f"rank_offset={rank_offset} with tp_size={tp} does not fit world_size={world_size}"
            )
        args = (master_address, master_port, rank_offset, world_size, group_name, backend)
        self._joined_groups = True
        self.loop.call(lambda: self.executor.call("refit_call", "init_group", *args, timeout_s))
        return {
            "success": True,
            "group_name": group_name,
            "ranks": list(range(rank_offset, rank_offset + tp)),
        }

    def update_weights_from_distributed(
        self,
        names: Sequence[str] | UpdatePlan | str,
        dtypes: Sequence[Any] | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
        group_name: str = DEFAULT_GROUP,
        flush_cache: bool = True,
        weight_version: str | None = None,
        commit: bool = True,
    ) -> dict:
        """Receive an update broadcast by the group's rank 0, stage it on every rank, commit.

        ``names``: an ``UpdatePlan`` (or its JSON) -- the trainer's ``WeightSender`` streams the
        plan's buckets, one RPC carries all metadata, and ``weight_version`` defaults to the
        plan's -- or SGLang's ``names``/``dtypes``/``shapes`` lists, each tensor then being one
        plain broadcast in that order. Everything is received into a staging arena before any
        weight is touched. ``commit=False`` stages and holds the update (for a commit across
        engines): finish with ``commit_staged_weights`` or ``discard_staged_weights``.
        Raises ``WeightSyncError``/``WeightSyncTimeout`` (dead sender, timeout; then destroy and
        re-init the group) or ``ModelLoadError`` (bad name/shape/dtype; the group stays usable)
        with weights and version unchanged.
        """
        plan = _plan_of(names)
        metas = None
        if plan is None:
            if dtypes is None or shapes is None or not len(names) == len(dtypes) == len(shapes):
                raise ValueError("names, dtypes and shapes must be lists of equal length")
            metas = list(zip(names, dtypes, shapes))
        elif weight_version is None:
            weight_version = str(plan.weight_version)
        if self._held_update is not None:
            raise RuntimeError("a staged update is held; commit or discard it first")
        if self.config.tp_size == 1:
            # The rank lives here: receive beside the loop thread, which keeps generating;
            # only validation and the commit run between two steps.
            rank = self.executor.runner.refit
            with rank.receiving(group_name):
                pairs = rank.receive(group_name, plan, metas)
                stage: tuple = ("stage_received", group_name, pairs)
                return self._finish_distributed(stage, weight_version, flush_cache, commit)
        stage = ("stage_distributed", group_name, plan, metas)
        return self._finish_distributed(stage, weight_version, flush_cache, commit)

    def _finish_distributed(
        self, stage: tuple, weight_version: str | None, flush_cache: bool, commit: bool
    ) -> dict:
        """Stage on every rank, then commit (or hold: ``commit=False``), on the loop thread."""
        if commit:
            return self._stage_commit(weight_version, flush_cache, *stage)

        def run() -> dict:
            self.weights.guard()  # resident weights (engine_core.sleep)
            try:
                count = self.executor.call("refit_call", *stage, True)
            except BaseException:  # some ranks may hold it: none must
                self.executor.call("discard_weights")
                self.executor.call("refit_call", "discard_held")
                raise
            self._held_update = {"weight_version": weight_version, "flush_cache": flush_cache}
            return {"success": True, "num_tensors": count, "committed": False}

        return self.loop.call(run)

    def commit_staged_weights(
        self, weight_version: str | None = None, flush_cache: bool | None = None
    ) -> dict:
        """Commit the update held by ``update_weights_from_distributed(commit=False)`` on every
        rank and switch the version (default: the one given when staging)."""

        def run() -> dict:
            held = self._held_update
            if held is None:
                raise RuntimeError("no staged update to commit")
            self.weights.guard()
            # Two phases across TP ranks again: validate everywhere, then write everywhere.
            try:
                self.executor.call("refit_call", "restage_held")
            except BaseException:
                self.executor.call("discard_weights")
                raise
            count = self.executor.call("commit_weights")
            self.executor.call("refit_call", "discard_held")
            self._held_update = None
            flush = held["flush_cache"] if flush_cache is None else flush_cache
            version = weight_version if weight_version is not None else held["weight_version"]
            return self._switched(version, flush, count)

        return self.loop.call(run)

    def discard_staged_weights(self) -> dict:
        """Drop a held update (weights and version stay); a no-op when none is held."""

        def run() -> dict:
            self.executor.call("refit_call", "discard_held")
            had, self._held_update = self._held_update is not None, None
            return {"success": True, "discarded": had}

        return self.loop.call(run)

    def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP) -> dict:
        """Leave the group on every rank (drops an update held from it); idempotent."""

        def run() -> dict:
            existed = self.executor.call("refit_call", "destroy_group", group_name)
            if self._held_update is not None and not self.executor.call("refit_call", "has_held"):
                self._held_update = None
            return {"success": True, "existed": bool(existed)}

        return self.loop.call(run)

    # ---------------------------------------------------------------- verification
    def get_weights_checksum(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """``{HF name: sha256 hex}`` of the weights (all of them when ``names`` is None).

        Each digest covers the raw bytes of the *full* tensor in the engine's dtype -- with TP
        the shards are gathered first -- so a trainer compares it with
        ``weight_sync.checksum.tensor_checksum(t.to(engine_dtype))`` of what it sent. A tied LM
        head is ``model.embed_tokens.weight`` (ask for ``lm_head.weight`` explicitly)."""
        names = None if names is None else list(names)
        return self.loop.call(lambda: self.executor.call("refit_call", "checksums", names))

    # ---------------------------------------------------------------- internals
    def _stage_commit(self, version: str | None, flush_cache: bool, *stage: Any) -> dict:
        return self.weights._two_phase(version, flush_cache, "refit_call", *stage)

    def _switched(self, version: str | None, flush_cache: bool, count: int) -> dict:
        # Same bookkeeping as WeightUpdater._two_phase after its commit.
        if flush_cache:
            self.weights.on_flush()
        self.weights.version = self.weights._next_version(version)
        self.weights.checkpoint = None  # no longer re-readable from a checkpoint directory
        return {"success": True, "num_tensors": count, "weight_version": self.weights.version}

    def release_refit_segments(self, blocking: bool = True) -> None:
        """Unlink the shared segments TP tensor refits pack into (weights released, shutdown);
        the next such refit creates them again. ``blocking=False``: skip it if a refit is
        packing into them right now (the loop thread must not wait for it)."""
        with _SEGMENTS_LOCK:  # held briefly only: the loop thread takes it too
            segments = self._tp_segments
        if segments is None or not segments[2].acquire(blocking=blocking):
            return
        try:
            with _SEGMENTS_LOCK:
                if self._tp_segments is segments:
                    self._tp_segments = None
            segments[1].close()
        finally:
            segments[2].release()

    def close_weight_sync(self) -> None:
        """Leave every weight-update group and unlink the TP refit segments (engine shutdown,
        after the loop stopped)."""
        self.release_refit_segments()
        if not self._joined_groups:
            return
        self._joined_groups = False
        try:
            self.executor.call("refit_call", "close")
        except Exception:  # a dead rank must not block shutdown; its process exit frees it
            log.warning("closing weight-update groups failed", exc_info=True)
        self._held_update = None
