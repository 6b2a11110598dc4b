"""Paged KV cache bookkeeping: a pool of fixed-size pages with reference counts. Pure Python.

Ref counts exist so a later prefix (radix) cache can share a page between requests: a page
returns to the free list only when its last holder releases it.
"""

from __future__ import annotations


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class PagePool:
    """Owns page ids ``0..num_pages-1``; hands them out and takes them back."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        assert num_pages > 0 and page_size > 0, (num_pages, page_size)
        self.num_pages = num_pages
        self.page_size = page_size
        # Lowest ids first, so an idle engine always reuses the same pages (helps debugging).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._refs: list[int] = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free pages (ref count 1 each); raises if not enough are free."""
        if count > len(self._free):
            raise RuntimeError(f"page pool exhausted: want {count}, free {len(self._free)}")
        pages = [self._free.pop() for _ in range(count)]
        for page in pages:
            self._refs[page] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """Add a holder to pages already allocated (prefix sharing)."""
        for page in pages:
            assert self._refs[page] > 0, f"sharing free page {page}"
            self._refs[page] += 1

    def release(self, pages: list[int]) -> None:
        """Drop one holder from each page; pages nobody holds return to the free list."""
        for page in pages:
            assert self._refs[page] > 0, f"double free of page {page}"
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def check_integrity(self) -> None:
        """Assert every page is either free (ref 0, listed once) or held (ref > 0, not listed)."""
        free = set(self._free)
        assert len(free) == len(self._free), "duplicate page in free list"
        for page, refs in enumerate(self._refs):
            assert refs >= 0, f"page {page} has negative refs"
            assert (refs == 0) == (page in free), f"page {page}: refs={refs}, free={page in free}"
