"""Tensors on memory advised for transparent huge pages (2 MiB), for data a step streams whole.

A batch-1 decode step reads every packed weight matrix once (538 MB for the default model);
on 4 KiB pages that is ~130 000 pages a step, each a TLB miss (a two-level walk under a
hypervisor) and a boundary the hardware prefetchers stop at. The same 121 matrices on huge
pages stream 5-13 % faster at 1-8 rows (docs/PERFORMANCE.md). torch's allocator hands out
ordinary pages, and Linux's default THP mode (``madvise``) gives huge pages only to memory
that asks for them, so packs come from this arena instead.

Off Linux the arena hands out plain ``torch.empty`` tensors; where the kernel has THP off or
declines, the memory is ordinary anonymous memory: same contents, same results, only the speed
differs.
"""

from __future__ import annotations

import math
import mmap
import sys
import threading

import torch

HUGE_PAGE = 2 << 20
_ALIGN = 64  # a cache line, so every tensor starts where the kernels' vector loads like it


class HugePageArena:
    """A bump allocator over anonymous mappings advised for huge pages.

    Tensors are never freed one by one: each keeps its mapping alive (``torch.frombuffer``
    holds the buffer), and a mapping is unmapped when its last tensor is gone. ``reset``
    forgets the current chunk so later tensors start a new one; memory already handed out
    stays valid. Sized for long-lived data made once and rewritten in place (packed weights):
    freed space inside a chunk is not reused.
    """

    def __init__(self, chunk_bytes: int = 32 << 20) -> None:
        if chunk_bytes < HUGE_PAGE or chunk_bytes % HUGE_PAGE:
            raise ValueError(f"chunk_bytes must be a multiple of {HUGE_PAGE}, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self._chunk: torch.Tensor | None = None  # uint8 view of the current chunk
        self._used = 0
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized contiguous CPU tensor of ``shape`` and ``dtype`` from the arena."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0 or sys.platform != "linux":  # THP is Linux's; elsewhere plain memory
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            raw = self._take(nbytes)
        return raw.view(dtype).view(shape)

    def reset(self) -> None:
        """Start the next tensor in a fresh chunk (the old one is unmapped once unused)."""
        with self._lock:
            self._chunk, self._used = None, 0

    def _take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.chunk_bytes // 4:  # large: its own mapping, no chunk tail wasted
            return _mapping(nbytes)[:nbytes]
        start = -(-self._used // _ALIGN) * _ALIGN
        if self._chunk is None or start + nbytes > self._chunk.numel():
            self._chunk, start = _mapping(self.chunk_bytes), 0
        self._used = start + nbytes
        return self._chunk[start : start + nbytes]


def _mapping(nbytes: int) -> torch.Tensor:
    """``nbytes`` of fresh anonymous memory as a uint8 tensor starting on a huge-page boundary
    (the mapping is over-sized by one huge page to find it), advised for huge pages."""
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            region.madvise(advice)
        except OSError:  # THP compiled out or disabled: ordinary pages, same contents
            pass
    whole = torch.frombuffer(region, dtype=torch.uint8)
    offset = -whole.data_ptr() % HUGE_PAGE
    return whole[offset : offset + size]
