"""Radix prefix cache bookkeeping, driven without a model: hits and misses, locks, eviction
under pressure, flush and refit resets, deferral of sibling samples, page events."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_core.requests.request import Request, Status
from engine_core.requests.sampling_params import SamplingParams
from engine_core.scheduling.cache_events import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    block_hashes,
)
from engine_core.scheduling.page_pool import PagePool
from engine_core.scheduling.radix_cache import RadixCache
from engine_core.scheduling.scheduler import Scheduler

PAGE = 4


def make_req(i: int, prompt: list[int], max_new: int = 3, **kw) -> Request:
    return Request(f"r{i}", list(prompt), SamplingParams(), i, i, max_new_tokens=max_new, **kw)


def make_sched(num_pages: int = 64, max_running: int = 16, budget: int = 256) -> Scheduler:
    pool = PagePool(num_pages, PAGE)
    return Scheduler(pool, max_running, budget, RadixCache(pool))


def step(sched: Scheduler, token: int = 7) -> list:
    """Pretend the model ran: chunks computed, sampling chunks get ``token``."""
    chunks = sched.schedule()
    for c in chunks:
        c.req.num_computed += c.length
        if c.samples:
            c.req.output_ids.append(token)
            if len(c.req.output_ids) >= c.req.max_new_tokens:
                sched.finish(c.req)
    sched.check_integrity()
    return chunks


def drain(sched: Scheduler, limit: int = 500) -> None:
    for _ in range(limit):
        if not sched.has_work():
            return
        step(sched)
    raise AssertionError("scheduler did not drain")


class Replica:
    """What a router rebuilds from the events: the set of cached page hashes."""

    def __init__(self) -> None:
        self.hashes: set[int] = set()

    def apply(self, events) -> None:
        for event in events:
            if isinstance(event, AllBlocksCleared):
                self.hashes.clear()
            elif isinstance(event, BlocksStored):
                assert event.parent_hash == 0 or event.parent_hash in self.hashes
                assert not self.hashes & set(event.block_hashes), "stored twice"
                self.hashes |= set(event.block_hashes)
            elif isinstance(event, BlocksRemoved):
                assert set(event.block_hashes) <= self.hashes, "removed what was not stored"
                self.hashes -= set(event.block_hashes)


def cached_hashes(cache: RadixCache) -> set[int]:
    return {node.hash for node in cache._nodes()}


def test_second_request_hits_its_cached_prefix_and_reports_cached_tokens():
    sched = make_sched()
    sched.add(make_req(0, list(range(10))))
    drain(sched)
    again = make_req(1, list(range(10)) + [50, 51])
    sched.add(again)
    first = step(sched)
    # 2 full pages shared, and the first 2 tokens of the third page (tokens 8, 9 and r0's first
    # two outputs) reused by copying that page into one of r1's own.
    assert again.cached_tokens == 10 and first[0].start == 10 and first[0].length == 2
    assert first[0].copy_page is not None and first[0].copy_page[1] == again.pages[2]
    assert again.pages[:2] == [n.page for n in sched.prefix._holds[id(again)].nodes[:2]]
    drain(sched)
    assert sched.prefix.cache.stats.hit_tokens == 10


def test_miss_on_different_first_page_and_partial_hit():
    sched = make_sched()
    sched.add(make_req(0, list(range(12))))
    drain(sched)
    miss = make_req(1, [99] + list(range(1, 12)))
    partial = make_req(2, list(range(6)) + [77] * 6)
    sched.add(miss)
    sched.add(partial)
    step(sched)
    assert miss.cached_tokens == 0 and partial.cached_tokens == 6  # a page and 2 tokens


def test_the_last_token_and_needed_logprob_rows_are_never_cached():
    sched = make_sched()
    sched.add(make_req(0, list(range(16)), max_new=1))
    drain(sched)
    same = make_req(1, list(range(16)))
    scored = make_req(2, list(range(16)), return_logprob=True, logprob_start_len=6)
    sched.add(same)
    sched.add(scored)
    step(sched)
    assert same.cached_tokens == 15  # all but token 15, whose row samples
    assert scored.cached_tokens == 5  # row 5 scores prompt token 6: it is computed


def test_siblings_defer_until_the_first_computed_the_prefix():
    sched = make_sched()
    prompt = list(range(20))
    reqs = [make_req(i, prompt) for i in range(4)]
    for r in reqs:
        sched.add(r)
    first = step(sched)
    assert [c.req.rid for c in first] == ["r0"]  # the others wait for r0's pages
    second = step(sched)
    assert {c.req.rid for c in second} == {"r0", "r1", "r2", "r3"}
    assert [r.cached_tokens for r in reqs] == [0, 19, 19, 19]  # each computes its last token
    assert sched.stats.num_deferred >= 3
    drain(sched)


def test_deferral_does_not_block_unrelated_requests():
    sched = make_sched()
    a0, a1, b = make_req(0, list(range(20))), make_req(1, list(range(20))), make_req(2, [5] * 9)
    for r in (a0, a1, b):
        sched.add(r)
    assert {c.req.rid for c in step(sched)} == {"r0", "r2"}
    assert list(sched.waiting) == [a1]


def test_eviction_frees_unlocked_leaves_before_any_retraction():
    sched = make_sched(num_pages=8, budget=64)
    for i in range(3):  # three different 8-token prompts, 2 cached pages each
        sched.add(make_req(i, [i * 100 + t for t in range(8)], max_new=1))
        drain(sched)
    assert sched.prefix.cache.num_pages == 6
    big = make_req(9, list(range(1000, 1024)), max_new=1)  # its prefill needs 6; 2 are free
    sched.add(big)
    drain(sched)
    assert sched.stats.num_retractions == 0
    assert sched.prefix.cache.stats.evicted_pages == 4  # the 4 least recently used
    survivors = cached_hashes(sched.prefix.cache)
    assert set(block_hashes([200 + t for t in range(8)], PAGE)) <= survivors  # newest kept
    sched.check_integrity()


def test_eviction_never_takes_pages_a_running_request_uses():
    sched = make_sched(num_pages=10, budget=64)
    sched.add(make_req(0, list(range(12)), max_new=1))
    drain(sched)
    reader = make_req(1, list(range(12)) + [60], max_new=20)  # hits 2 pages, locks them
    sched.add(reader)
    step(sched)
    locked = [n.page for n in sched.prefix._holds[id(reader)].nodes]
    assert len(locked) >= 2
    hog = make_req(2, list(range(500, 524)), max_new=1)
    sched.add(hog)
    for _ in range(40):
        step(sched)
        assert all(sched.pool.ref_count(p) >= 1 for p in locked)
        if hog.finished:
            break
    assert all(page in reader.pages for page in locked)
    drain(sched)


def test_flush_and_refit_reset_drop_everything_and_refs_return_to_zero():
    sched = make_sched()
    running = make_req(0, list(range(12)), max_new=10)
    sched.add(running)
    step(sched)
    step(sched)
    assert sched.prefix.cache.num_pages > 0
    sched.reset_cache()  # e.g. a refit while the request runs (in-place pause)
    assert sched.prefix.cache.num_pages == 0
    drain(sched)
    # KV computed before the reset is never re-inserted: the cache stays empty.
    assert sched.prefix.cache.num_pages == 0
    again = make_req(1, list(range(12)))
    sched.add(again)
    drain(sched)
    assert again.cached_tokens == 0
    sched.reset_cache()
    sched.check_integrity()
    assert sched.pool.num_free == sched.pool.num_pages


def test_disabled_cache_is_the_old_scheduler():
    sched = Scheduler(PagePool(64, PAGE), 16, 256)
    for i in range(2):
        sched.add(make_req(i, list(range(12))))
    drain(sched)
    assert sched.pool.num_free == 64 and sched.prefix.cache is None


def test_events_describe_the_cache_exactly_and_hashes_match_the_router_side():
    sched = make_sched(num_pages=12, budget=32)
    prompt = list(range(9))
    sched.add(make_req(0, prompt, max_new=1))
    drain(sched)
    events = sched.prefix.cache.events.drain()
    assert events == [BlocksStored(tuple(block_hashes(prompt, PAGE)), 0)]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 14), st.integers(1, 6)),
        min_size=1,
        max_size=14,
    ),
    st.integers(6, 24),
    st.integers(0, 10_000),
)
def test_random_workload_keeps_refs_exact_and_events_replayable(specs, num_pages, seed):
    """Prompts share one of 4 system prefixes; a small pool forces eviction and retraction;
    resets happen at random. After every step the ref counts equal the holders, and the
    events replayed by a router give exactly the cache's page hashes."""
    rng = random.Random(seed)
    systems = [[s * 1000 + t for t in range(8)] for s in range(4)]
    sched = make_sched(num_pages=num_pages, max_running=4, budget=12)
    replica = Replica()
    for i, (system, extra, max_new) in enumerate(specs):
        prompt = systems[system] + [rng.randrange(3, 50) for _ in range(extra)]
        if len(prompt) + max_new <= num_pages * PAGE:
            sched.add(make_req(i, prompt, max_new=max_new))
    for _ in range(400):
        if not sched.has_work():
            break
        step(sched, token=rng.randrange(3, 50))
        if rng.random() < 0.05:
            sched.reset_cache()
        replica.apply(sched.prefix.cache.events.drain())
        assert replica.hashes == cached_hashes(sched.prefix.cache)
    assert not sched.has_work()
    assert all(r.status is Status.FINISHED for r in sched.running) and not sched.running
    sched.reset_cache()
    sched.check_integrity()
    assert sched.pool.num_free == num_pages


