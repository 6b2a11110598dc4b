"""``WeightsRegistry``: which weights the service serves, for refits and for restarted engines.

It records the last checkpoint a restarted engine can load (``source``) and tells the engine
table the version every engine in rotation must serve (``note_refit``, after refits pushed
from memory). An engine that comes back on another version is kept out of rotation as "stale"
until a refit reaches it (``EngineTable`` decides).
"""

from __future__ import annotations

import asyncio
from typing import Any

from rollout.engine_actor import WeightsSource
from rollout.engine_table import EngineTable


class WeightsRegistry:
    """Owns the service's weights source; refits go to ``engines`` (the driver's table)."""

    def __init__(self, engines: EngineTable, source: WeightsSource) -> None:
        self._engines = engines
        self._source = source

    def source(self, restarting: int | None = None) -> WeightsSource:
        """The last weights a restarted engine can load (a checkpoint directory).

        ``restarting``: the index of the engine asking, from its constructor after Ray
        restarted it -- possibly outside any rollout, so the table learns of the restart here
        and watches the engine come back (stale if on older weights than the current ones)."""
        if restarting is not None:
            self._engines.restarted(restarting)
        return self._source

    def set_source(self, model_path: str, weight_version: str) -> None:
        """Record the current weights without pushing them (engines already have them)."""
        self._source = WeightsSource(model_path, weight_version)
        self._engines.version = weight_version

    async def note_refit(self, weight_version: str) -> None:
        """The service's weights are now ``weight_version`` (pushed from memory, e.g. by a
        ``WeightSync`` refit: no directory to reload). Engines in rotation or stale are asked
        their version: those on it are (back) in rotation, the others -- e.g. restarted since,
        on older weights, or outside the refit -- stay out ("stale") until a refit reaches
        them. Engines still restarting are judged by their watcher against this version."""
        await self._engines.recheck(str(weight_version))

    async def update_weights_from_disk(
        self, model_path: str, weight_version: str | None = None
    ) -> list[Any]:
        """Load ``model_path`` on every live engine. The source is recorded first, so an engine
        restarting meanwhile also comes up on it. Without a version, the path is the version."""
        version = weight_version if weight_version is not None else model_path
        self.set_source(model_path, version)
        calls = [
            self._engines.engine(i).update_weights_from_disk.remote(model_path, version)
            for i in self._engines.refittable()
        ]
        results = list(await asyncio.gather(*calls))
        await self.note_refit(version)  # stale engines were refitted too
        return results
