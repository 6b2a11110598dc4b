"""Committing staged weights: copy them in, or adopt the received buffer as parameter storage.

A copy commit writes every source into the live parameter (``dst.copy_(src)``). An *adopting*
commit is for sources whose memory was handed over to the engine -- the staging arena a
distributed refit received into -- and saves the full-model copy: a parameter whose sources
already lie in one buffer back to back, in the parameter's layout, is rebound to a view of that
buffer (``param.data = view``; the ``nn.Parameter`` object and every reference to it stay).

Adoption happens only when the update covers every parameter completely, and only if most of
the bytes can be adopted (a view pins the whole buffer). Then, after the commit, no parameter
aliases any earlier buffer: the ones that could not be adopted (fused parts
split across buckets, TP shards cut out of the middle of a tensor) are copied into storage of
their own. That is what lets the arena reuse its other buffer for the next update (double
buffering) and what keeps a partial refit from pinning two buffers at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# A parameter adopts a view only if it is aligned like a fresh allocation would be: MKL's GEMV
# gives different bits for weights off a 32-byte boundary, cuBLASLt checks up to 256 bytes.
ADOPT_ALIGN_BYTES = 256


@dataclass
class Part:
    """One validated source for a slice of one parameter (``dst`` is a view of ``param``)."""

    param: nn.Parameter
    dst: torch.Tensor
    src: torch.Tensor


def commit_by_copy(parts: list[Part]) -> None:
    with torch.no_grad():
        for part in parts:
            part.dst.copy_(part.src)


def commit_adopting(parts: list[Part], all_params: list[nn.Parameter]) -> int:
    """Adopt what can be adopted, copy the rest; returns how many parameters were adopted.

    Falls back to :func:`commit_by_copy` unless ``parts`` cover every one of ``all_params``.
    """
    by_param: dict[int, list[Part]] = {}
    for part in parts:
        by_param.setdefault(id(part.param), []).append(part)
    complete = all(_covers(p, by_param.get(id(p), [])) for p in all_params)
    if not complete:
        commit_by_copy(parts)
        return 0
    views = {id(p): _adoptable_view(p, by_param[id(p)]) for p in all_params}
    adoptable = sum(p.nbytes for p in all_params if views[id(p)] is not None)
    # Adopting pins the whole received buffer; worth it only if it saves most of the copy
    # (with TP most shards are cut out of the middle of a tensor and must be copied anyway).
    adopt = 2 * adoptable >= sum(p.nbytes for p in all_params)
    adopted = 0
    with torch.no_grad():
        for param in all_params:
            own, view = by_param[id(param)], views[id(param)]
            if adopt and view is not None:
                param.data = view
                adopted += 1
                continue
            if _shares_storage(param) and param.is_contiguous():
                # Leave the old buffer for the arena to reuse; every element is written below.
                # (A part's ``dst`` may be the parameter itself: take offsets before rebinding.)
                where = [(p.dst.shape, p.dst.stride(), _offset_in(p.dst, param)) for p in own]
                param.data = torch.empty_like(param)
                for part, (shape, stride, offset) in zip(own, where):
                    start = param.storage_offset() + offset
                    param.data.as_strided(shape, stride, start).copy_(part.src)
                continue
            for part in own:
                part.dst.copy_(part.src)
    return adopted


def _offset_in(view: torch.Tensor, param: torch.Tensor) -> int:
    return view.storage_offset() - param.storage_offset()


def _covers(param: torch.Tensor, parts: list[Part]) -> bool:
    return bool(parts) and sum(p.dst.numel() for p in parts) == param.numel()


def _shares_storage(param: torch.Tensor) -> bool:
    return param.untyped_storage().nbytes() > param.numel() * param.element_size()


def _adoptable_view(param: torch.Tensor, parts: list[Part]) -> torch.Tensor | None:
    """A view of the sources' buffer laid out exactly like ``param``, if they form one.

    Needs: parts in parameter order covering it back to back, each source contiguous, of the
    parameter's dtype and device, and the sources consecutive in one storage (e.g. q, k, v
    received next to each other for a fused QKV weight).
    """
    if not param.is_contiguous():
        return None
    base = param.storage_offset()
    ordered = sorted(parts, key=lambda p: p.dst.storage_offset())
    expect_dst = base
    first = ordered[0].src
    expect_src = first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    for part in ordered:
        src = part.src
        if (
            part.dst.storage_offset() != expect_dst
            or not part.dst.is_contiguous()
            or not src.is_contiguous()
            or src.dtype != param.dtype
            or src.device != param.device
            or src.untyped_storage().data_ptr() != storage
            or src.storage_offset() != expect_src
            or src.numel() != part.dst.numel()
        ):
            return None
        expect_dst += part.dst.numel()
        expect_src += src.numel()
    if first.data_ptr() % ADOPT_ALIGN_BYTES:
        return None  # kernels would take another path than on a fresh allocation: other bits
    return first.as_strided(param.shape, param.stride(), first.storage_offset())
