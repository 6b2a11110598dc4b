"""PrefixIndex: events applied exactly (store, remove, clear, overflow snapshot), against a
plain set model of each engine's cache; the bound; provisional entries; dead engines."""

from __future__ import annotations

import random

import pytest

from engine_core.scheduling.cache_events import (
    ROOT_HASH,
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    block_hashes,
)
from rollout.routing.prefix_index import PrefixIndex

PAGE = 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chain(tokens: list[int]) -> list[int]:
    return block_hashes(tokens, PAGE)


def stored(hashes: list[int], parent: int = ROOT_HASH) -> BlocksStored:
    return BlocksStored(tuple(hashes), parent)


def test_store_match_remove_clear():
    index = PrefixIndex(max_entries=1000, provisional_ttl_s=10)
    a = chain(list(range(16)))  # 4 pages
    b = chain(list(range(8)) + [99] * 8)  # shares 2 pages with a
    index.apply(0, [stored(a)])
    index.apply(1, [stored(b[:2]), stored(b[2:], parent=b[1])])
    assert index.match(a, {0, 1}) == (4, [0])
    assert index.match(b, {0, 1}) == (4, [1])
    assert index.match(a[:2], {0, 1}) == (2, [0, 1])
    assert index.match(a, {1}) == (2, [1])  # only the candidates count
    index.apply(0, [BlocksRemoved((a[3],)), BlocksRemoved((a[2],))])  # leaves first
    assert index.match(a, {0, 1}) == (2, [0, 1])
    index.apply(1, [AllBlocksCleared()])
    assert index.match(b, {0, 1}) == (2, [0])
    assert index.confirmed(1) == frozenset()
    assert len(index) == 2


def test_overflow_snapshot_replaces_everything():
    index = PrefixIndex(max_entries=1000, provisional_ttl_s=10)
    old = chain(list(range(12)))
    kept = chain([7] * 8)
    index.apply(0, [stored(old), stored(kept)])
    # The engine's buffer overflowed: a clear, then a snapshot of what it still caches.
    index.apply(0, [AllBlocksCleared(), stored(kept)])
    assert index.confirmed(0) == frozenset(kept)
    assert index.match(old, {0}) == (0, [])
    assert index.match(kept, {0}) == (2, [0])


class ModelCache:
    """A toy radix cache of one engine: prompts stored page by page, leaves evicted."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.hashes: set[int] = set()
        self.parent: dict[int, int] = {}

    def step(self) -> list:
        roll = self.rng.random()
        if roll < 0.6:
            prefix = [self.rng.randrange(3) for _ in range(self.rng.randrange(1, 6) * PAGE)]
            hashes = chain(prefix)
            new = [h for h in hashes if h not in self.hashes]
            if not new:
                return []
            first = hashes.index(new[0])
            for i, h in enumerate(hashes[first:], first):
                self.parent[h] = hashes[i - 1] if i else ROOT_HASH
            self.hashes.update(new)
            return [stored(new, self.parent[new[0]])]
        if roll < 0.95:
            leaves = sorted(self.hashes - set(self.parent[h] for h in self.hashes))
            gone = self.rng.sample(leaves, min(len(leaves), self.rng.randrange(1, 4)))
            self.hashes.difference_update(gone)
            return [BlocksRemoved(tuple(gone))] if gone else []
        if self.rng.random() < 0.5:
            self.hashes.clear()
            return [AllBlocksCleared()]
        # Overflow: clear, then a snapshot of what is still cached (one chain per page).
        return [AllBlocksCleared()] + [stored([h], self.parent[h]) for h in sorted(self.hashes)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_event_streams_apply_exactly(seed):
    rng = random.Random(seed)
    engines = {e: ModelCache(rng) for e in range(3)}
    index = PrefixIndex(max_entries=10**6, provisional_ttl_s=10)
    for _ in range(300):
        e = rng.randrange(3)
        batch = [ev for _ in range(rng.randrange(1, 4)) for ev in engines[e].step()]
        index.apply(e, batch)
        for engine, model in engines.items():
            assert index.confirmed(engine) == frozenset(model.hashes)
    # And every hash's holders are exactly the engines caching it.
    for h in set().union(*(m.hashes for m in engines.values())):
        assert index.holders(h) == {e for e, m in engines.items() if h in m.hashes}


def test_bound_forgets_least_recently_matched_from_the_leaves():
    index = PrefixIndex(max_entries=8, provisional_ttl_s=10)
    prompts = [chain([p] * 8) for p in range(6)]  # 6 prompts x 2 pages = 12 hashes
    for p in prompts[:4]:
        index.apply(0, [stored(p)])
    assert len(index) == 8
    index.match(prompts[0], {0})  # prompt 0 is now the most recently used
    index.apply(0, [stored(prompts[4])])
    assert len(index) == 8
    assert index.match(prompts[0], {0}) == (2, [0])
    assert index.match(prompts[1], {0}) == (0, [])  # the least recent one was forgotten
    # A leaf goes before its root: one more page forgets prompt 2's leaf only.
    index.apply(0, [stored(prompts[5][:1])])
    assert index.match(prompts[2], {0}) == (1, [0])
    assert len(index) == 8
    # Removing a forgotten hash is a no-op, and the per-engine set stays in sync.
    index.apply(0, [BlocksRemoved((prompts[1][1],))])
    assert index.confirmed(0) == frozenset(h for p in prompts for h in p if index.holders(h) == {0})


def test_provisional_entries_expire_unless_confirmed():
    clock = Clock()
    index = PrefixIndex(max_entries=100, provisional_ttl_s=5, clock=clock)
    a, b = chain([1] * 8), chain([2] * 8)
    index.add_provisional(1, a)
    index.add_provisional(1, b)
    assert index.match(a, {0, 1}) == (2, [1])
    index.apply(1, [stored(a)])  # the engine confirmed a
    clock.now = 6
    assert index.match(a, {0, 1}) == (2, [1])  # confirmed: no expiry
    assert index.match(b, {0, 1}) == (0, [])  # expired
    index.sweep()
    assert len(index) == 2 and index.provisional(1) == frozenset()
    # A clear keeps provisional entries (requests routed but maybe not yet seen)...
    index.add_provisional(1, b)
    index.apply(1, [AllBlocksCleared()])
    assert index.match(a, {1}) == (0, []) and index.match(b, {1}) == (2, [1])
    # ... a removal drops them (the engine says it does not hold that page).
    index.apply(1, [BlocksRemoved((b[1],))])
    assert index.match(b, {1}) == (1, [1])


def test_forget_engine_drops_confirmed_and_provisional():
    index = PrefixIndex(max_entries=100, provisional_ttl_s=5)
    a = chain([3] * 12)
    index.apply(0, [stored(a)])
    index.apply(1, [stored(a[:1])])
    index.add_provisional(0, chain([4] * 8))
    index.forget_engine(0)
    assert index.match(a, {0, 1}) == (1, [1])
    assert index.confirmed(0) == frozenset() and index.provisional(0) == frozenset()
    assert len(index) == 1


def test_unknown_event_is_a_typed_error():
    index = PrefixIndex(max_entries=10, provisional_ttl_s=1)
    with pytest.raises(TypeError, match="engine 2: not a cache event"):
        index.apply(2, ["stored"])
