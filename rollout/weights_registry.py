"""``RolloutDriver``'s weights registry: which weights the service serves, for restarts.

The driver records the last checkpoint a restarted engine can load (``weights_source``) and
the version every engine in rotation must serve (``note_refit``, after refits pushed from
memory). An engine that comes back on another version is kept out of rotation as "stale"
until a refit reaches it (the driver's ``_watch`` and ``note_refit`` decide).
"""

from __future__ import annotations

import asyncio
from typing import Any

from rollout.engine_actor import WeightsSource


class WeightsRegistryMixin:
    """Mixed into ``RolloutDriver``; uses its ``_state``, ``_engines``, ``_cond`` and
    ``_watch``."""

    _weights: WeightsSource
    _version: str
    _state: list[str]
    _engines: list[Any]

    async def weights_source(self, restarting: int | None = None) -> WeightsSource:
        """The last weights a restarted engine can load (a checkpoint directory).

        ``restarting``: the index of the engine asking, from its constructor after Ray
        restarted it -- possibly outside any rollout, so the driver learns of the restart here
        and watches the engine come back (stale if on older weights than the current ones)."""
        if restarting is not None and 0 <= restarting < len(self._state):
            if self._state[restarting] == "up":
                self._state[restarting] = "restarting"
                asyncio.ensure_future(self._watch(restarting))
        return self._weights

    def set_weights_source(self, model_path: str, weight_version: str) -> None:
        """Record the current weights without pushing them (engines already have them)."""
        self._weights = WeightsSource(model_path, weight_version)
        self._version = weight_version

    async def note_refit(self, weight_version: str) -> None:
        """The service's weights are now ``weight_version`` (pushed from memory, e.g. by a
        ``WeightSync`` refit: no directory to reload). Engines in rotation or stale are asked
        their version: those on it are (back) in rotation, the others -- e.g. restarted since,
        on older weights, or outside the refit -- stay out ("stale") until a refit reaches
        them. Engines still restarting are judged by their watcher against this version."""
        self._version = str(weight_version)
        candidates = [i for i, s in enumerate(self._state) if s in ("up", "stale")]
        versions = await asyncio.gather(*(self._version_of(i) for i in candidates))
        cond = self._cond()
        async with cond:
            for index, version in zip(candidates, versions):
                if version is not None and self._state[index] in ("up", "stale"):
                    self._state[index] = "up" if version == self._version else "stale"
            cond.notify_all()

    async def _version_of(self, index: int) -> str | None:
        """Engine ``index``'s weight version, or None if it does not answer (a failed call
        in a rollout, or its restart, will say what happened to it)."""
        try:
            health = await asyncio.wait_for(self._engines[index].health.remote(), 60)
        except Exception:
            return None
        return health.get("weight_version")

    async def update_weights_from_disk(
        self, model_path: str, weight_version: str | None = None
    ) -> list[Any]:
        """Load ``model_path`` on every live engine. The source is recorded first, so an engine
        restarting meanwhile also comes up on it. Without a version, the path is the version."""
        version = weight_version if weight_version is not None else model_path
        self.set_weights_source(model_path, version)
        live = [i for i, s in enumerate(self._state) if s in ("up", "stale")]
        calls = [
            self._engines[i].update_weights_from_disk.remote(model_path, version) for i in live
        ]
        results = list(await asyncio.gather(*calls))
        await self.note_refit(version)  # stale engines were refitted too
        return results
