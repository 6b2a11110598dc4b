"""``PrefixIndex``: which engine holds which cached prefix, replayed exactly from cache events.

A prefix is named by the chain hash of its last full page (``engine_core.scheduling.
cache_events``), so "engine e holds hash h" means e holds that whole prefix. The index keeps

- ``hash -> {engine: expiry}``: who holds each prefix. A *confirmed* holder (an engine said so
  in a ``BlocksStored`` event) never expires; a *provisional* holder (the router just sent a
  request with that prefix there, so the engine will cache it soon) expires after
  ``provisional_ttl_s`` unless an event confirms it first.
- per engine, its confirmed and its provisional hashes, so a ``BlocksRemoved``, an
  ``AllBlocksCleared`` or a dead engine is applied exactly.

Applying events is exact; the only inexact part is the bound: above ``max_entries`` hashes the
least recently matched (or stored) ones are forgotten for every engine. Forgetting only loses a
routing hint; a later ``BlocksRemoved`` of a forgotten hash is a no-op. Parents are touched after
their children, so a chain is forgotten from its leaves up and a match (which walks from the
root) never sees a hole in the middle of a prefix.

Pure Python; the clock is injectable for tests.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence

from engine_core.scheduling.cache_events import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    CacheEvent,
)

CONFIRMED = math.inf  # the "expiry" of a holder an event confirmed


class PrefixIndex:
    """Exact per-engine sets of cached prefix hashes plus provisional routing entries."""

    def __init__(
        self,
        max_entries: int,
        provisional_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.provisional_ttl_s = provisional_ttl_s
        self._clock = clock
        self._holders: OrderedDict[int, dict[int, float]] = OrderedDict()
        self._confirmed: dict[int, set[int]] = {}
        self._provisional: dict[int, set[int]] = {}

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        """Distinct prefix hashes held by some engine (the bounded quantity)."""
        return len(self._holders)

    def confirmed(self, engine: int) -> frozenset[int]:
        """The hashes ``engine`` reported cached (and not removed since)."""
        return frozenset(self._confirmed.get(engine, ()))

    def confirmed_counts(self) -> dict[int, int]:
        """Per engine with entries, how many pages it reported cached (an engine's own
        ``prefix_cache.cached_pages`` once its events are drained and nothing was forgotten)."""
        return {engine: len(hashes) for engine, hashes in sorted(self._confirmed.items())}

    def provisional(self, engine: int) -> frozenset[int]:
        """The hashes routed to ``engine`` and not yet confirmed (expired ones included until
        ``sweep``)."""
        return frozenset(self._provisional.get(engine, ()))

    def holders(self, block_hash: int) -> set[int]:
        """The engines holding ``block_hash`` now (confirmed or unexpired provisional)."""
        now = self._clock()
        return {e for e, expiry in self._holders.get(block_hash, {}).items() if expiry > now}

    def match(self, hashes: Sequence[int], engines: Collection[int]) -> tuple[int, list[int]]:
        """The longest prefix of ``hashes`` (a request's chain, root first) that one of
        ``engines`` holds: ``(pages, [engines holding all of them])``; ``(0, [])`` if none.
        Matched entries become the most recently used."""
        now = self._clock()
        alive: set[int] | None = None
        depth = 0
        for block_hash in hashes:
            entry = self._holders.get(block_hash)
            if not entry:
                break
            here = {e for e, expiry in entry.items() if expiry > now and e in engines}
            if alive is not None:
                here &= alive
            if not here:
                break
            alive = here
            depth += 1
        self._touch(hashes[:depth])
        return depth, sorted(alive or ())

    # ------------------------------------------------------------------ updates
    def apply(self, engine: int, events: Iterable[CacheEvent]) -> None:
        """Replay ``engine``'s events, in order."""
        for event in events:
            if isinstance(event, BlocksStored):
                self._store(engine, event)
            elif isinstance(event, BlocksRemoved):
                for block_hash in event.block_hashes:
                    self._drop(engine, block_hash)
            elif isinstance(event, AllBlocksCleared):
                self._clear(engine)
            else:
                raise TypeError(f"engine {engine}: not a cache event: {event!r}")
        self._bound()

    def add_provisional(self, engine: int, hashes: Sequence[int]) -> None:
        """The router sent a request whose prefix is ``hashes`` to ``engine``: count it as a
        holder for ``provisional_ttl_s`` (an engine's confirmation replaces the entry)."""
        expiry = self._clock() + self.provisional_ttl_s
        pending = self._provisional.setdefault(engine, set())
        for block_hash in reversed(hashes):
            entry = self._holders.setdefault(block_hash, {})
            if entry.get(engine) != CONFIRMED:
                entry[engine] = expiry
                pending.add(block_hash)
            self._holders.move_to_end(block_hash)
        self._bound()

    def forget_engine(self, engine: int) -> None:
        """``engine`` died or restarted (its cache is gone): drop everything it held."""
        for block_hash in self._confirmed.pop(engine, set()) | self._provisional.pop(engine, set()):
            self._remove_holder(block_hash, engine)

    def sweep(self) -> None:
        """Drop expired provisional entries (matches already ignore them)."""
        now = self._clock()
        for engine, pending in self._provisional.items():
            expired = [h for h in pending if self._holders.get(h, {}).get(engine, now) <= now]
            for block_hash in expired:
                pending.discard(block_hash)
                self._remove_holder(block_hash, engine)

    # ------------------------------------------------------------------ internals
    def _store(self, engine: int, event: BlocksStored) -> None:
        confirmed = self._confirmed.setdefault(engine, set())
        pending = self._provisional.setdefault(engine, set())
        for block_hash in event.block_hashes:
            self._holders.setdefault(block_hash, {})[engine] = CONFIRMED
            confirmed.add(block_hash)
            pending.discard(block_hash)
        self._touch(event.block_hashes)
        if event.parent_hash in self._holders:
            self._holders.move_to_end(event.parent_hash)  # the parent outlives its children

    def _drop(self, engine: int, block_hash: int) -> None:
        self._confirmed.get(engine, set()).discard(block_hash)
        self._provisional.get(engine, set()).discard(block_hash)
        self._remove_holder(block_hash, engine)

    def _clear(self, engine: int) -> None:
        # Provisional entries stay: they stand for requests routed there that the engine may
        # not have seen yet (an overflow's snapshot follows; a flush is refilled by them).
        for block_hash in self._confirmed.pop(engine, set()):
            entry = self._holders.get(block_hash)
            if entry is not None and entry.get(engine) == CONFIRMED:
                self._remove_holder(block_hash, engine)

    def _remove_holder(self, block_hash: int, engine: int) -> None:
        entry = self._holders.get(block_hash)
        if entry is None:
            return
        entry.pop(engine, None)
        if not entry:
            del self._holders[block_hash]

    def _touch(self, hashes: Sequence[int]) -> None:
        # Leaves first, the root last: the root ends up most recent, so it is forgotten last.
        for block_hash in reversed(hashes):
            if block_hash in self._holders:
                self._holders.move_to_end(block_hash)

    def _bound(self) -> None:
        while len(self._holders) > self.max_entries:
            block_hash, entry = self._holders.popitem(last=False)
            for engine in entry:
                self._confirmed.get(engine, set()).discard(block_hash)
                self._provisional.get(engine, set()).discard(block_hash)
