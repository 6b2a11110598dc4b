"""``CacheAwarePolicy`` (``policy: cache_aware``): route a prompt group to the engine that
already caches the longest prefix of it, unless load is imbalanced.

The decision, for one group (one prompt and its ``n`` samples) over the live engines, in the
order of SGLang's router (``sgl-router`` ``cache_aware``, event-driven index):

1. **Imbalanced** -- the most loaded engine has more than ``balance_abs_threshold``
   outstanding estimated tokens over the least loaded one *and* more than
   ``balance_rel_threshold`` times its load: the least loaded engine.
2. **Session** -- the group's conversation (``GroupInfo.session_key``:
   ``rollout.routing.sessions``) is pinned to a live engine: that engine.
3. **Cache hit** -- the longest prefix of the prompt's page chain held by some engine
   (``PrefixIndex.match``, exact from events plus provisional entries) covers more than
   ``cache_threshold`` of the prompt's tokens: among the engines holding it, the least loaded.
4. **Miss** -- the least loaded engine (fewest outstanding tokens, then groups, then index).

Then the chosen engine becomes a provisional holder of the prompt's pages and the session's pin.
Load ties therefore spread new prefixes over the engines, and later groups of a prefix follow
it. Pure Python; the events arrive through ``CacheEventFeed`` (``refresh``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from engine_core.scheduling.cache_events import block_hashes
from rollout.policies import (
    EngineHandles,
    EngineLoad,
    GroupInfo,
    RoutingPolicy,
    register_policy,
)
from rollout.routing.config import RouterConfig
from rollout.routing.event_feed import CacheEventFeed
from rollout.routing.prefix_index import PrefixIndex
from rollout.routing.sessions import SessionTable


def _load_key(e: EngineLoad) -> tuple[int, int, int]:
    return (e.outstanding_tokens, e.outstanding_groups, e.index)


@register_policy("cache_aware")
class CacheAwarePolicy(RoutingPolicy):
    """Exact, event-fed, cache-aware routing (see the module docstring)."""

    needs_token_ids = True

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self.index = PrefixIndex(self.config.max_entries, self.config.provisional_ttl_s)
        self.sessions = SessionTable(self.config.max_sessions)
        self.feed = CacheEventFeed(
            self.index, self.config.refresh_interval_s, self.config.drain_timeout_s
        )
        self.decisions: Counter[str] = Counter()  # by rule: imbalanced / session / hit / miss

    @classmethod
    def from_router_config(cls, config: RouterConfig) -> CacheAwarePolicy:
        return cls(config)

    @property
    def page_size(self) -> int | None:
        return self.feed.page_size

    @page_size.setter
    def page_size(self, value: int | None) -> None:
        self.feed.page_size = value

    # ------------------------------------------------------------------ RoutingPolicy
    async def refresh(self, engines: EngineHandles) -> None:
        await self.feed.refresh(engines)

    def engine_lost(self, index: int) -> None:
        self.index.forget_engine(index)
        self.sessions.forget_engine(index)

    def stats(self) -> dict[str, Any]:
        return {
            "decisions": dict(self.decisions),
            "indexed_prefixes": len(self.index),
            "confirmed_pages": self.index.confirmed_counts(),
            "sessions": len(self.sessions),
            "page_size": self.page_size,
            "event_drains": self.feed.drains,
        }

    def choose(self, group: GroupInfo, engines: Sequence[EngineLoad]) -> int:
        hashes = self._hashes(group)
        pick, rule = self._decide(group, engines, hashes)
        self.decisions[rule] += 1
        if hashes:
            self.index.add_provisional(pick, hashes)
        if group.session_key is not None:
            self.sessions.pin(group.session_key, pick)
        return pick

    # ------------------------------------------------------------------ the rule
    def _decide(
        self, group: GroupInfo, engines: Sequence[EngineLoad], hashes: list[int]
    ) -> tuple[int, str]:
        least = min(engines, key=_load_key)
        if self._imbalanced(engines):
            return least.index, "imbalanced"
        by_index = {e.index: e for e in engines}
        pinned = self.sessions.get(group.session_key) if group.session_key else None
        if pinned in by_index:
            return pinned, "session"
        if hashes:
            pages, holders = self.index.match(hashes, by_index)
            prompt_tokens = len(group.input_ids or ())
            if (
                pages
                and pages * (self.page_size or 0) > self.config.cache_threshold * prompt_tokens
            ):
                best = min((by_index[i] for i in holders), key=_load_key)
                return best.index, "hit"
        return least.index, "miss"

    def _imbalanced(self, engines: Sequence[EngineLoad]) -> bool:
        loads = [e.outstanding_tokens for e in engines]
        high, low = max(loads), min(loads)
        return (
            high - low > self.config.balance_abs_threshold
            and high > low * self.config.balance_rel_threshold
        )

    def _hashes(self, group: GroupInfo) -> list[int]:
        if group.input_ids is None or self.page_size is None:
            return []
        return block_hashes(group.input_ids, self.page_size, group.cache_salt)
