"""RL control of an engine: memory release/resume, sleep-on-idle, pause/continue.

``EngineControl`` is the engine loop's ``LoopControl`` (it decides whether steps may run, and
ticks the idle timer on the loop thread); ``ControlAPI`` is the public half of ``Engine``.
Every verb runs on the loop thread between two steps (``loop.call``), so it never races a
forward, and it still runs while generation is paused or memory is released.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from engine_core.pause import PauseController
from engine_core.sleep import MemoryController, normalize_tags


class EngineControl:
    """Pause + memory state of one engine; wired into its loop and refits by ``attach``."""

    def __init__(self, engine: Any) -> None:
        self.loop = engine.loop
        self.memory = MemoryController(
            engine.config, engine.executor, engine.scheduler, engine.weights
        )
        self.pause = PauseController(engine.scheduler, engine.loop.abort_now)
        # On the loop thread, so never wait for a refit that is packing (it waits for the loop).
        self.memory.on_weights_released = lambda: engine.release_refit_segments(blocking=False)

    @classmethod
    def attach(cls, engine: Any) -> EngineControl:
        """Build the control of ``engine`` (loop, executor, scheduler, weights already made)
        and install it: the loop consults it, refits call its guard first."""
        control = cls(engine)
        engine.weights.guard = control.memory.before_refit
        engine.loop.set_control(control)
        return control

    # ---- LoopControl (called by the loop; cheap ones may hold the loop lock) ----
    def runnable(self) -> bool:
        return not self.pause.paused and self.memory.runnable()

    def tick(self, has_work: bool) -> None:
        self.memory.tick(has_work, self.pause.paused)

    def idle_timeout(self) -> float | None:
        return self.memory.idle_timeout()

    # ---- engine side ----
    def submit_error(self) -> Exception | None:
        return self.memory.submit_error(self.loop.call)

    def info(self) -> dict[str, Any]:
        return {"memory": self.memory.info(), **self.pause.info()}


class ControlAPI:
    """``Engine``'s RL-control verbs (SGLang names). Thread-safe; each blocks until applied."""

    loop: Any
    control: EngineControl

    def release_memory_occupation(self, tags: Iterable[str] | str | None = None) -> dict:
        """Free the engine's ``tags`` memory ("weights", "kv_cache"; None: both) on every TP
        rank, between two steps. Running requests are retracted first when the KV cache goes
        (tokens kept; they continue after resume). Until resumed, generating raises
        ``EngineReleasedError`` (or waits: ``generate_while_released="wait"``). On CPU the
        memory returns to the OS and weights are discarded (re-read on resume); on CUDA
        ``memory_reserved`` drops and weights are kept in pinned host memory when
        ``weights_host_copy`` (CUDA paths are untested here: only CPU ran)."""
        chosen = normalize_tags(tags)
        return self.loop.call(lambda: self.control.memory.release(chosen))

    def resume_memory_occupation(
        self, tags: Iterable[str] | str | None = None, weights: str = "auto"
    ) -> dict:
        """Re-allocate ``tags`` (None: both). ``weights``: ``"auto"`` | ``"host"`` |
        ``"checkpoint"`` | ``"empty"`` (see ``engine_core.sleep``): after a tensor/distributed
        refit on CPU only ``"empty"`` applies, and generation waits for the next full refit."""
        chosen = normalize_tags(tags)
        return self.loop.call(lambda: self.control.memory.resume(chosen, weights))

    def pause_generation(self, mode: str = "abort") -> dict:
        """Stop generating: ``"abort"`` | ``"retract"`` | ``"in_place"`` (see
        ``engine_core.pause``). New requests queue; aborts, refits and memory verbs still work."""
        return self.loop.call(lambda: self.control.pause.pause(mode))

    def continue_generation(self) -> dict:
        """Resume generating after ``pause_generation`` (a no-op when not paused)."""
        return self.loop.call(self.control.pause.resume)

    @property
    def is_paused(self) -> bool:
        return self.control.pause.paused
