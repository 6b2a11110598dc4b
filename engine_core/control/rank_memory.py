"""Releasing and restoring one TP rank's memory: its weights and its KV cache.

``RankMemory`` is one rank's part (built by ``execution.rank.Rank``); the engine reaches it on
every rank through the rank client (so TP worker processes free their own memory), always from
the engine loop thread between two steps (the engine side is ``control.engine_memory``).

Memory really goes back to the OS: released tensors are replaced by empty ones (the
``nn.Parameter`` objects stay, so every reference to them stays valid), then

- on CPU, glibc returns blocks above its mmap threshold at ``free`` (munmap) and
  ``malloc_trim(0)`` hands back what smaller blocks left free in its heaps; a host copy of
  the weights would free nothing, so weights are discarded and later re-read from a checkpoint
  (or left for the next refit to fill);
- on CUDA, ``torch.cuda.empty_cache`` returns the allocator's cached blocks, so
  ``torch.cuda.memory_reserved`` drops; weights may be kept in pinned host memory and copied
  back on resume. (Real code chosen by device, but only ever run on CPU here.)
"""

from __future__ import annotations

import ctypes
import gc
import os
from typing import Any

import torch

from engine_core.layers.sharded import WeightOwner
from engine_core.weights.loader import iter_checkpoint, load_weights

TAGS = ("weights", "kv_cache")
WEIGHT_SOURCES = ("host", "checkpoint", "empty")


# ---------------------------------------------------------------- process memory
def rss_bytes(pid: int) -> int:
    """Resident set size of one process (``VmRSS``); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from every thread's ``children`` list)."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return kids


def process_tree_rss(pid: int | None = None) -> int:
    """RSS summed over ``pid`` (default: this process) and all its descendants (TP ranks)."""
    todo, total, seen = [pid or os.getpid()], 0, set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        total += rss_bytes(current)
        todo.extend(child_pids(current))
    return total


def return_freed_memory(device: torch.device) -> None:
    """Hand memory freed by dropped tensors back to the OS (CUDA cache / glibc heaps)."""
    gc.collect()  # tensors caught in reference cycles are freed only by the collector
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: big blocks were still munmapped at free
        pass


# ---------------------------------------------------------------- rank side
def _drop(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device)


class RankMemory:
    """Release/restore of one rank's weights and KV cache. Each method returns or raises on
    this rank only; the engine keeps the engine-wide state (``control.engine_memory``)."""

    def __init__(
        self, model: torch.nn.Module, kv: Any, device: torch.device, refit: Any, packed: Any
    ):
        self.model = model
        # layers.packed_linear.PackedLinear or None: its packs are released and rebuilt with
        # the weights they derive from.
        self.packed = packed
        self.kv = kv  # execution.kv_cache.KVCache
        self.device = device
        self.refit = refit  # weights.rank_refit.RankRefit: its staging buffers go with weights
        self._weight_shapes: dict[str, torch.Size] | None = None
        self._host_weights: dict[str, torch.Tensor] | None = None

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds in weights and KV cache now."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if self.packed is not None:
            weights += self.packed.nbytes
        return {"weights": weights, "kv_cache": self.kv.nbytes()}

    # ---- KV cache ----
    def release_kv_cache(self) -> int:
        """Free every layer's K/V pages; the caller has retracted all requests first."""
        freed = self.kv.release()
        return_freed_memory(self.device)
        return freed

    # ---- weights ----
    def release_weights(self, host_copy: bool) -> int:
        """Free the parameters' memory, keeping their shapes (and, with ``host_copy``, their
        values in pinned host memory: CUDA only, on CPU it would free nothing)."""
        if self._weight_shapes is not None:
            return 0  # already released
        if host_copy and self.device.type != "cuda":
            raise ValueError("a host copy of CPU weights frees nothing; use host_copy=False")
        shapes, host = {}, {}
        freed = self.packed.release() if self.packed is not None else 0
        counted = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        for name, param in self.model.named_parameters():
            shapes[name] = param.shape
            freed += param.numel() * param.element_size()
            if host_copy:
                host[name] = torch.empty(param.shape, dtype=param.dtype, pin_memory=True)
                host[name].copy_(param.data)
            param.data = _drop(param.data)
        self._weight_shapes, self._host_weights = shapes, (host if host_copy else None)
        freed += self.refit.release_staging(counted)
        return_freed_memory(self.device)
        return freed

    def resume_weights(self, source: str, checkpoint: str | None = None) -> None:
        """Re-allocate the parameters and fill them from ``source``: ``"host"`` (the copy kept
        at release), ``"checkpoint"`` (re-read ``checkpoint`` through the one ingest path), or
        ``"empty"`` (NaN sentinels, for the next refit to overwrite; ``check_weights_loaded``
        tells whether it did). On error the weights stay released."""
        if self._weight_shapes is None:
            return
        if source not in WEIGHT_SOURCES:
            raise ValueError(f"weights source {source!r}: must be one of {WEIGHT_SOURCES}")
        if source == "host" and self._host_weights is None:
            raise ValueError("no host copy of the weights was kept at release")
        params = dict(self.model.named_parameters())
        try:
            for name, shape in self._weight_shapes.items():
                param = params[name]
                fill = float("nan") if source == "empty" else 0.0
                param.data = torch.full(shape, fill, dtype=param.dtype, device=self.device)
            if source == "empty":
                self._zero_vocab_padding()
            elif source == "host":
                for name, copy in self._host_weights.items():  # type: ignore[union-attr]
                    params[name].data.copy_(copy, non_blocking=False)
            else:
                if checkpoint is None:
                    raise ValueError("resume from a checkpoint needs its path")
                load_weights(self.model, iter_checkpoint(checkpoint), require_complete=True)
            if source != "empty" and self.packed is not None:
                self.packed.refresh(self.model)  # "empty": the refit that fills them repacks
        except BaseException:
            if self.packed is not None:
                self.packed.release()
            for param in params.values():
                param.data = _drop(param.data)
            return_freed_memory(self.device)
            raise
        self._weight_shapes, self._host_weights = None, None

    def _zero_vocab_padding(self) -> None:
        # Padding rows (vocab not divisible by tp_size) are never loaded; they must stay 0.
        with torch.no_grad():
            for module in self.model.modules():
                first = module.padding_rows() if isinstance(module, WeightOwner) else None
                if first is not None:
                    module.weight[first:].zero_()

    def check_weights_loaded(self) -> None:
        """Raise naming the parameters still holding the ``"empty"`` resume's NaN sentinels
        (a refit did not cover them)."""
        if self._weight_shapes is not None:
            raise RuntimeError("weights are released")
        missing = [n for n, p in self.model.named_parameters() if torch.isnan(p).any().item()]
        if missing:
            shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
            raise RuntimeError(f"{len(missing)} parameters not loaded since resume: {shown}")
