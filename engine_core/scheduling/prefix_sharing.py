"""How requests use the radix cache: lookup at admission, insert as pages fill, release at the
end. Owned by the ``Scheduler``; pure Python.

Contracts:
- A request's cached prefix never covers a row whose logits it still needs (its last token,
  which samples, and prompt rows whose input logprobs are still to be reported).
- ``n`` samples of one prompt prefill it once: a waiting request whose next uncached page is
  being computed by a running request is *deferred* (skipped, keeping its place) until that page
  is in the cache, then admitted with it as a hit.
- Pages enter the cache as soon as they are full and computed, so concurrent and later requests
  hit them; a request only inserts KV computed on the current weights (``reset`` on a refit or a
  KV release detaches every running request from the cache).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from engine_core.requests.request import Request
from engine_core.scheduling.cache_events import chain_hash, root_hash
from engine_core.scheduling.radix_cache import Node, RadixCache


@dataclass
class CacheHold:
    """A running request's part in the cache: the nodes it locked (whose pages its page table
    holds), the tree node of its last inserted page, the next page index to insert, and the
    hashes of pages it is computing that others may wait for."""

    nodes: list[Node] = field(default_factory=list)
    tail: Node | None = None
    next_page: int = 0
    pending: list[tuple[int, int]] = field(default_factory=list)  # (page index, hash)


class PrefixSharing:
    """The scheduler's view of the radix cache (``cache`` None: disabled, every call a no-op)."""

    def __init__(self, cache: RadixCache | None) -> None:
        self.cache = cache
        self._pending: Counter[int] = Counter()
        self._holds: dict[int, CacheHold] = {}  # id(request) -> its hold

    @property
    def enabled(self) -> bool:
        return self.cache is not None

    def lookup(self, req: Request) -> list[Node] | None:
        """The cached path ``req`` can reuse now, or None to defer it (a running request is
        computing its next page)."""
        cache = self.cache
        if cache is None:
            return []
        ids = req.all_ids
        limit = req.cacheable_prefix()
        path = cache.match(ids, limit, req.cache_salt)
        if self._pending and (len(path) + 1) * cache.page_size <= limit:
            if cache.page_key(ids, len(path), path, req.cache_salt) in self._pending:
                return None
        return path

    def attach(self, req: Request, path: list[Node]) -> tuple[int, tuple[int, int] | None]:
        """``req`` was admitted reusing ``path``: lock it, share its pages into the request's page
        table and mark the pages it will compute as pending. A cached page that shares only its
        first tokens with what follows is reused by copy (a fresh page of the request's own,
        filled from it before the step: copy-on-write), so e.g. the ``n`` samples of a
        page-aligned prompt compute one token each, not a page. Returns the tokens reused and
        the ``(source, destination)`` page copy, if any."""
        cache = self.cache
        if cache is None:
            return 0, None
        cache.lock(path)
        pages = [node.page for node in path]
        cache.pool.share(pages)
        req.pages = pages
        hit = len(path) * cache.page_size
        copy = None
        partial = cache.partial(req.all_ids, path, req.cacheable_prefix(), req.cache_salt)
        if partial is not None and (cache.pool.num_free or cache.evict(1)):
            (dst,) = cache.pool.allocate(1)
            pages.append(dst)
            copy = (partial[0].page, dst)
            hit += partial[1]
        cache.record_lookup(req.num_tokens, hit)
        hold = CacheHold(list(path), path[-1] if path else None, len(path))
        self._holds[id(req)] = hold
        size = cache.page_size
        parent = path[-1].hash if path else root_hash(req.cache_salt)
        ids = req.all_ids
        for index in range(len(path), req.cacheable_prefix() // size):
            parent = chain_hash(parent, ids[index * size : (index + 1) * size])
            hold.pending.append((index, parent))
            self._pending[parent] += 1
        return hit, copy

    def detach_unsaved(self, req: Request) -> None:
        """Undo ``attach`` for a request that could not get the rest of its pages."""
        hold = self._holds.pop(id(req), None)
        if hold is None or self.cache is None:
            return
        self._clear_pending(hold)
        self.cache.unlock(hold.nodes)
        self.cache.pool.release(req.pages)
        req.pages = []

    def progress(self, req: Request) -> None:
        """Insert the pages of ``req`` that filled since the last call."""
        hold = self._holds.get(id(req))
        if hold is None or self.cache is None:
            return
        if req.num_computed // self.cache.page_size <= hold.next_page:
            return
        ids = req.all_ids[: req.num_computed]
        added, hold.tail, hold.next_page = self.cache.insert(
            ids, req.pages, hold.tail, hold.next_page, req.cache_salt
        )
        hold.nodes.extend(added)
        self._clear_pending(hold, below=hold.next_page)

    def release(self, req: Request) -> None:
        """``req`` leaves the running set (finished, aborted or retracted): its computed pages
        are inserted, its nodes unlocked; the caller then drops its page references."""
        self.progress(req)
        hold = self._holds.pop(id(req), None)
        if hold is None or self.cache is None:
            return
        self._clear_pending(hold)
        self.cache.unlock(hold.nodes)

    def evict(self, num_pages: int) -> int:
        return 0 if self.cache is None else self.cache.evict(num_pages)

    def reset(self) -> None:
        """Drop the whole cache and detach running requests (their KV is on old weights or
        gone); they keep their own page references and never insert again."""
        if self.cache is None:
            return
        for hold in self._holds.values():
            self._clear_pending(hold)
        self._holds.clear()
        self.cache.reset()

    def _clear_pending(self, hold: CacheHold, below: int | None = None) -> None:
        """Forget the pending pages of ``hold`` (those with index < ``below``, or all)."""
        keep = []
        for index, key in hold.pending:
            if below is not None and index >= below:
                keep.append((index, key))
                continue
            self._pending[key] -= 1
            if self._pending[key] <= 0:
                del self._pending[key]
        hold.pending = keep
