"""One TP rank's side of trainer refits: weight-update groups, staging, held updates, checksums.

Owned by a rank (``execution.rank.Rank.refit``), whose methods the rank client runs on every
rank at once. Loading always goes through ``Rank.stage_weights`` (the one ingest path: HF
names, fused q/k/v and gate/up, TP shards, tied embeddings); this module only decides where
the tensors come from.

Held updates (``stage_distributed(..., hold=True)``, ``hold_tensors`` / ``restage_held`` /
``discard_held``) let several engines stage one update each and commit only once every engine
staged successfully.
One update is held at a time: its received ``(name, view)`` pairs (views into the group's
staging arena), not destination views -- the engine may move its parameters' storage in
between (sleep / wake), so the commit validates again against the live parameters.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine_core.errors import ModelLoadError
from engine_core.weights.loader import (
    hf_names,
    owner_key,
    owner_of,
    param_view,
)
from engine_core.weights.sglang_payloads import FlattenedMetas
from weight_sync import (
    UpdatePlan,
    WeightGroup,
    WeightSyncError,
    create_group,
    iter_colocated,
)
from weight_sync.checksum import tensor_checksum
from weight_sync.staging import StagingArena

log = logging.getLogger(__name__)


@dataclass
class _Member:
    """This rank's membership of one weight-update group and the arena it receives into."""

    group: WeightGroup
    arena: StagingArena
    broken: str | None = None  # set after a transport error: the stream may be out of sync

    def close(self) -> None:
        self.arena.close()
        self.group.destroy()


