"""Radix prefix cache over whole KV pages (RadixAttention-style). Pure Python, no torch.

A tree whose nodes are full pages of ``page_size`` tokens: the path from the root to a node is a
token prefix, and the node holds the page with that last page's KV. The cache keeps one page-pool
reference per node, so a cached page outlives the request that computed it; a request reusing a
prefix shares the pages (its own reference) and *locks* the nodes it uses, so eviction never takes
a page a running request reads. Eviction drops least-recently-used unlocked leaves; the pool
frees a page once nobody else holds it.

Old-weights KV is never reused: ``reset`` drops everything, and the owner calls it on a refit,
on a KV release and on ``flush_cache``. Each change is published as a page event
(``cache_events``) for routers; the event buffer is bounded and collapses to a snapshot.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from dataclasses import dataclass, field

from engine_core.scheduling.cache_events import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    CacheEvent,
    chain_hash,
    root_hash,
)
from engine_core.scheduling.page_pool import PagePool

_clock = itertools.count()


@dataclass(eq=False)
class Node:
    """One cached page: ``tokens`` follow the parent's prefix; ``page`` holds their KV."""

    tokens: tuple[int, ...]
    page: int
    hash: int
    parent: Node | None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    locks: int = 0  # running requests whose page table holds this node's page
    last_used: int = 0


@dataclass
class CacheStats:
    """Cumulative counters (``get_server_info``: hit rate = hit / looked-up tokens)."""

    looked_up_tokens: int = 0
    hit_tokens: int = 0
    inserted_pages: int = 0
    evicted_pages: int = 0
    resets: int = 0


