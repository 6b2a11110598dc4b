"""``kernels.huge_pages``: the arena packs live in. Contract: tensors are usable, disjoint and
aligned; the memory is advised for huge pages (checked in /proc where the kernel offers THP);
a mapping goes away with its last tensor; packs made there compute the same bits."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

from engine_core.layers.packed_linear import PackedLinear
from kernels import cpu_linear
from kernels.huge_pages import HUGE_PAGE, HugePageArena

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _mapped(address: int) -> str | None:
    """The /proc/self/smaps block of the mapping holding ``address``, or None."""
    blocks = Path("/proc/self/smaps").read_text().split("\n")
    for i, line in enumerate(blocks):
        head = line.split(" ", 1)[0]
        if "-" not in head or ":" in head:
            continue
        lo, hi = (int(part, 16) for part in head.split("-"))
        if lo <= address < hi:
            block = [line]
            for rest in blocks[i + 1 :]:
                first = rest.split(" ", 1)[0]
                if "-" in first and ":" not in first:
                    break
                block.append(rest)
            return "\n".join(block)
    return None


def test_tensors_are_disjoint_aligned_and_writable():
    arena = HugePageArena(chunk_bytes=4 * HUGE_PAGE)
    shapes = [((3, 5), torch.float32), ((7,), torch.int8), ((2, 4, 16), torch.bfloat16)] * 20
    tensors = [arena.empty(shape, dtype) for shape, dtype in shapes]
    for i, t in enumerate(tensors):
        assert t.shape == shapes[i][0] and t.dtype == shapes[i][1] and t.is_contiguous()
        assert t.data_ptr() % 64 == 0
        t.fill_(i % 100)
    for i, t in enumerate(tensors):  # nothing written later landed on an earlier tensor
        assert torch.all(t == i % 100), i
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_large_tensor_gets_its_own_mapping_on_a_huge_page_boundary():
    arena = HugePageArena(chunk_bytes=4 * HUGE_PAGE)
    small = arena.empty((16,), torch.float32)
    large = arena.empty((3 * HUGE_PAGE // 4,), torch.float32)  # 3 MiB > a quarter chunk
    assert large.data_ptr() % HUGE_PAGE == 0
    after = arena.empty((16,), torch.float32)
    assert after.data_ptr() == small.data_ptr() + 64  # the chunk carries on after the large one


def test_zero_sized_and_bad_chunk():
    assert HugePageArena().empty((0, 16), torch.float32).shape == (0, 16)
    for bad in (0, HUGE_PAGE + 1, HUGE_PAGE // 2):
        with pytest.raises(ValueError, match="chunk_bytes"):
            HugePageArena(chunk_bytes=bad)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/smaps is Linux's")
def test_memory_is_advised_and_unmapped_with_its_last_tensor():
    arena = HugePageArena()
    t = arena.empty((4 * HUGE_PAGE // 4,), torch.float32)  # 4 MiB, own mapping
    t.fill_(1.0)
    address = t.data_ptr()
    block = _mapped(address)
    assert block is not None
    mode = THP.read_text() if THP.exists() else ""
    if "[never]" not in mode and mode:
        # The advice took (VmFlags "hg"); whether the kernel found free huge pages to back it
        # is up to its memory at the time, so AnonHugePages is not asserted.
        flags = [line for line in block.split("\n") if line.startswith("VmFlags:")]
        assert flags and " hg" in flags[0], block
    del t
    arena.reset()
    gc.collect()
    assert _mapped(address) is None


def test_packs_in_the_arena_compute_the_same_bits():
    torch.manual_seed(0)
    arena = HugePageArena()
    x = torch.randn(5, 96)
    for pack in (cpu_linear.pack, cpu_linear.pack_int8):
        for dtype in (torch.float32, torch.bfloat16):
            if pack is cpu_linear.pack_int8 and dtype is torch.bfloat16:
                continue
            w = torch.randn(40, 96).to(dtype)
            plain, huge = pack(w), pack(w, empty=arena.empty)
            assert torch.equal(plain.panels, huge.panels)
            assert torch.equal(
                cpu_linear.packed_linear(x, plain), cpu_linear.packed_linear(x, huge)
            )


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/smaps is Linux's")
def test_packed_linear_release_unmaps_its_packs():
    op = PackedLinear()
    weight = torch.randn(HUGE_PAGE // 4 // 96 * 2, 96)  # 2 MiB of panels: its own mapping
    address = op.packed(weight).panels.data_ptr()
    assert _mapped(address) is not None
    op.release()
    gc.collect()
    assert _mapped(address) is None
