"""``WeightSyncActor``: pushes a trainer's weights to every engine over one weight-update group.

The actor is rank 0 (the sender) of a standalone group with every TP rank of every engine:
world = 1 + sum(tp sizes), engine ``i``'s ranks start at ``1 + sum(tp sizes before i)``. One
``update_weights`` call is one refit of all engines, all or nothing:

1. every engine starts ``update_weights_from_distributed(plan, commit=False)``: it receives the
   whole update into its staging arena and validates it on every TP rank, writing nothing;
2. this actor streams the plan's buckets (``weight_sync.WeightSender``);
3. only if every engine staged successfully, every engine commits and switches its version;
   otherwise every engine discards, and the call raises with every engine on the old weights.

After a transport failure (dead peer, timeout) the group is torn down; the next
``update_weights`` forms a new one. ``WeightSync`` is the same class without Ray's wrapper, for
a trainer that wants to own the sender in its own process (no copy of the state dict through
Ray's object store).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

import ray
import torch

from weight_sync import (
    DEFAULT_BUCKET_BYTES,
    WeightGroup,
    WeightSender,
    WeightSyncError,
    create_group,
    free_port,
    named_tensors_of,
)

log = logging.getLogger(__name__)

Source = str | Mapping[str, torch.Tensor] | torch.nn.Module | list[tuple[str, torch.Tensor]]


class RefitError(RuntimeError):
    """A refit failed; no engine switched to the new weights (unless ``committed`` says so)."""

    def __init__(self, message: str, committed: list[int] | None = None) -> None:
        super().__init__(message)
        self.committed = committed or []

    def __reduce__(self):  # Ray pickles errors back to the caller
        return (RefitError, (str(self), self.committed))


def named_from(source: Source, dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]]:
    """``(HF name, tensor)`` pairs from a checkpoint directory, a state dict, a module or pairs;
    ``dtype`` casts floating-point tensors (the engines' dtype: refits never cast silently)."""
    if isinstance(source, str):
        from engine_core.weights.loader import iter_checkpoint  # the engines' own checkpoint reader

        named = list(iter_checkpoint(source))
    elif isinstance(source, Mapping | torch.nn.Module):
        named = named_tensors_of(source)
    else:
        named = [(name, t.detach()) for name, t in source]
    if dtype is not None:
        named = [(n, t.to(dtype) if t.is_floating_point() else t) for n, t in named]
    return named


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # Ray's task errors start with a traceback banner; the cause is on the last line.
    return text.splitlines()[-1][:500] if text else type(exc).__name__


class WeightSync:
    """Owner of the sender side of the group (``close`` tears it down on every member).

    ``engines``: ``EngineActor`` handles. ``driver``: the service's ``RolloutDriver`` (optional;
    told about every refit, so that an engine Ray restarted on older weights, which it keeps
    out of rotation, rejoins once refitted). An engine that restarted since the group formed
    is noticed (``health()["incarnation"]``) and the group is re-formed before the next refit.
    ``master_address``: the address engines reach this
    process at (default: this node's IP). ``timeout_s`` bounds the rendezvous and every
    transfer; it must exceed the engines' slowest staging. ``dtype`` (e.g. ``"float32"``)
    casts floating-point tensors before sending.
    """

    def __init__(
        self,
        engines: list[Any],
        *,
        driver: Any = None,
        backend: str = "gloo",
        master_address: str | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = 120.0,
        dtype: str | None = None,
    ) -> None:
        if not engines:
            raise ValueError("WeightSync needs at least one engine")
        self.engines = list(engines)
        self.driver = driver
        self.backend = backend
        self.master_address = master_address or ray.util.get_node_ip_address()
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.dtype = getattr(torch, dtype) if dtype else None
        self.group_name: str | None = None
        self._group: WeightGroup | None = None
        self._sender: WeightSender | None = None
        self._incarnations: list[str] = []  # of the engines when the group formed

    # ---------------------------------------------------------------- group
    def init_group(self) -> dict[str, Any]:
        """Form the group with every engine rank (idempotent while it is up)."""
        if self._group is not None:
            if self._incarnations == self._engine_incarnations():
                return self.group_info()
            # An engine restarted (Ray max_restarts) and left the group: form a new one.
            log.warning("an engine restarted since the weight-update group formed; re-forming")
            self.destroy_group()
        self._incarnations = self._engine_incarnations()
        infos = ray.get([e.get_server_info.remote() for e in self.engines])
        tp_sizes = [int(info["config"]["tp_size"]) for info in infos]
        offsets = [1 + sum(tp_sizes[:i]) for i in range(len(tp_sizes))]
        world = 1 + sum(tp_sizes)
        name = f"weight-sync-{uuid.uuid4().hex[:12]}"
        port = free_port(self.master_address)
        refs = [
            engine.init_weights_update_group.remote(
                self.master_address, port, offset, world, name, self.backend, self.timeout_s
            )
            for engine, offset in zip(self.engines, offsets)
        ]
        try:
            # Concurrent with the engines' joins (their calls are already on the way).
            group = create_group(
                self.master_address, port, 0, world, name, self.backend, self.timeout_s
            )
        except BaseException:
            ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
            self._destroy_on_engines(name)
            raise
        ray.get(refs)
        self._group, self.group_name = group, name
        self._sender = WeightSender(group, bucket_bytes=self.bucket_bytes)
        self._tp_sizes, self._offsets, self._world = tp_sizes, offsets, world
        return self.group_info()

    def _engine_incarnations(self) -> list[str]:
        healths = ray.get([e.health.remote() for e in self.engines], timeout=self.timeout_s)
        return [str(h.get("incarnation")) for h in healths]

    def group_info(self) -> dict[str, Any]:
        return {
            "group_name": self.group_name,
            "world_size": self._world,
            "rank_offsets": self._offsets,
            "tp_sizes": self._tp_sizes,
        }

    # ---------------------------------------------------------------- refit
    def update_weights(
        self, source: Source, weight_version: str, flush_cache: bool = True
    ) -> dict[str, Any]:
        """Refit every engine to ``source``; returns once every engine serves
        ``weight_version``. Raises ``RefitError`` with every engine on its old weights."""
        started = time.perf_counter()
        self.init_group()
        named = named_from(source, self.dtype)
        sender, name = self._sender, self.group_name
        assert sender is not None and name is not None
        version = str(weight_version)
        plan = sender.plan(named, version)
        refs = [
            e.update_weights_from_distributed.remote(
                plan,
                group_name=name,
                weight_version=version,
                flush_cache=flush_cache,
                commit=False,
            )
            for e in self.engines
        ]
        send_error = self._send(named, plan)
        errors = self._errors(refs)
        if send_error is not None or errors:
            self._abandon(send_error, errors)
        commits = [e.commit_staged_weights.remote(version, flush_cache) for e in self.engines]
        failed = self._errors(commits)
        if failed:
            ok = [i for i in range(len(self.engines)) if i not in failed]
            shown = {i: _first_line(e) for i, e in failed.items()}
            raise RefitError(f"commit failed on engines {shown}; committed: {ok}", ok)
        if self.driver is not None:  # engines restarted meanwhile may rejoin the rotation
            ray.get(self.driver.note_refit.remote(version), timeout=self.timeout_s)
        return {
            "weight_version": version,
            "num_tensors": plan.num_tensors,
            "total_bytes": plan.total_bytes,
            "num_engines": len(self.engines),
            "seconds": time.perf_counter() - started,
        }

    def _send(self, named, plan) -> BaseException | None:
        assert self._sender is not None
        try:
            self._sender.send(named, plan)
        except (ValueError, WeightSyncError) as exc:
            return exc  # the engines see an abort header / a broken stream and fail too
        return None

    def _errors(self, refs: list[Any]) -> dict[int, Exception]:
        errors = {}
        for i, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=self.timeout_s + 60)
            except Exception as exc:
                errors[i] = exc
        return errors

    def _abandon(self, send_error: BaseException | None, errors: dict[int, Exception]) -> None:
        """Discard everywhere (nothing was committed); tear the group down if the stream broke."""
        discards = [e.discard_staged_weights.remote() for e in self.engines]
        ray.wait(discards, num_returns=len(discards), timeout=self.timeout_s)
        # Ray re-raises an engine's WeightSyncError as a subclass of it; a bad tensor
        # (ModelLoadError) or a sender abort leaves the stream in sync and the group usable.
        aborted = isinstance(send_error, ValueError)
        if isinstance(send_error, WeightSyncError) or (
            not aborted and any(isinstance(e, WeightSyncError) for e in errors.values())
        ):
            self.destroy_group()
        lines = [f"sender: {send_error!r}"] if send_error is not None else []
        lines += [f"engine {i}: {_first_line(e)}" for i, e in sorted(errors.items())]
        raise RefitError(
            "refit abandoned, every engine keeps its old weights:\n" + "\n".join(lines)
        )

    # ---------------------------------------------------------------- verification
    def checksums(self, names: list[str] | None = None) -> list[dict[str, str]]:
        """Every engine's ``get_weights_checksum(names)`` (compare with
        ``weight_sync.checksum.checksums_of`` of what was sent)."""
        return ray.get([e.get_weights_checksum.remote(names) for e in self.engines])

    # ---------------------------------------------------------------- teardown
    def _destroy_on_engines(self, name: str) -> None:
        refs = [e.destroy_weights_update_group.remote(name) for e in self.engines]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        for ref in done:
            try:
                ray.get(ref)
            except Exception:  # a dead engine has nothing left to destroy
                log.warning("destroy_weights_update_group failed on an engine", exc_info=True)

    def destroy_group(self) -> None:
        """Leave the group here and on every engine (idempotent)."""
        group, name = self._group, self.group_name
        self._group, self._sender, self.group_name = None, None, None
        if name is not None:
            self._destroy_on_engines(name)
        if group is not None:
            group.destroy()

    close = destroy_group


WeightSyncActor = ray.remote(WeightSync)