class RankRefit:
    """Per-rank refit state; every method runs on every TP rank in the same order."""

    def __init__(self, rank: Any) -> None:
        self.rank = rank  # execution.rank.Rank: its weights, storages and TP group
        self.members: dict[str, _Member] = {}
        self.held: list[tuple[str, torch.Tensor]] | None = None
        self.held_group: str | None = None
        self._locks: dict[str, threading.Lock] = {}

    # ---------------------------------------------------------------- groups
    def init_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
        timeout_s: float,
    ) -> int:
        """Join ``group_name`` as rank ``rank_offset + tp_rank``; returns that rank."""
        if group_name in self.members:
            raise ValueError(f"weight-update group {group_name!r} already exists on this engine")
        rank = rank_offset + self.rank.tp.rank
        device = self.rank.device if backend == "nccl" else torch.device("cpu")
        group = create_group(
            master_address,
            master_port,
            rank,
            world_size,
            group_name,
            backend=backend,
            timeout_s=timeout_s,
            device=device,
        )
        # Receive on the group's device (CPU for gloo); a complete update is adopted at commit
        # (engine_core.adopt), anything else copied.
        self.members[group_name] = _Member(group, StagingArena(group.device))
        return rank

    def destroy_group(self, group_name: str) -> bool:
        """Leave ``group_name`` (a held update received through it is dropped); idempotent."""
        member = self.members.pop(group_name, None)
        if self.held_group == group_name:
            self.discard_held()
        if member is None:
            return False
        member.close()
        return True

    def _member(self, group_name: str) -> _Member:
        member = self.members.get(group_name)
        if member is None:
            known = sorted(self.members) or "none"
            raise ValueError(f"no weight-update group {group_name!r} on this engine ({known})")
        if member.broken is not None:
            raise WeightSyncError(
                f"weight-update group {group_name!r} failed earlier ({member.broken}); "
                "destroy_weights_update_group and init it again"
            )
        return member

    # ---------------------------------------------------------------- staging
    def stage_distributed(
        self,
        group_name: str,
        plan: UpdatePlan | None,
        metas: Sequence | None = None,
        hold: bool = False,
    ) -> int:
        """Receive a whole update (``plan``: bucket protocol, else ``metas``: one broadcast per
        tensor) into the arena, then validate this rank's shards; nothing is written. With
        ``hold`` the validated update is kept for ``restage_held`` instead of the rank's
        ``commit_weights``."""
        with self.receiving(group_name):
            pairs = self.receive(group_name, plan, metas)
            return self.stage_received(group_name, pairs, hold)

    def receiving(self, group_name: str) -> threading.Lock:
        """Held around receive-and-stage: one update at a time per group, whatever thread
        receives (a tp_size 1 engine receives beside its loop thread)."""
        return self._locks.setdefault(group_name, threading.Lock())

    def receive(
        self, group_name: str, plan: UpdatePlan | None, metas: Sequence | None = None
    ) -> list[tuple[str, torch.Tensor]]:
        """Receive a whole update into a free arena buffer; touches no weight, so it may run
        while the engine steps (it reads only which storages the parameters use)."""
        if self.held_group == group_name:
            raise RuntimeError(
                f"an update received through {group_name!r} is still held; commit or discard it"
            )
        member = self._member(group_name)
        in_use = self.rank.weight_storages()
        try:
            if plan is not None:
                return member.arena.receive(member.group, plan, in_use=in_use)
            if isinstance(metas, FlattenedMetas):  # one broadcast, split into its tensors
                [(_, flat)] = member.arena.receive_tensors(
                    member.group, [metas.flat_meta()], in_use=in_use
                )
                return metas.split(flat)
            return member.arena.receive_tensors(member.group, metas or [], in_use=in_use)
        except BaseException as exc:
            # Only a sender's abort header leaves the stream in sync (it is the update's last
            # message); after anything else this rank and the sender disagree on what is next.
            if not (isinstance(exc, WeightSyncError) and "sender aborted" in str(exc)):
                first = (str(exc).splitlines() or [""])[0][:300]
                member.broken = f"{type(exc).__name__}: {first}"
            raise

    def stage_received(
        self, group_name: str, pairs: list[tuple[str, torch.Tensor]], hold: bool = False
    ) -> int:
        """Validate received pairs (loop thread); ``hold`` keeps them for ``restage_held``."""
        # The arena's buffer is ours: a complete update becomes the parameters' storage.
        count = self.stage_pairs(pairs, adopt=True)
        if hold:
            self.rank.discard_weights()  # only the received pairs are kept, see the module doc
            self.held, self.held_group = pairs, group_name
        return count

    def stage_colocated(self, handles: Sequence[Any], hold: bool = False) -> int:
        """Map the trainer's shared buckets (no copy) and validate this rank's shards."""
        if hold:
            return self.hold_tensors(iter_colocated(handles))
        return self.stage_pairs(iter_colocated(handles))

    def hold_tensors(self, pairs: Iterable[tuple[str, Any]]) -> int:
        """Validate a tensor refit, then hold a private copy of it for ``restage_held`` (the
        caller's tensors or shared buckets may change or vanish before the commit). With TP
        every rank copies the full tensors it was given, not only its shards."""
        pairs = list(pairs)
        count = self.stage_pairs(pairs)
        self.rank.discard_weights()
        owned = [(n, t.detach().clone()) for n, t in pairs]  # validated: all tensors
        self.held, self.held_group = owned, None
        return count

    def stage_pairs(self, pairs: Iterable[tuple[str, torch.Tensor]], adopt: bool = False) -> int:
        # Refits must match the engine's dtype exactly (no silent casts of trainer tensors).
        # Only received buffers are adopted; a trainer's tensors are always copied.
        return self.rank.stage_weights(
            pairs, require_complete=False, strict_dtype=True, adopt=adopt
        )

    def after_commit(self, keep_staging: bool) -> None:
        """The weights are switched: keep a spare arena buffer for the next update
        (``keep_staging``) or free the unused ones. Best-effort: nothing here may fail the
        refit (e.g. no memory for the spare on a GPU whose KV cache took the rest)."""
        if not self.members:
            return
        try:
            if keep_staging:
                self.reserve_spares(self.rank.weight_storages())
            else:
                self.release_staging(self.rank.weight_storages())  # buffers nothing uses
        except Exception:
            log.warning("could not prepare the refit staging spare; continuing", exc_info=True)

    def reserve_spares(self, in_use: set[int]) -> None:
        """After a commit: every arena keeps a touched buffer neither the weights nor a held
        update use."""
        in_use = in_use | {t.untyped_storage().data_ptr() for _, t in self.held or []}
        for member in self.members.values():
            member.arena.reserve_spare(in_use)

    def release_staging(self, counted: set[int]) -> int:
        """Free every arena buffer a held update does not use (weights released); returns the
        bytes freed outside the storages in ``counted``."""
        keep = {t.untyped_storage().data_ptr() for _, t in self.held or []}
        freed = 0
        for member in self.members.values():
            freed += sum(n for ptr, n in member.arena.buffers() if ptr not in keep | counted)
            member.arena.release_unused(keep)
        return freed

    # ---------------------------------------------------------------- held updates
    def restage_held(self) -> int:
        """Validate the held update again against the live parameters, for ``commit_weights``
        (phase one of the commit; the held pairs stay until ``discard_held``)."""
        if self.held is None:
            raise RuntimeError("no staged update to commit")
        return self.stage_pairs(self.held, adopt=True)

    def discard_held(self) -> None:
        self.held, self.held_group = None, None

    def has_held(self) -> bool:
        return self.held is not None

    # ---------------------------------------------------------------- checksums
    def checksums(self, names: Sequence[str] | None) -> dict[str, str]:
        """``{HF name: sha256}`` of the full tensors (gathered across TP ranks); rank 0's result
        is the answer (other ranks only contribute their shards)."""
        model = self.rank.model
        names = list(names) if names is not None else hf_names(model)
        if self.rank.tp.size == 1:
            return {name: tensor_checksum(param_view(model, name)) for name in names}
        shapes = self._full_shapes(names)
        return {name: tensor_checksum(self._gather(name, shapes[name])) for name in names}

    def _full_shapes(self, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Every name's whole HF shape, from the layers' shard protocol."""
        model = self.rank.model
        shapes: dict[str, tuple[int, ...]] = {}
        for name in names:
            param_view(model, name)  # raises ModelLoadError for a name the model does not have
            path, leaf, shard_id = owner_key(model, name)
            module = owner_of(model, path)
            try:
                shapes[name] = tuple(module.full_shape(leaf, shard_id))  # type: ignore[union-attr]
            except (AttributeError, KeyError, TypeError, ValueError):
                raise ModelLoadError(f"unknown weight name {name!r}") from None
        return shapes

    def _gather(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The full HF tensor behind ``name``, rebuilt from every rank's shard.

        Each rank asks its layer where an index probe of the full shape lands (the same
        ``shard_target`` the loader uses), writes its values there into a zero buffer, and a
        byte-wise MAX all-reduce merges the ranks: every element is owned by at least one rank,
        replicas hold identical bytes and non-owners contribute zeros, so the bytes are exact.
        """
        model, device = self.rank.model, self.rank.device
        path, leaf, shard_id = owner_key(model, name)
        module = owner_of(model, path)
        if module is None:
            raise ModelLoadError(f"unknown weight name {name!r}")
        numel = 1
        for d in shape:
            numel *= d
        probe = torch.arange(numel, device=device).view(shape)
        dst, src = module.shard_target(leaf, probe, shard_id)
        full = torch.zeros(numel, dtype=dst.dtype, device=device)
        full[src.reshape(-1)] = dst.reshape(-1)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.rank.tp.group.allreduce([full.view(torch.uint8)], opts).wait()
        return full.view(shape)

    # ---------------------------------------------------------------- teardown
    def close(self) -> None:
        """Leave every group and free every arena (engine shutdown)."""
        self.discard_held()
        for name in list(self.members):
            self.destroy_group(name)