class EventBuffer:
    """Page events since the last ``drain``. Appended on the loop thread, drained from any
    thread (one lock). Past ``limit`` events it is replaced by a clear plus a snapshot."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._events: list[CacheEvent] = []
        self._lock = threading.Lock()

    def add(self, event: CacheEvent) -> bool:
        """Append; returns False when the buffer is full (the caller then snapshots)."""
        with self._lock:
            if len(self._events) >= self.limit:
                return False
            self._events.append(event)
            return True

    def replace(self, events: list[CacheEvent]) -> None:
        with self._lock:
            self._events = events

    def drain(self) -> list[CacheEvent]:
        with self._lock:
            events, self._events = self._events, []
            return events


class RadixCache:
    """Pages of full-page token prefixes, shared by requests through ``pool`` references."""

    def __init__(self, pool: PagePool, event_limit: int = 65536) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.roots: dict[str | None, Node] = {}  # one tree per cache salt (None: unsalted)
        self.num_pages = 0  # nodes in the tree (each holds one pool reference)
        self.stats = CacheStats()
        self.events = EventBuffer(max(event_limit, 2 * pool.num_pages + 2))

    def root(self, salt: str | None) -> Node:
        node = self.roots.get(salt)
        if node is None:
            node = self.roots[salt] = Node((), -1, root_hash(salt), None)
        return node

    # ------------------------------------------------------------------ lookup
    def match(self, token_ids: list[int], max_tokens: int, salt: str | None = None) -> list[Node]:
        """The longest cached path of full pages within ``token_ids[:max_tokens]`` (not locked)
        among requests of the same ``salt``."""
        path: list[Node] = []
        node = self.roots.get(salt)
        if node is None:
            return path
        size = self.page_size
        for start in range(0, max_tokens - size + 1, size):
            child = node.children.get(tuple(token_ids[start : start + size]))
            if child is None:
                break
            path.append(child)
            node = child
        return path

    def partial(
        self, token_ids: list[int], path: list[Node], max_tokens: int, salt: str | None = None
    ) -> tuple[Node, int] | None:
        """The child of ``path``'s end sharing the longest run (at least one token, less than a
        page) with ``token_ids`` after ``path``, within ``max_tokens``: ``(node, tokens)``."""
        parent = path[-1] if path else self.roots.get(salt)
        start = len(path) * self.page_size
        want = token_ids[start:max_tokens]
        if parent is None or not want:
            return None
        best: tuple[Node, int] | None = None
        for child in parent.children.values():
            same = 0
            for a, b in zip(child.tokens, want):
                if a != b:
                    break
                same += 1
            if same and (best is None or same > best[1]):
                best = (child, same)
        return best

    def page_key(
        self, token_ids: list[int], page_index: int, path: list[Node], salt: str | None = None
    ) -> int:
        """Chain hash of page ``page_index`` of ``token_ids`` right after the matched ``path``
        (``page_index == len(path)``): names a page some running request may be computing."""
        parent = path[-1].hash if path else root_hash(salt)
        start = page_index * self.page_size
        return chain_hash(parent, token_ids[start : start + self.page_size])

    def lock(self, path: list[Node]) -> None:
        now = next(_clock)
        for node in path:
            node.locks += 1
            node.last_used = now

    def unlock(self, path: list[Node]) -> None:
        now = next(_clock)
        for node in path:
            assert node.locks > 0, "unlocking a node that is not locked"
            node.locks -= 1
            node.last_used = now

    def record_lookup(self, looked_up: int, hit: int) -> None:
        self.stats.looked_up_tokens += looked_up
        self.stats.hit_tokens += hit

    # ------------------------------------------------------------------ insert
    def insert(
        self,
        token_ids: list[int],
        pages: list[int],
        tail: Node | None,
        start: int,
        salt: str | None = None,
    ) -> tuple[list[Node], Node, int]:
        """Add the full pages of ``token_ids`` (KV in ``pages``) from page index ``start`` on,
        below ``tail`` (the node of page ``start - 1``; None: the root of ``salt``). Returns
        the nodes now in the caller's page table (locked for it), the new tail and the next
        page index.
        Where another request cached the same tokens meanwhile, the caller adopts that page:
        ``pages[index]`` is replaced in place and its duplicate released (same tokens, same
        weights: the same KV), so duplicates do not outlive the step."""
        node = tail or self.root(salt)
        added: list[Node] = []
        run: list[int] = []  # hashes of consecutive new nodes, published as one chain
        run_parent = node.hash
        size = self.page_size
        end = len(token_ids) // size
        for index in range(start, end):
            key = tuple(token_ids[index * size : (index + 1) * size])
            child = node.children.get(key)
            if child is None:
                child = Node(key, pages[index], chain_hash(node.hash, key), node)
                child.locks, child.last_used = 1, next(_clock)
                node.children[key] = child
                self.pool.share([child.page])
                self.num_pages += 1
                self.stats.inserted_pages += 1
                added.append(child)
                if not run:
                    run_parent = node.hash
                run.append(child.hash)
            else:
                if child.page != pages[index]:
                    self.pool.share([child.page])
                    self.pool.release([pages[index]])
                    pages[index] = child.page
                child.locks += 1
                child.last_used = next(_clock)
                added.append(child)
                if run:
                    self._publish(BlocksStored(tuple(run), run_parent))
                    run = []
            node = child
        if run:
            self._publish(BlocksStored(tuple(run), run_parent))
        return added, node, max(start, end)

    # ------------------------------------------------------------------ evict / reset
    def evict(self, num_pages: int) -> int:
        """Drop up to ``num_pages`` least-recently-used unlocked leaves (parents become leaves
        and may follow). Returns how many nodes were dropped; a page returns to the free list
        only if no request still holds it."""
        heap = [(n.last_used, id(n), n) for n in self._leaves() if n.locks == 0]
        heapq.heapify(heap)
        removed: list[int] = []
        while heap and len(removed) < num_pages:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            self._drop(node)
            removed.append(node.hash)
            if parent.parent is not None and not parent.children and parent.locks == 0:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        if removed:
            self.stats.evicted_pages += len(removed)
            self._publish(BlocksRemoved(tuple(removed)))
        return len(removed)

    def _drop(self, node: Node) -> None:
        assert node.parent is not None
        del node.parent.children[node.tokens]
        self.pool.release([node.page])
        self.num_pages -= 1

    def _leaves(self) -> list[Node]:
        return [node for node in self._nodes() if not node.children]

    def pages(self) -> list[int]:
        """The page of every node (one pool reference each)."""
        return [node.page for node in self._nodes()]

    def _nodes(self) -> list[Node]:
        nodes: list[Node] = []
        stack = [child for root in self.roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes

    def reset(self) -> None:
        """Drop every node (locked ones too: their requests keep their own page references,
        and ``insert`` never re-adds stale pages because the owner resets their paths)."""
        nodes = self._nodes()
        for node in nodes:
            node.children = {}
            node.parent = None
        pages = [node.page for node in nodes]
        self.roots = {}
        self.pool.release(pages)
        self.num_pages = 0
        self.stats.resets += 1
        self._publish(AllBlocksCleared())

    # ------------------------------------------------------------------ events
    def _publish(self, event: CacheEvent) -> None:
        if not self.events.add(event):
            self.events.replace([AllBlocksCleared(), *self._snapshot()])

    def _snapshot(self) -> list[CacheEvent]:
        """One ``BlocksStored`` chain per root-to-leaf path, shared prefixes sent once."""
        events: list[CacheEvent] = []
        stack = [
            (child, root.hash, ())
            for root in self.roots.values()
            for child in root.children.values()
        ]
        while stack:
            node, parent_hash, chain = stack.pop()
            chain = (*chain, node.hash)
            if not node.children:
                events.append(BlocksStored(chain, parent_hash))
                continue
            kids = list(node.children.values())
            stack.append((kids[0], parent_hash, chain))
            stack.extend((kid, node.hash, ()) for kid in kids[1:])
        return events
