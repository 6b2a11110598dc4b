"""Prefix-cache page events and the block hashes that name cached pages. Pure Python.

An engine's radix cache stores KV in whole pages of ``page_size`` tokens. Each cached page is
named by a *chain hash*: the hash of its tokens together with the hash of the page before it, so
one hash names a whole prefix (the page and everything before it). The engine publishes an
event whenever pages enter or leave its cache; a router that replays the events knows exactly
which prefixes each engine holds (no guessing, evictions and flushes included).

The hash is computed the same way on both sides (this function), is stable across processes
and Python's hash seed (blake2b over the token ids), and fits in 63 bits.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

ROOT_HASH = 0  # the "parent" of a prefix's first page (requests without a cache salt)


def root_hash(salt: str | None) -> int:
    """The parent hash of a prefix's first page: ``ROOT_HASH``, or one per SGLang
    ``cache_salt`` (requests share cached pages only with requests of the same salt)."""
    if salt is None:
        return ROOT_HASH
    digest = hashlib.blake2b(salt.encode(), digest_size=8, person=b"cache_salt").digest()
    return (int.from_bytes(digest, "little") >> 1) or 1


def chain_hash(parent: int, page_tokens: list[int] | tuple[int, ...]) -> int:
    """The hash of one full page of tokens following the prefix named ``parent``."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little"))
    h.update(array("q", page_tokens).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def block_hashes(
    token_ids: list[int] | tuple[int, ...], page_size: int, salt: str | None = None
) -> list[int]:
    """Chain hashes of every *full* page of ``token_ids``, in prefix order."""
    hashes: list[int] = []
    parent = root_hash(salt)
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        parent = chain_hash(parent, token_ids[start : start + page_size])
        hashes.append(parent)
    return hashes


@dataclass(frozen=True)
class BlocksStored:
    """Pages named ``block_hashes`` (a chain, in prefix order) entered the cache; the first
    follows the prefix named ``parent_hash`` (``root_hash(salt)``: it starts the sequence)."""

    block_hashes: tuple[int, ...]
    parent_hash: int


@dataclass(frozen=True)
class BlocksRemoved:
    """Pages named ``block_hashes`` left the cache (evicted); they are always leaves, so every
    longer prefix through them was removed before or in the same event."""

    block_hashes: tuple[int, ...]


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole cache was dropped (``flush_cache``, a refit, or an event-buffer overflow, in
    which case a ``BlocksStored`` snapshot of what is still cached follows)."""


CacheEvent = BlocksStored | BlocksRemoved | AllBlocksCleared