def test_event_overflow_collapses_to_a_snapshot():
    pool = PagePool(64, PAGE)
    sched = Scheduler(pool, 16, 256, RadixCache(pool, event_limit=1))
    cache = sched.prefix.cache
    cache.events.limit = 2  # tiny, to overflow on purpose
    for i in range(5):
        sched.add(make_req(i, [i * 10 + t for t in range(8)], max_new=1))
        drain(sched)
    events = cache.events.drain()
    assert isinstance(events[0], AllBlocksCleared)
    replica = Replica()
    replica.apply(events)
    assert replica.hashes == cached_hashes(cache)


def test_cache_salt_shares_pages_only_within_one_salt():
    sched = make_sched()
    prompt = list(range(12))
    sched.add(make_req(0, prompt, cache_salt="tenant-a"))
    drain(sched)
    events = sched.prefix.cache.events.drain()
    assert events[0].block_hashes == tuple(block_hashes(prompt, PAGE, "tenant-a"))
    same, other, unsalted = (
        make_req(1, prompt, cache_salt="tenant-a"),
        make_req(2, prompt, cache_salt="tenant-b"),
        make_req(3, prompt),
    )
    for r in (same, other, unsalted):
        sched.add(r)
    drain(sched)
    assert (same.cached_tokens, other.cached_tokens, unsalted.cached_tokens) == (11, 0, 0)
    assert block_hashes(prompt, PAGE, "tenant-a") != block_hashes(prompt, PAGE)
    sched.reset_cache()
    sched.check_integrity()
    assert sched.pool.num_free == sched.pool.num_pages
