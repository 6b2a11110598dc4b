"""Book-keeping of one batch call of the driver: per-item arguments and rollout progress.

Pure Python (no Ray, no torch), shared by ``RolloutDriver`` and its partial-rollout methods.
"""

from __future__ import annotations

import time
from typing import Any


def per_item(value: Any, batch: int, name: str, nested: bool) -> list[Any]:
    """Broadcast a scalar to the batch, or take a list of one value per item."""
    is_list = isinstance(value, (list, tuple)) and (
        not nested or value and isinstance(value[0], (list, tuple, dict))
    )
    if is_list:
        if len(value) != batch:
            raise ValueError(f"invalid {name}: has {len(value)} items for a batch of {batch}")
        return list(value)
    return [value] * batch


def per_item_args(
    batch: int,
    sampling_params: Any,
    return_logprob: Any,
    logprob_start_len: Any,
    top_logprobs_num: Any,
) -> tuple[list, list[list]]:
    """Per-item sampling params and the three logprob flags, broadcast or length-checked."""
    params = per_item(sampling_params, batch, "sampling_params", nested=False)
    flags = [
        per_item(value, batch, name, nested=False)
        for value, name in (
            (return_logprob, "return_logprob"),
            (logprob_start_len, "logprob_start_len"),
            (top_logprobs_num, "top_logprobs_num"),
        )
    ]
    return params, flags


class Rollout:
    """Book-keeping of one ``generate`` call (progress and in-flight requests)."""

    def __init__(self, rollout_id: str, groups: int, samples: int) -> None:
        self.id = rollout_id
        self.total_groups = groups
        self.total_samples = samples
        self.finished_groups = 0
        self.finished_samples = 0
        self.completion_tokens = 0
        self.resent_groups = 0
        self.started = time.monotonic()
        self.ended: float | None = None
        self.error: str | None = None
        self.inflight: dict[int, tuple[int, str, int]] = {}  # group -> (engine, rid, n)

    def snapshot(self) -> dict[str, Any]:
        elapsed = (self.ended or time.monotonic()) - self.started
        return {
            "rollout_id": self.id,
            "finished_samples": self.finished_samples,
            "total_samples": self.total_samples,
            "finished_groups": self.finished_groups,
            "total_groups": self.total_groups,
            "completion_tokens": self.completion_tokens,
            "resent_groups": self.resent_groups,
            "elapsed_s": elapsed,
            "tokens_per_s": self.completion_tokens / elapsed if elapsed > 0 else 0.0,
            "done": self.ended is not None,
            "error": self.error,
        }
