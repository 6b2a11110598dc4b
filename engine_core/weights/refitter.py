"""``Refitter``: the engine side of every refit (SGLang's weight verbs), and its versions.

Every refit is atomic and versioned: all TP ranks *stage* (receive / map, then validate names,
shapes and dtypes through ``Rank.stage_weights``, the one ingest path) before any rank
writes; a failure anywhere discards every rank's staging and leaves the old weights bitwise
intact and the old ``weight_version``. Staging and commit run on the engine loop between two
steps (a tp_size 1 engine receives a distributed update beside the loop first, so it keeps
generating meanwhile); requests in flight continue on the new weights from their next token,
and each output token records the version that produced it.

Transports (``weight_sync``): a checkpoint directory, colocated tensors / shared-memory or
CUDA IPC buckets, and a standalone gloo/NCCL group in which TP rank ``r`` of this engine is
rank ``rank_offset + r``. Tensors must have the engine's dtype (fp32 on CPU): refits never
cast silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from engine_core.errors import ModelLoadError, RefitStateError
from engine_core.execution.rank_client import RankClient
from engine_core.model_config import ModelConfig, load_model_config
from engine_core.scheduling.loop import EngineLoop
from engine_core.weights.payloads import RefitSegments, handles_of, pairs_of, plan_of
from engine_core.weights.refit_args import check_group_args, check_refit_flags
from engine_core.weights.sglang_payloads import (
    FLATTENED_BUCKET,
    FlattenedMetas,
    bucket_pairs,
    is_serialized,
    per_rank_tensors,
)
from weight_sync import UpdatePlan

log = logging.getLogger(__name__)

DEFAULT_GROUP = "weight_update_group"
_SHAPE_FIELDS = (
    "architecture",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
)


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16``, ``"torch.bfloat16"`` and ``"bfloat16"`` all name ``"bfloat16"``."""
    text = str(dtype)
    return text[len("torch.") :] if text.startswith("torch.") else text


class WeightVersions:
    """The engine's weight version, and the checkpoint it can re-read them from (written by
    the ``Refitter`` only; read by the memory controller to know whether weights restore)."""

    def __init__(self, version: str, model_path: str) -> None:
        self.current = str(version)
        # (directory, version) of the last load from disk; None after a tensor refit.
        self.checkpoint: tuple[str, str] | None = (model_path, self.current)

    def switch(self, version: str | None, checkpoint: str | None) -> str:
        """Record a committed refit: ``version`` (None: count refits, keeping the user's
        prefix readable) and the directory it came from, if any."""
        if version is not None:
            self.current = str(version)
        else:
            base, _, count = self.current.rpartition("+")
            bumped = count.isdigit() and base
            self.current = f"{base}+{int(count) + 1}" if bumped else f"{self.current}+1"
        self.checkpoint = (checkpoint, self.current) if checkpoint is not None else None
        return self.current

    def relabel(self, version: str) -> str:
        """SGLang's ``update_weight_version``: the same weights under a new label (a checkpoint
        they equal keeps equalling them)."""
        if self.checkpoint is not None and self.checkpoint[1] == self.current:
            self.checkpoint = (self.checkpoint[0], str(version))
        self.current = str(version)
        return self.current

    def restorable(self) -> bool:
        """Whether the current weights equal the recorded checkpoint's (re-readable)."""
        return self.checkpoint is not None and self.checkpoint[1] == self.current


