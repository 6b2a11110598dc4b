"""Refits: swap an engine's weights without a restart, atomically and versioned.

Every refit goes through the model runner's single ingest path (validate all, then copy) on
the loop thread between two steps, so in-flight requests continue on the new weights from
their next token on, and each output token records the version that produced it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from engine_core.engine_loop import EngineLoop
from engine_core.errors import ModelLoadError
from engine_core.loader import iter_checkpoint
from engine_core.model_config import load_model_config


class WeightUpdater:
    """Owns the engine's ``weight_version`` and applies refits through the loop."""

    def __init__(
        self,
        loop: EngineLoop,
        runner: Any,
        version: str,
        on_flush: Callable[[], None] = lambda: None,
    ):
        self.loop = loop
        self.runner = runner
        self.version = version
        self.on_flush = on_flush  # drops cached KV (prefix cache) computed with old weights

    def apply(
        self,
        named: Iterable[tuple[str, torch.Tensor]],
        version: str | None,
        require_complete: bool,
        strict_dtype: bool,
        flush_cache: bool = True,
    ) -> dict:
        """Load ``named`` on the loop thread; bump the version only if everything loaded."""
        tensors = list(named)

        def run() -> dict:
            count = self.runner.update_weights(
                tensors, require_complete=require_complete, strict_dtype=strict_dtype
            )
            if flush_cache:
                self.on_flush()
            self.version = self._next_version(version)
            return {"success": True, "num_tensors": count, "weight_version": self.version}

        return self.loop.call(run)

    def from_disk(self, model_path: str, version: str | None) -> dict:
        current = self.runner.model_cfg
        new = load_model_config(model_path)
        for field in (
            "architecture",
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
        ):
            if getattr(new, field) != getattr(current, field):
                raise ModelLoadError(
                    f"{model_path}: config {field}={getattr(new, field)!r} differs from the "
                    f"running model's {getattr(current, field)!r}"
                )
        return self.apply(
            iter_checkpoint(model_path), version, require_complete=True, strict_dtype=False
        )

    def _next_version(self, version: str | None) -> str:
        if version is not None:
            return str(version)
        # No version given: count refits, keeping the user's prefix readable.
        base, _, count = self.version.rpartition("+")
        return f"{base}+{int(count) + 1}" if count.isdigit() and base else f"{self.version}+1"

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[float]:
        def run() -> list[float]:
            return self.runner.get_weight(name).flatten()[:truncate_size].float().tolist()

        return self.loop.call(run)
