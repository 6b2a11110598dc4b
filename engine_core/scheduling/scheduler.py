"""Continuous-batching scheduler under a token budget. Pure Python, no torch.

Each step it (1) gives every running request its next chunk, oldest first — one token for a
decoding request, up to the remaining budget for one still prefilling — evicting unused cached
prefixes and then retracting the newest running requests when pages run out, then (2) admits
waiting requests in arrival order while budget, pages and the running-request cap allow, each
starting after the longest prefix the radix cache holds (``PrefixSharing``). Prefill chunks and
decodes share one forward.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from engine_core.requests.request import Request, Status
from engine_core.scheduling.page_pool import PagePool, pages_needed
from engine_core.scheduling.prefix_sharing import PrefixSharing
from engine_core.scheduling.radix_cache import RadixCache


@dataclass(frozen=True)
class Chunk:
    """``length`` tokens of ``req`` starting at absolute position ``start`` go through the model."""

    req: Request
    start: int
    length: int
    # (source, destination) page: copy a cached page's KV before this step (a prefix cached
    # up to the middle of a page is reused by copying that page, then computing from there).
    copy_page: tuple[int, int] | None = None

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last row is sampled."""
        return self.start + self.length == self.req.num_tokens


@dataclass
class SchedulerStats:
    num_retractions: int = 0
    num_scheduled_steps: int = 0
    num_deferred: int = 0  # admissions put off while a running request computed the prefix


class Scheduler:
    """Owns the waiting and running queues and the requests' pages."""

    def __init__(
        self,
        pool: PagePool,
        max_running: int,
        max_batched_tokens: int,
        cache: RadixCache | None = None,
    ) -> None:
        self.pool = pool
        self.max_running = max_running
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self.prefix = PrefixSharing(cache)

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        """Plan one forward step. Returns an empty list only when there is nothing to run."""
        budget = self.max_batched_tokens
        chunks: list[Chunk] = []
        for req in self.running:
            self.prefix.progress(req)  # pages the last step filled join the cache
        retractions_before = self.stats.num_retractions
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:
                continue  # retracted earlier in this loop
            length = min(req.num_uncomputed, budget)
            if not self._reserve_or_retract(req, length):
                continue
            chunks.append(Chunk(req, req.num_computed, length))
            budget -= length
        # Admitting right after a retraction would only thrash the pages just freed.
        if self.stats.num_retractions == retractions_before:
            budget = self._admit(chunks, budget)
        self.stats.num_scheduled_steps += bool(chunks)
        return chunks

    def _admit(self, chunks: list[Chunk], budget: int) -> int:
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting.popleft()
            path = self.prefix.lookup(req)
            if path is None:  # a running request is computing its prefix: wait for the cache
                deferred.append(req)
                self.stats.num_deferred += 1
                if len(deferred) >= self.max_running:
                    break
                continue
            hit, copy = self.prefix.attach(req, path)
            req.cached_tokens += hit
            req.num_computed = hit
            length = min(req.num_uncomputed, budget)
            if not self._try_reserve(req, length):
                self.prefix.detach_unsaved(req)
                req.num_computed = 0
                self.waiting.appendleft(req)
                break
            req.status = Status.RUNNING
            # Running stays in arrival order: oldest served first, newest retracted first.
            bisect.insort(self.running, req, key=lambda r: r.arrival)
            chunks.append(Chunk(req, req.num_computed, length, copy))
            budget -= length
        self.waiting.extendleft(reversed(deferred))
        return budget

    def _try_reserve(self, req: Request, length: int) -> bool:
        """Give ``req`` enough pages to hold ``length`` more tokens, evicting unused cached
        prefixes if the pool is short; False if even that does not free enough."""
        extra = pages_needed(req.num_computed + length, self.pool.page_size) - len(req.pages)
        if extra > self.pool.num_free:
            self.prefix.evict(extra - self.pool.num_free)
        if extra > self.pool.num_free:
            return False
        if extra > 0:
            req.pages.extend(self.pool.allocate(extra))
        return True

    def _reserve_or_retract(self, req: Request, length: int) -> bool:
        """Reserve pages for ``req``, retracting the newest running requests until they fit.

        Returns False when ``req`` itself was the newest and got retracted.
        """
        while not self._try_reserve(req, length):
            victim = self.running[-1]
            self.retract(victim)
            if victim is req:
                return False
        return True

    def retract(self, req: Request) -> None:
        """Free ``req``'s pages and requeue it at the front; its generated tokens are kept."""
        self.running.remove(req)
        self.prefix.release(req)
        self.pool.release(req.pages)
        req.pages = []
        req.num_computed = 0
        req.status = Status.WAITING
        req.num_retractions += 1
        self.stats.num_retractions += 1
        # Victims go newest-first, so appendleft keeps older requests ahead.
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request from whichever queue holds it."""
        if req in self.running:
            self.running.remove(req)
            self.prefix.release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.pool.release(req.pages)
        req.pages = []
        req.status = Status.FINISHED

    def reset_cache(self) -> None:
        """Drop the prefix cache (refit, KV release, ``flush_cache``); see ``PrefixSharing``."""
        self.prefix.reset()

    def check_integrity(self) -> None:
        """Assert every page's ref count is exactly its holders: running requests' page tables
        plus the cache's nodes (tests; O(pages))."""
        self.pool.check_integrity()
        holders = [0] * self.pool.num_pages
        for req in self.running:
            for page in req.pages:
                holders[page] += 1
        for req in self.waiting:
            assert not req.pages, f"waiting request {req.rid} holds pages"
        cache = self.prefix.cache
        for page in [] if cache is None else cache.pages():
            holders[page] += 1
        for page, count in enumerate(holders):
            refs = self.pool.ref_count(page)
            assert refs == count, f"page {page}: ref count {refs}, holders {count}"

    def find(self, rid: str) -> Request | None:
        for req in self.running:
            if req.rid == rid:
                return req
        for req in self.waiting:
            if req.rid == rid:
                return req
        return None
