"""``CacheEventFeed``: brings the engines' cache events into the driver's ``PrefixIndex``.

No RPC per routing decision: ``refresh`` (called before a batch is routed, at most every
``refresh_interval_s``; concurrent callers share one drain) calls every live engine's
``EngineActor.drain_cache_events()`` once, in parallel, and replays each engine's events in
order. Between drains the router's own decisions stand in as provisional entries
(``PrefixIndex.add_provisional``), so the groups of one call -- the ``n`` samples of a prompt,
interleaved arrivals of the same prefix -- already route together.

An engine whose actor died loses its entries; one that does not answer in
``drain_timeout_s``, or cannot drain (an engine without a prefix cache), keeps them and is
asked again next time (logged once). The page size that names pages is learned from the first
engine's ``get_server_info()["page_size"]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ray.exceptions import RayActorError

from rollout.policies import EngineHandles
from rollout.routing.prefix_index import PrefixIndex

log = logging.getLogger(__name__)


class CacheEventFeed:
    """Drains engines' cache events into ``index`` (see the module docstring)."""

    def __init__(
        self,
        index: PrefixIndex,
        refresh_interval_s: float,
        drain_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.page_size: int | None = None
        self.drains = 0  # completed refreshes (tests, stats)
        self._interval = refresh_interval_s
        self._timeout = drain_timeout_s
        self._clock = clock
        self._last = -float("inf")
        self._running: asyncio.Future | None = None
        self._warned: set[str] = set()

    async def refresh(self, engines: EngineHandles) -> None:
        """Drain every live engine's events unless a drain finished within the interval."""
        if self._running is not None:
            await asyncio.shield(self._running)
            return
        if self._clock() - self._last < self._interval:
            return
        self._running = asyncio.ensure_future(self._drain_all(engines))
        try:
            await asyncio.shield(self._running)
        finally:
            self._running = None
            self._last = self._clock()

    async def _drain_all(self, engines: EngineHandles) -> None:
        live = engines.indices("up")
        if not live:
            return
        if self.page_size is None:
            self.page_size = await self._page_size(engines.engine(live[0]))
        results = await asyncio.gather(*(self._drain(engines.engine(i)) for i in live))
        for index, events in zip(live, results):
            if events is _DEAD:
                self.index.forget_engine(index)
            elif events is not None:
                self.index.apply(index, events)
        self.index.sweep()
        self.drains += 1

    async def _drain(self, engine: Any) -> Any:
        try:
            return await asyncio.wait_for(
                _awaitable(engine.drain_cache_events.remote()), self._timeout
            )
        except RayActorError:
            return _DEAD
        except asyncio.TimeoutError:
            self._warn_once("timeout", "an engine did not answer drain_cache_events in time")
            return None
        except Exception as exc:  # e.g. an engine without a prefix cache
            self._warn_once(type(exc).__name__, f"drain_cache_events failed: {exc}")
            return None

    async def _page_size(self, engine: Any) -> int | None:
        try:
            info = await asyncio.wait_for(
                _awaitable(engine.get_server_info.remote()), self._timeout
            )
        except Exception as exc:
            self._warn_once("page_size", f"get_server_info failed ({exc}); retrying next batch")
            return None
        page_size = info.get("page_size") if isinstance(info, dict) else None
        if not isinstance(page_size, int) or page_size <= 0:
            self._warn_once("page_size", f"no page_size in get_server_info: {page_size!r}")
            return None
        return page_size

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("cache-aware router: %s; routing without those prefix hints", message)


_DEAD = object()  # a drain's result when the engine's actor is gone


async def _awaitable(ref: Any) -> Any:
    """Await a Ray ObjectRef (or a test's awaitable) inside ``wait_for``."""
    return await ref
