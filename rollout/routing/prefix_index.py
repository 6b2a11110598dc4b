"""``PrefixIndex``: which engine holds which cached prefix, replayed exactly from cache events.

A prefix is named by the chain hash of its last full page (``engine_core.scheduling.
cache_events``), so "engine e holds hash h" means e holds that whole prefix. The index keeps

- who holds each prefix. A *confirmed* holder (an engine said so in a ``BlocksStored`` event)
  never expires; a *provisional* holder (the router just sent a request with that prefix
  there, so the engine will cache it soon) expires after ``provisional_ttl_s`` unless an event
  confirms it first.
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

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence

from engine_core.scheduling.cache_events import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    CacheEvent,
)


class PrefixIndex:
    """Exact per-engine sets of cached prefix hashes plus provisional routing entries.

    Stored as ``hash -> bitmask of confirmed engines`` (an ``OrderedDict`` in LRU order) and a
    small ``hash -> {engine: expiry}`` for provisional holders: ints, not one container per
    hash, so a large index costs the garbage collector nothing and a match is bit arithmetic.
    """

    def __init__(
        self,
        max_entries: int,
        provisional_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.provisional_ttl_s = provisional_ttl_s
        self._clock = clock
        self._lru: OrderedDict[int, int] = OrderedDict()  # hash -> confirmed engines' bits
        self._pending: dict[int, dict[int, float]] = {}  # hash -> {engine: expiry}
        self._confirmed: dict[int, set[int]] = {}
        self._provisional: dict[int, set[int]] = {}

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        """Distinct prefix hashes held by some engine (the bounded quantity)."""
        return len(self._lru)

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
        return _engines(self._holder_bits(block_hash, self._clock()))

    def match(self, hashes: Sequence[int], engines: Collection[int]) -> tuple[int, list[int]]:
        """The longest prefix of ``hashes`` (a request's chain, root first) that one of
        ``engines`` holds: ``(pages, [engines holding all of them])``; ``(0, [])`` if none.
        Matched entries become the most recently used."""
        now = self._clock()
        alive = 0
        for engine in engines:
            alive |= 1 << engine
        depth = 0
        lru, pending = self._lru, self._pending
        for block_hash in hashes:
            bits = lru.get(block_hash)
            if bits is None:
                break
            if block_hash in pending:
                bits |= self._pending_bits(block_hash, now)
            bits &= alive
            if not bits:
                break
            alive = bits
            depth += 1
        if not depth:
            return 0, []
        self._touch(hashes[:depth])
        return depth, sorted(_engines(alive))

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
        bit = 1 << engine
        pending = self._provisional.setdefault(engine, set())
        lru = self._lru
        for block_hash in reversed(hashes):  # the root ends most recent
            bits = lru.get(block_hash)
            if bits is None:
                lru[block_hash] = 0
            else:
                lru.move_to_end(block_hash)
            if not (bits or 0) & bit:
                self._pending.setdefault(block_hash, {})[engine] = expiry
                pending.add(block_hash)
        self._bound()

    def forget_engine(self, engine: int) -> None:
        """``engine`` died or restarted (its cache is gone): drop everything it held."""
        for block_hash in self._confirmed.pop(engine, set()):
            self._unconfirm(block_hash, engine)
        for block_hash in self._provisional.pop(engine, set()):
            self._unpend(block_hash, engine)

    def sweep(self) -> None:
        """Drop expired provisional entries (matches already ignore them)."""
        now = self._clock()
        for engine, pending in self._provisional.items():
            expired = [h for h in pending if self._pending.get(h, {}).get(engine, now) <= now]
            for block_hash in expired:
                pending.discard(block_hash)
                self._unpend(block_hash, engine)

    # ------------------------------------------------------------------ internals
    def _store(self, engine: int, event: BlocksStored) -> None:
        bit = 1 << engine
        confirmed = self._confirmed.setdefault(engine, set())
        pending = self._provisional.setdefault(engine, set())
        lru = self._lru
        for block_hash in event.block_hashes:
            lru[block_hash] = lru.get(block_hash, 0) | bit
            confirmed.add(block_hash)
            if block_hash in pending:
                pending.discard(block_hash)
                self._unpend(block_hash, engine)
        self._touch(event.block_hashes)
        if event.parent_hash in lru:
            lru.move_to_end(event.parent_hash)  # the parent outlives its children

    def _drop(self, engine: int, block_hash: int) -> None:
        if block_hash in self._confirmed.get(engine, ()):
            self._confirmed[engine].discard(block_hash)
            self._unconfirm(block_hash, engine)
        if block_hash in self._provisional.get(engine, ()):
            self._provisional[engine].discard(block_hash)
            self._unpend(block_hash, engine)

    def _clear(self, engine: int) -> None:
        # Provisional entries stay: they stand for requests routed there that the engine may
        # not have seen yet (an overflow's snapshot follows; a flush is refilled by them).
        for block_hash in self._confirmed.pop(engine, set()):
            self._unconfirm(block_hash, engine)

    def _holder_bits(self, block_hash: int, now: float) -> int:
        bits = self._lru.get(block_hash, 0)
        return bits | self._pending_bits(block_hash, now) if block_hash in self._pending else bits

    def _pending_bits(self, block_hash: int, now: float) -> int:
        bits = 0
        for engine, expiry in self._pending[block_hash].items():
            if expiry > now:
                bits |= 1 << engine
        return bits

    def _unconfirm(self, block_hash: int, engine: int) -> None:
        bits = self._lru.get(block_hash)
        if bits is None:
            return
        bits &= ~(1 << engine)
        if bits or block_hash in self._pending:
            self._lru[block_hash] = bits
        else:
            del self._lru[block_hash]

    def _unpend(self, block_hash: int, engine: int) -> None:
        holders = self._pending.get(block_hash)
        if holders is None:
            return
        holders.pop(engine, None)
        if not holders:
            del self._pending[block_hash]
            if not self._lru.get(block_hash, 1):
                del self._lru[block_hash]

    def _touch(self, hashes: Sequence[int]) -> None:
        # Leaves first, the root last: the root ends up most recent, so it is forgotten last.
        lru = self._lru
        for block_hash in reversed(hashes):
            if block_hash in lru:
                lru.move_to_end(block_hash)

    def _bound(self) -> None:
        while len(self._lru) > self.max_entries:
            block_hash, bits = self._lru.popitem(last=False)
            for engine in _engines(bits):
                self._confirmed[engine].discard(block_hash)
            for engine in self._pending.pop(block_hash, {}):
                self._provisional[engine].discard(block_hash)


def _engines(bits: int) -> set[int]:
    """The engine indices set in ``bits``."""
    engines = set()
    while bits:
        low = bits & -bits
        engines.add(low.bit_length() - 1)
        bits ^= low
    return engines