class Refitter:
    """Applies refits through the loop, on every rank. ``guard`` runs first in every refit,
    on the loop thread (resident weights: ``MemoryController.before_refit``)."""

    def __init__(
        self,
        loop: EngineLoop,
        ranks: RankClient,
        model_cfg: ModelConfig,
        versions: WeightVersions,
        segments: RefitSegments,
        guard: Callable[[], None],
        tp_size: int,
        on_commit: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.ranks = ranks
        self.model_cfg = model_cfg
        self.versions = versions
        self.segments = segments
        self.guard = guard
        self.tp_size = tp_size
        self.on_commit = on_commit  # runs on the loop thread after every committed refit
        self.held: dict[str, Any] | None = None  # version/flush of an update held on the ranks
        self.joined_groups = False  # whether any rank may hold a group to close at shutdown

    # ---------------------------------------------------------------- the two phases
    def _two_phase(
        self, stage: Callable[[], int], version: str | None, checkpoint: str | None = None
    ) -> dict:
        """Every rank stages before any rank writes (commit): atomic across TP."""

        def run() -> dict:
            self.guard()
            count = self._stage_or_discard(stage)
            self.ranks.commit_weights()
            return self._switched(version, count, checkpoint)

        return self.loop.call(run)

    def _stage_or_discard(self, stage: Callable[[], int]) -> int:
        try:
            return stage()
        except BaseException:  # some ranks may have staged: none must keep it
            self.ranks.discard_weights()
            raise

    def _switched(self, version: str | None, count: int, checkpoint: str | None = None) -> dict:
        current = self.versions.switch(version, checkpoint)
        self.on_commit()
        return {"success": True, "num_tensors": count, "weight_version": current}

    # ---------------------------------------------------------------- sources
    def from_disk(self, model_path: str, version: str | None) -> dict:
        check_refit_flags(version)
        new = load_model_config(model_path)
        for field in _SHAPE_FIELDS:
            if getattr(new, field) != getattr(self.model_cfg, field):
                raise ModelLoadError(
                    f"{model_path}: config {field}={getattr(new, field)!r} differs from the "
                    f"running model's {getattr(self.model_cfg, field)!r}"
                )
        return self._two_phase(lambda: self.ranks.stage_checkpoint(model_path), version, model_path)

    def from_tensors(
        self, named_tensors: Any, load_format: str | None, version: str | None, commit: bool = True
    ):
        """Stage tensors handed over in memory and commit them, or (``commit=False``) hold a
        private copy on every rank for ``commit_held`` / ``discard_held``."""
        check_refit_flags(version, commit)
        hold = not commit
        if hold and self.held is not None:
            raise RefitStateError("a staged update is held; commit or discard it first")
        per_rank = per_rank_tensors(named_tensors, self.tp_size)
        if per_rank is not None or is_serialized(named_tensors):
            # SGLang's per-rank payloads (or per-tensor values): each rank decodes its own.
            payloads = per_rank if per_rank is not None else list(named_tensors)
            if len(payloads) != self.tp_size:
                raise ModelLoadError(
                    f"named_tensors: {len(payloads)} serialized payloads, expected one per TP "
                    f"rank ({self.tp_size})"
                )
            stage = lambda: self.ranks.stage_serialized(payloads, load_format, hold)  # noqa: E731
            return self._finish(stage, version, commit)
        if load_format == FLATTENED_BUCKET and isinstance(named_tensors, Mapping):
            named_tensors, load_format = bucket_pairs(named_tensors), None  # in-process bucket
        handles = handles_of(named_tensors, load_format)
        if handles is not None:
            stage = lambda: self.ranks.stage_colocated(handles, hold)  # noqa: E731
            return self._finish(stage, version, commit)
        pairs = pairs_of(named_tensors)
        if self.tp_size == 1:
            return self._finish(lambda: self.ranks.stage_pairs(pairs, hold), version, commit)
        with self.segments.packed(pairs) as packed:  # every rank maps them, none copies
            stage = lambda: self.ranks.stage_colocated(packed, hold)  # noqa: E731
            return self._finish(stage, version, commit)

    def init_group(
        self, master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s
    ) -> dict:
        tp = self.tp_size
        check_group_args(rank_offset, world_size, group_name, timeout_s, tp)
        args = (master_address, master_port, rank_offset, world_size, group_name, backend)
        self.joined_groups = True
        self.loop.call(lambda: self.ranks.init_group(*args, timeout_s))
        return {
            "success": True,
            "group_name": group_name,
            "ranks": list(range(rank_offset, rank_offset + tp)),
        }

    def from_distributed(
        self,
        names: Sequence[str] | UpdatePlan | str,
        dtypes,
        shapes,
        group_name: str,
        version: str | None,
        commit: bool,
        load_format: str | None = None,
    ) -> dict:
        check_refit_flags(version, commit)
        plan = plan_of(names)
        metas = None
        if load_format not in (None, FLATTENED_BUCKET) or (load_format and plan is not None):
            raise ModelLoadError(
                f"load_format={load_format!r}: None, or {FLATTENED_BUCKET!r} with SGLang's "
                "names/dtypes/shapes lists"
            )
        if plan is None:
            if dtypes is None or shapes is None or not len(names) == len(dtypes) == len(shapes):
                raise ValueError("names, dtypes and shapes must be lists of equal length")
            metas = list(zip(names, [dtype_name(d) for d in dtypes], [list(s) for s in shapes]))
            if load_format == FLATTENED_BUCKET:
                metas = FlattenedMetas(metas)
        elif version is None:
            version = str(plan.weight_version)
        if self.held is not None:
            raise RefitStateError("a staged update is held; commit or discard it first")
        local = self.ranks.local
        if local is None:
            stage = lambda: self.ranks.stage_distributed(group_name, plan, metas, not commit)  # noqa: E731
            return self._finish(stage, version, commit)
        # The rank lives here: receive beside the loop thread, which keeps generating; only
        # validation and the commit run between two steps.
        with local.refit.receiving(group_name):
            pairs = local.refit.receive(group_name, plan, metas)
            stage = lambda: self.ranks.stage_received(group_name, pairs, not commit)  # noqa: E731
            return self._finish(stage, version, commit)

    def _finish(self, stage: Callable[[], int], version, commit: bool) -> dict:
        if commit:
            return self._two_phase(stage, version)

        def hold() -> dict:
            self.guard()
            try:
                count = self._stage_or_discard(stage)
            except BaseException:
                self.ranks.discard_held()
                raise
            self.held = {"weight_version": version}
            return {"success": True, "num_tensors": count, "committed": False}

        return self.loop.call(hold)

    # ---------------------------------------------------------------- held updates
    def commit_held(self, version: str | None) -> dict:
        check_refit_flags(version)

        def run() -> dict:
            if self.held is None:
                raise RefitStateError("no staged update to commit")
            self.guard()
            # Two phases across TP ranks again: validate everywhere, then write everywhere.
            self._stage_or_discard(self.ranks.restage_held)
            count = self.ranks.commit_weights()
            self.ranks.discard_held()
            held, self.held = self.held, None
            return self._switched(version if version is not None else held["weight_version"], count)

        return self.loop.call(run)

    def discard_held(self) -> dict:
        def run() -> dict:
            self.ranks.discard_held()
            had, self.held = self.held is not None, None
            return {"success": True, "discarded": had}

        return self.loop.call(run)

    def destroy_group(self, group_name: str) -> dict:
        def run() -> dict:
            existed = self.ranks.destroy_group(group_name)
            if self.held is not None and not self.ranks.has_held():
                self.held = None
            return {"success": True, "existed": bool(existed)}

        return self.loop.call(run)

    # ---------------------------------------------------------------- reads
    def checksums(self, names: Sequence[str] | None) -> dict[str, str]:
        if names is not None and (
            isinstance(names, str | bytes)
            or not isinstance(names, Sequence | set | frozenset | tuple)
            or not all(isinstance(n, str) for n in names)
        ):
            raise ModelLoadError(f"names must be a list of weight names or None, got {names!r}")
        names = None if names is None else list(names)
        return self.loop.call(lambda: self.ranks.checksums(names))

    def weight_values(self, name: str, truncate_size: int) -> list:
        size = truncate_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"invalid truncate_size={truncate_size!r}: must be an int >= 0")
        return self.loop.call(lambda: self.ranks.get_weight_values(name, truncate_size))

    def close(self) -> None:
        """Leave every weight-update group and unlink the TP refit segments (engine shutdown,
        after the loop stopped)."""
        self.segments.release()
        if not self.joined_groups:
            return
        self.joined_groups = False
        try:
            self.ranks.close_groups()
        except Exception:  # a dead rank must not block shutdown; its process exit frees it
            log.warning("closing weight-update groups failed", exc_info=True)
        self.held = None
