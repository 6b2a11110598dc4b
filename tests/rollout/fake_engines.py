"""Fake engine actors for router tests: a toy prefix cache behind Ray-like handles.

``FakeEngine`` caches every prompt's full pages (chain hashes, ``page_size`` tokens), evicts
least recently used pages beyond ``capacity_pages`` (children before parents, as a radix cache
evicts leaves), publishes the matching cache events for ``drain_cache_events`` and reports
``cached_tokens`` per output, as the real engine will. No Ray, no model.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ray.exceptions import RayActorError

from engine_core.requests.generate_request import GenerateRequest
from engine_core.scheduling.cache_events import (
    ROOT_HASH,
    BlocksRemoved,
    BlocksStored,
    CacheEvent,
    block_hashes,
)


class Method:
    """``handle.method.remote(...)``: an awaitable, like a Ray ObjectRef."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def remote(self, *args: Any, **kwargs: Any):
        async def call():
            await asyncio.sleep(0)  # let other groups interleave, as actor calls do
            return self._fn(*args, **kwargs)

        return call()


def char_tokens(text: str) -> list[int]:
    """The fake tokenizer (engine and driver share it, as they share the model's)."""
    return [ord(c) % 250 + 1 for c in text]


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return char_tokens(text)


class FakeEngine:
    def __init__(self, page_size: int = 16, capacity_pages: int = 10**6) -> None:
        self.page_size = page_size
        self.capacity = capacity_pages
        self.dead = False
        self.drains = 0
        self.prompts: list[list[int]] = []
        self._pages: OrderedDict[int, int] = OrderedDict()  # hash -> parent
        self._events: list[CacheEvent] = []
        self.generate = Method(self._generate)
        self.drain_cache_events = Method(self._drain)
        self.get_server_info = Method(lambda: {"page_size": self.page_size})
        self.abort_request = Method(lambda **kwargs: None)

    def _check(self) -> None:
        if self.dead:
            raise RayActorError()

    def _drain(self) -> list[CacheEvent]:
        self._check()
        self.drains += 1
        events, self._events = self._events, []
        return events

    def _generate(self, request: GenerateRequest) -> list[dict]:
        self._check()
        outputs = []
        for item in request.items():
            ids = char_tokens(item.input) if request.is_text else list(item.input)
            self.prompts.append(ids)
            cached = self._admit(ids)
            n = (item.sampling_params or {}).get("n", 1)
            for i in range(n):
                meta = {
                    "id": item.rid if n == 1 else f"{item.rid}-{i}",
                    "prompt_tokens": len(ids),
                    "completion_tokens": 1,
                    "cached_tokens": cached,
                }
                outputs.append({"text": "x", "output_ids": [1], "meta_info": meta})
        return outputs

    def _admit(self, ids: list[int]) -> int:
        """Cache ``ids``' pages; returns the tokens that were already cached."""
        hashes = block_hashes(ids, self.page_size)
        hit = 0
        while hit < len(hashes) and hashes[hit] in self._pages:
            hit += 1
        new = hashes[hit:]
        if new:
            parent = hashes[hit - 1] if hit else ROOT_HASH
            for i, h in enumerate(new):
                self._pages[h] = hashes[hit + i - 1] if hit + i else ROOT_HASH
            self._events.append(BlocksStored(tuple(new), parent))
        for h in reversed(hashes):  # leaf first: the root is the most recently used
            self._pages.move_to_end(h)
        gone = []
        while len(self._pages) > self.capacity:
            gone.append(self._pages.popitem(last=False)[0])
        if gone:
            self._events.append(BlocksRemoved(tuple(gone)))
        return hit * self.page_size
