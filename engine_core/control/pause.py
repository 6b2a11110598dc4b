"""Pausing generation (``Engine.pause_generation`` / ``continue_generation``).

While paused the loop runs no step but still serves its inbox: new requests queue, aborts
finish requests, and ``loop.call`` (refits, memory release/resume) runs. Modes, applied on the
loop thread between two steps:

- ``"abort"``: every request in flight (running or waiting) finishes now with finish_reason
  ``abort`` and its partial output (tokens, logprobs, per-token versions so far);
- ``"retract"``: running requests free their KV pages and go back to the queue, keeping their
  tokens; on continue they recompute their KV (with the weights current then) and go on;
- ``"in_place"``: requests stay as they are, KV included, and go on from there on continue.

A refit while paused applies to every token generated after ``continue_generation``; each
output token records the weight version that produced it (``meta_info.weight_versions``).
"""

from __future__ import annotations

from typing import Any

from engine_core.scheduling.scheduler import Scheduler

PAUSE_MODES = ("abort", "retract", "in_place")


class PauseController:
    """Pause state; ``pause``/``resume`` must run on the loop thread."""

    def __init__(self, scheduler: Scheduler, abort_all: Any) -> None:
        self.scheduler = scheduler
        self._abort_all = abort_all  # finishes every request (the loop's, on its thread)
        self.mode: str | None = None
        self.num_pauses = 0

    @property
    def paused(self) -> bool:
        return self.mode is not None

    def pause(self, mode: str) -> dict[str, Any]:
        """Stop stepping; returns how many requests were aborted/retracted/frozen."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r}: must be one of {PAUSE_MODES}")
        running = len(self.scheduler.running)
        waiting = len(self.scheduler.waiting)
        if mode == "abort":
            self._abort_all(f"aborted by pause_generation(mode={mode!r})")
        elif mode == "retract":
            # Newest first: each retraction requeues at the front, so arrival order is kept.
            for req in reversed(list(self.scheduler.running)):
                self.scheduler.retract(req)
        self.num_pauses += self.mode is None
        self.mode = mode
        return {"paused": True, "mode": mode, "running": running, "waiting": waiting}

    def resume(self) -> dict[str, Any]:
        was = self.mode
        self.mode = None
        return {"paused": False, "was": was}

    def info(self) -> dict[str, Any]:
        return {"paused": self.paused, "pause_mode": self.mode, "num_pauses": self.num_pauses}
