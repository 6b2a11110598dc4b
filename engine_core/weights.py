"""Refits: swap an engine's weights without a restart, atomically and versioned.

Every refit goes through the model runner's single ingest path on every TP rank, in two
phases run on the loop thread between two steps: all ranks validate their shards (stage),
then all copy (commit). So no forward ever sees half-written weights, a bad update leaves the
old weights bitwise intact, requests in flight continue on the new weights from their next
token on, and each output token records the version that produced it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from engine_core.engine_loop import EngineLoop
from engine_core.errors import ModelLoadError
from engine_core.model_config import ModelConfig, load_model_config

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


class WeightUpdater:
    """Owns the engine's ``weight_version`` and applies refits through the loop."""

    def __init__(
        self,
        loop: EngineLoop,
        executor: Any,
        model_cfg: ModelConfig,
        version: str,
        on_flush: Callable[[], None] = lambda: None,
    ):
        self.loop = loop
        self.executor = executor
        self.model_cfg = model_cfg
        self.version = version
        self.on_flush = on_flush  # drops cached KV (prefix cache) computed with old weights
        # Runs first in every refit, on the loop thread (engine_core.sleep: weights resident?).
        self.guard: Callable[[], None] = lambda: None
        # (directory, version) of the last refit from disk; None after a tensor refit. The
        # weights can be re-read from it while the version is still that one.
        self.checkpoint: tuple[str, str] | None = None

    def apply(
        self,
        named: Iterable[tuple[str, torch.Tensor]],
        version: str | None,
        *,
        require_complete: bool,
        strict_dtype: bool,
        flush_cache: bool = True,
    ) -> dict:
        """Load HF-named tensors on every rank; bump the version only if all of them loaded."""
        tensors = list(named)
        return self._two_phase(
            version,
            flush_cache,
            "stage_weights",
            tensors,
            require_complete=require_complete,
            strict_dtype=strict_dtype,
        )

    def from_disk(self, model_path: str, version: str | None) -> dict:
        new = load_model_config(model_path)
        for field in _SHAPE_FIELDS:
            if getattr(new, field) != getattr(self.model_cfg, field):
                raise ModelLoadError(
                    f"{model_path}: config {field}={getattr(new, field)!r} differs from the "
                    f"running model's {getattr(self.model_cfg, field)!r}"
                )
        return self._two_phase(version, True, "stage_checkpoint", model_path)

    def _two_phase(self, version: str | None, flush_cache: bool, stage: str, *args, **kwargs):
        """Every rank validates (stage) before any rank writes (commit): atomic across TP."""

        def run() -> dict:
            self.guard()
            try:
                count = self.executor.call(stage, *args, **kwargs)
            except BaseException:
                self.executor.call("discard_weights")
                raise
            self.executor.call("commit_weights")
            if flush_cache:
                self.on_flush()
            self.version = self._next_version(version)
            from_disk = stage == "stage_checkpoint"
            self.checkpoint = (args[0], self.version) if from_disk else None
            return {"success": True, "num_tensors": count, "weight_version": self.version}

        return self.loop.call(run)

    def _next_version(self, version: str | None) -> str:
        if version is not None:
            return str(version)
        # No version given: count refits, keeping the user's prefix readable.
        base, _, count = self.version.rpartition("+")
        return f"{base}+{int(count) + 1}" if count.isdigit() and base else f"{self.version}+1"

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[float]:
        return self.loop.call(lambda: self.executor.call("get_weight_values", name, truncate_size))
