"""Engine-wide memory state: explicit release/resume and sleep-on-idle.

Every method that changes memory runs on the engine loop thread, between two steps, and calls
every TP rank (the rank client); ``control.rank_memory.RankMemory`` does the per-rank work.

State: ``released`` is the set of tags ("weights", "kv_cache") whose memory is gone;
``idle_released`` is the part the idle timer released, which the next request wakes
transparently. Anything released explicitly blocks steps until ``resume``; a request submitted
meanwhile raises ``EngineReleasedError`` (``generate_while_released="raise"``) or waits.

Where resumed weights come from (``weights=`` of ``resume``): ``"host"`` (a copy kept at
release: CUDA only), ``"checkpoint"`` (the last refit-from-disk directory, else the original
model directory; only while no tensor/distributed refit came after it, since those leave no
file to re-read), or ``"empty"`` (allocated, unfilled: the next refit must load every tensor;
until one has, steps stay blocked). ``"auto"`` takes the first of those that applies, so after
a tensor/distributed refit on CPU it is ``"empty"``: keep ``weights`` resident, or refit again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from engine_core.config import EngineConfig
from engine_core.control.rank_memory import TAGS, WEIGHT_SOURCES
from engine_core.errors import EngineReleasedError, MemoryStateError
from engine_core.execution.rank_client import RankClient
from engine_core.scheduling.scheduler import Scheduler
from engine_core.weights.refitter import WeightVersions

log = logging.getLogger(__name__)


# SGLang's third tag: its CUDA graphs' memory. This engine captures none, so the tag is accepted
# and tracked (release / resume must pair up, as in SGLang) but frees nothing.
CUDA_GRAPH = "cuda_graph"


def normalize_tags(tags: Iterable[str] | str | None) -> set[str]:
    """``None`` means every tag holding memory here; unknown tags raise ValueError naming
    them."""
    if tags is None:
        return set(TAGS)
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, Iterable) or isinstance(tags, bytes | dict):
        raise ValueError(f"invalid tags={tags!r}: must be a tag name, a list of them, or None")
    names = list(tags)
    if not all(isinstance(tag, str) for tag in names):
        raise ValueError(f"invalid tags={tags!r}: every tag must be a str")
    chosen = set(names)
    unknown = chosen - set(TAGS) - {CUDA_GRAPH}
    if unknown:
        raise ValueError(f"unknown memory tags {sorted(unknown)}; known: {[*TAGS, CUDA_GRAPH]}")
    return chosen


def _check_weights_source(weights: object) -> None:
    if weights != "auto" and weights not in WEIGHT_SOURCES:
        raise ValueError(f"weights={weights!r}: must be 'auto' or one of {WEIGHT_SOURCES}")


class MemoryController:
    """Owns which memory is released; its methods other than ``submit_error``/``runnable``/
    ``idle_timeout``/``info`` must run on the loop thread."""

    def __init__(
        self,
        config: EngineConfig,
        ranks: RankClient,
        scheduler: Scheduler,
        versions: WeightVersions,
        on_weights_released: Callable[[], None],
    ):
        self.config = config
        self.ranks = ranks
        self.scheduler = scheduler
        self.versions = versions  # read only: the refitter writes them
        # Frees what the engine holds for refits beside the ranks (loop thread; must not block).
        self.on_weights_released = on_weights_released
        self.host_copy = (
            config.device == "cuda"
            if config.weights_host_copy is None
            else (config.weights_host_copy)
        )
        # Frozen sets, replaced whole: other threads read them without a lock. An idle release
        # marks its tags idle before released, so a reader never sees it as a manual one.
        self.released: frozenset[str] = frozenset()
        self.idle_released: frozenset[str] = frozenset()
        self.awaiting_refit: str | None = None  # version at an "empty" resume, until refilled
        self._checked_version: str | None = None
        self._kept_host_copy = False
        self.last_active = time.monotonic()
        self.num_idle_sleeps = 0
        self.asleep = False  # an idle release completed and no wake since
        self.wake_latencies: deque[float] = deque(maxlen=32)
        self.last_release_s = 0.0
        self.graph_released = False  # SGLang's "cuda_graph" tag (nothing behind it here)

    # ---------------------------------------------------------------- queries (any thread)
    def runnable(self) -> bool:
        """May steps run now? Idle-released memory does not block: ``tick`` wakes it first."""
        released, idle = self.released, self.idle_released
        return released <= idle and self.awaiting_refit is None

    def submit_error(self, verify: Callable[[Callable[[], None]], None]) -> Exception | None:
        """The error a new request gets now (None: accept it). ``verify`` runs a function on the
        loop thread: used once after the refit that follows an ``"empty"`` resume."""
        if self.awaiting_refit is not None and self.versions.current != self.awaiting_refit:
            verify(self._verify_refit)
        if self.runnable() or self.config.generate_while_released == "wait":
            return None
        if self.awaiting_refit is not None:
            return EngineReleasedError(
                "weights were resumed empty (resume_memory_occupation(weights='empty')) and no "
                "complete refit has filled them yet; refit first"
            )
        return EngineReleasedError(
            f"engine memory {sorted(self.released - self.idle_released)} is released; call "
            "resume_memory_occupation() first (or set generate_while_released='wait')"
        )

    def idle_timeout(self) -> float | None:
        """Seconds until the idle timer fires; None when it cannot (off, busy, asleep)."""
        if self.config.sleep_on_idle_s is None or self.scheduler.has_work():
            return None
        if "kv_cache" in self.released:
            return None  # already asleep (or released by hand)
        return self.last_active + self.config.sleep_on_idle_s - time.monotonic()

    def restorable(self) -> bool:
        """Whether the current weights equal the recorded checkpoint's (re-readable)."""
        return self.versions.restorable()

    def info(self) -> dict[str, Any]:
        lat = list(self.wake_latencies)
        return {
            "released": sorted(self.released),
            "asleep_on_idle": self.asleep,
            "awaiting_refit": self.awaiting_refit is not None,
            "num_idle_sleeps": self.num_idle_sleeps,
            "num_wakes": len(lat),
            "last_wake_latency_s": lat[-1] if lat else None,
            "mean_wake_latency_s": sum(lat) / len(lat) if lat else None,
            "last_release_s": self.last_release_s,
        }

    # ---------------------------------------------------------------- loop thread
    def release_requested(self, tags: set[str], explicit: bool) -> dict[str, Any]:
        """A caller's release (``Engine.release_memory_occupation``): memory the caller already
        released raises ``MemoryStateError`` (with None, only when everything is); memory the
        idle timer released becomes the caller's. None (not ``explicit``) includes
        ``cuda_graph``, as SGLang's."""
        tags = tags if explicit else tags | {CUDA_GRAPH}
        held = self.released - self.idle_released
        again = sorted(t for t in tags if t in held or (t == CUDA_GRAPH and self.graph_released))
        if again and (explicit or len(again) == len(tags)):
            raise MemoryStateError(
                f"memory {again} is already released; resume_memory_occupation() first"
            )
        if CUDA_GRAPH in tags:
            self.graph_released = True
        return self.release(tags - {CUDA_GRAPH})

    def resume_requested(self, tags: set[str], explicit: bool, weights: str) -> dict[str, Any]:
        """A caller's resume: tags named that are not released raise ``MemoryStateError``; with
        None, whatever is released is resumed (and nothing released raises)."""
        tags = tags if explicit else tags | {CUDA_GRAPH}
        released = set(self.released) | ({CUDA_GRAPH} if self.graph_released else set())
        missing = sorted(tags - released) if explicit else []
        if missing or not (tags & released):
            raise MemoryStateError(
                f"memory {missing or sorted(tags)} is not released; nothing to resume"
            )
        _check_weights_source(weights)  # before any state changes
        if CUDA_GRAPH in tags:
            self.graph_released = False
        return self.resume(tags - {CUDA_GRAPH}, weights)

    def release(self, tags: set[str], idle: bool = False) -> dict[str, Any]:
        """Free ``tags`` on every rank. KV first retracts running requests (their tokens are
        kept; they recompute their KV after resume)."""
        started = time.perf_counter()
        freed: dict[str, int] = {}
        if idle:
            self.idle_released = self.idle_released | (tags - self.released)
        else:
            self.idle_released = self.idle_released - tags  # now held released by the caller
        if "kv_cache" in tags and "kv_cache" not in self.released:
            for req in reversed(list(self.scheduler.running)):  # newest first keeps order
                self.scheduler.retract(req)
            self.scheduler.reset_cache()  # the cached pages' KV is about to be freed
            self.released = self.released | {"kv_cache"}
            freed["kv_cache"] = self.ranks.release_kv_cache()
        if "weights" in tags and "weights" not in self.released:
            self.released = self.released | {"weights"}
            freed["weights"] = self.ranks.release_weights(self.host_copy)
            self._kept_host_copy = self.host_copy
            self.on_weights_released()
        self.asleep = self.asleep and bool(self.idle_released)
        self.last_release_s = time.perf_counter() - started
        return {"released": sorted(self.released), "freed_bytes": freed}

    def resume(self, tags: set[str], weights: str = "auto") -> dict[str, Any]:
        """Re-allocate ``tags`` on every rank; weights from ``weights`` (see module doc)."""
        _check_weights_source(weights)
        started = time.perf_counter()
        result: dict[str, Any] = {}
        if "weights" in tags and "weights" in self.released:
            source = self._weights_source(weights)
            checkpoint = self.versions.checkpoint
            path = checkpoint[0] if source == "checkpoint" and checkpoint else None
            self.ranks.resume_weights(source, path)
            self.released = self.released - {"weights"}
            self.idle_released = self.idle_released - {"weights"}
            self.awaiting_refit = self.versions.current if source == "empty" else None
            result["weights_source"] = source
        if "kv_cache" in tags and "kv_cache" in self.released:
            self.ranks.resume_kv_cache()
            self.released = self.released - {"kv_cache"}
            self.idle_released = self.idle_released - {"kv_cache"}
        self.last_active = time.monotonic()
        self.asleep = self.asleep and bool(self.idle_released)
        result.update(released=sorted(self.released), seconds=time.perf_counter() - started)
        return result

    def _weights_source(self, wanted: str) -> str:
        if wanted == "host" and not self._kept_host_copy:
            raise ValueError("no host copy was kept at release (weights_host_copy is off)")
        if wanted == "checkpoint" and not self.restorable():
            raise ValueError(
                f"weights version {self.versions.current!r} came from a tensor/distributed "
                "refit, not from a checkpoint: resume with weights='empty' and refit"
            )
        if wanted != "auto":
            return wanted
        if self._kept_host_copy:
            return "host"
        return "checkpoint" if self.restorable() else "empty"

    def before_refit(self) -> None:
        """Refits need resident weights: wake idle-released ones, refuse released ones."""
        if "weights" in self.idle_released:
            self.resume({"weights"})
        if "weights" in self.released:
            raise EngineReleasedError(
                "weights are released: resume_memory_occupation(['weights']) (weights='empty' "
                "to skip re-reading them) before a refit"
            )

    def _verify_refit(self) -> None:
        if self.awaiting_refit is None or self.versions.current == self._checked_version:
            return
        self._checked_version = self.versions.current
        try:
            self.ranks.check_weights_loaded()
        except Exception as exc:
            log.warning("refit after an empty resume left weights unfilled: %s", exc)
            return
        self.awaiting_refit = None

    def tick(self, has_work: bool, paused: bool) -> None:
        """Each loop iteration: verify a refit after an empty resume, wake idle-released memory
        when a request is about to run, or release after ``sleep_on_idle_s`` idle seconds."""
        now = time.monotonic()
        if self.awaiting_refit is not None and self.versions.current != self.awaiting_refit:
            self._verify_refit()
        if has_work:
            self.last_active = now
            if self.idle_released and not paused:
                self._wake()
            return
        timeout = self.idle_timeout()
        if timeout is not None and timeout <= 0:
            tags = {"kv_cache"}
            if self.config.sleep_on_idle_weights and (self.host_copy or self.restorable()):
                tags.add("weights")  # else the weights could not be brought back: keep them
            self.release(tags, idle=True)
            self.num_idle_sleeps += 1
            self.asleep = True

    def _wake(self) -> None:
        started = time.perf_counter()
        self.asleep = False
        self.resume(set(self.idle_released))
        self.wake_latencies.append(time.perf_counter() - started)
