"""Flattening named tensors into per-dtype buckets and back.

``plan_buckets`` decides the layout (pure metadata); ``pack`` copies tensors into one flat buffer;
``unpack`` returns zero-copy views into a received flat buffer. The layout is deterministic: the
same ``(name, dtype, shape)`` sequence always yields the same buckets, which is what lets the
trainer send the plan once and then stream raw bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from weight_sync.spec import BucketMeta, TensorMeta, dtype_from_str, dtype_to_str, element_size

DEFAULT_BUCKET_BYTES = 512 << 20
# Every tensor starts this many bytes into a bucket (from an aligned bucket start). Kernels pick
# code paths by pointer alignment -- MKL's GEMV gives different bits for weights that are not
# 32-byte aligned, cuBLASLt checks up to 256 -- so a receiver that keeps a bucket as parameter
# storage must see the alignment a fresh allocation has to stay bitwise equal to it.
ALIGN_BYTES = 256
# Over gloo the bucket is packed by the CPU that also drives the sockets: smaller buckets let
# packing overlap the wire (on 2 cores 64 MB was at least as fast as 512 MB in most runs, and
# faster than 8-32 MB, see BENCHMARKS.md). A recommendation to pass as ``bucket_bytes``; the
# default stays DEFAULT_BUCKET_BYTES, which suits GPUs (packing is a device copy there).
CPU_BUCKET_BYTES = 64 << 20


NamedMeta = tuple[str, "torch.dtype | str", Sequence[int]]


def metas_of(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[NamedMeta]:
    """``(name, tensor)`` pairs -> ``(name, dtype, shape)`` triples for :func:`plan_buckets`."""
    return [(name, t.dtype, tuple(t.shape)) for name, t in named_tensors]


def plan_buckets(named_metas: Iterable[NamedMeta], bucket_bytes: int) -> list[BucketMeta]:
    """Group tensors into per-dtype buckets of at most ``bucket_bytes`` bytes.

    Order: dtypes in order of first appearance; within a dtype, tensors in input order, filled
    greedily, each starting on an ``ALIGN_BYTES`` boundary (the gaps are not meaningful). A
    tensor larger than ``bucket_bytes`` gets a bucket of its own (so no tensor is ever split).
    Empty and 0-d tensors are allowed.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    per_dtype: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    seen: set[str] = set()
    for name, dtype, shape in named_metas:
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        key = dtype if isinstance(dtype, str) else dtype_to_str(dtype)
        dtype_from_str(key)
        per_dtype.setdefault(key, []).append((name, tuple(int(d) for d in shape)))
    buckets: list[BucketMeta] = []
    for dtype, entries in per_dtype.items():
        buckets.extend(_fill_buckets(dtype, entries, bucket_bytes))
    return buckets


def align_elements(numel: int, dtype: str | torch.dtype) -> int:
    """``numel`` rounded up so that the next tensor starts on an ``ALIGN_BYTES`` boundary."""
    key = dtype if isinstance(dtype, str) else dtype_to_str(dtype)
    step = max(1, ALIGN_BYTES // element_size(key))
    return -(-numel // step) * step


def _fill_buckets(
    dtype: str, entries: list[tuple[str, tuple[int, ...]]], bucket_bytes: int
) -> list[BucketMeta]:
    limit = max(1, bucket_bytes // element_size(dtype))  # in elements
    buckets: list[BucketMeta] = []
    current: list[TensorMeta] = []
    used = 0
    for name, shape in entries:
        numel = 1
        for d in shape:
            numel *= d
        start = align_elements(used, dtype)
        if current and start + numel > limit:
            buckets.append(BucketMeta(dtype, used, tuple(current)))
            current, used, start = [], 0, 0
        current.append(TensorMeta(name, dtype, shape, start, numel))
        used = start + numel
    if current:
        buckets.append(BucketMeta(dtype, used, tuple(current)))
    return buckets


def _ordered(
    tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], bucket: BucketMeta
) -> list[torch.Tensor]:
    if isinstance(tensors, Mapping):
        missing = [m.name for m in bucket.tensors if m.name not in tensors]
        if missing:
            raise ValueError(f"tensors missing for bucket: {missing[:5]}")
        return [tensors[m.name] for m in bucket.tensors]
    if len(tensors) != len(bucket.tensors):
        raise ValueError(f"got {len(tensors)} tensors for a bucket of {len(bucket.tensors)}")
    return list(tensors)


def check_tensor(meta: TensorMeta, tensor: object) -> torch.Tensor:
    """Return ``tensor`` if it matches ``meta`` (type, dtype, shape), else raise ``ValueError``."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{meta.name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if dtype_to_str(tensor.dtype) != meta.dtype:
        raise ValueError(f"{meta.name}: dtype {tensor.dtype} does not match plan {meta.dtype}")
    if tuple(tensor.shape) != meta.shape:
        raise ValueError(
            f"{meta.name}: shape {tuple(tensor.shape)} does not match plan {meta.shape}"
        )
    return tensor


@torch.no_grad()
def pack(
    tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    bucket: BucketMeta,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy the bucket's tensors into one flat 1-D tensor of ``bucket.dtype``.

    ``tensors`` is a name->tensor mapping or a sequence in ``bucket.tensors`` order; they may be
    non-contiguous or on another device (``copy_`` moves them). ``out``, if given, must be a
    contiguous 1-D tensor of the bucket dtype with at least ``bucket.numel`` elements; the
    returned tensor is then its first ``bucket.numel`` elements. Raises ``ValueError`` on a
    missing tensor or a dtype/shape mismatch, before writing anything.
    """
    dtype = dtype_from_str(bucket.dtype)
    ordered = [check_tensor(m, t) for m, t in zip(bucket.tensors, _ordered(tensors, bucket))]
    if out is None:
        device = ordered[0].device if ordered else torch.device("cpu")
        out = torch.empty(bucket.numel, dtype=dtype, device=device)
    _check_flat(out, bucket, at_least=True)
    flat = out[: bucket.numel]
    end = 0
    for meta, tensor in zip(bucket.tensors, ordered):
        flat[end : meta.offset].zero_()  # alignment gap: no stale memory on the wire
        flat.narrow(0, meta.offset, meta.numel).view(meta.shape).copy_(tensor)
        end = meta.offset + meta.numel
    return flat


def contiguous_span(tensors: Sequence[torch.Tensor], bucket: BucketMeta) -> torch.Tensor | None:
    """A flat view of ``tensors`` if they already lie back to back in one storage exactly as the
    bucket's layout, else ``None`` (then they must be packed). Detached; no copy."""
    if not tensors or len(tensors) != len(bucket.tensors):
        return None
    first = tensors[0].detach()
    storage = first.untyped_storage().data_ptr()
    base = first.storage_offset() - bucket.tensors[0].offset
    if base < 0:
        return None
    for meta, tensor in zip(bucket.tensors, tensors):
        if (
            not tensor.is_contiguous()
            or dtype_to_str(tensor.dtype) != bucket.dtype
            or tensor.device != first.device
            or tensor.untyped_storage().data_ptr() != storage
            or tensor.storage_offset() != base + meta.offset
            or tensor.numel() != meta.numel
        ):
            return None
    if first.untyped_storage().nbytes() < (base + bucket.numel) * first.element_size():
        return None
    return first.as_strided((bucket.numel,), (1,), base)


def unpack(flat: torch.Tensor, bucket: BucketMeta) -> list[tuple[str, torch.Tensor]]:
    """Split a flat bucket into ``(name, view)`` pairs; views share ``flat``'s memory."""
    _check_flat(flat, bucket, at_least=False)
    return [(m.name, flat.narrow(0, m.offset, m.numel).view(m.shape)) for m in bucket.tensors]


def _check_flat(flat: torch.Tensor, bucket: BucketMeta, at_least: bool) -> None:
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"flat bucket must be 1-D contiguous, got shape {tuple(flat.shape)}")
    if dtype_to_str(flat.dtype) != bucket.dtype:
        raise ValueError(f"flat bucket dtype {flat.dtype} != bucket dtype {bucket.dtype}")
    too_small = flat.numel() < bucket.numel
    if too_small or (not at_least and flat.numel() != bucket.numel):
        raise ValueError(f"flat bucket has {flat.numel()} elements, bucket needs {bucket.numel}")


def typed_view(buffer: torch.Tensor, bucket: BucketMeta) -> torch.Tensor:
    """View the first ``bucket.nbytes`` bytes of a 1-D uint8 ``buffer`` as the bucket's dtype.

    Transports move raw bytes so that every dtype (bf16, fp8, bool, ...) works on every backend.
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < bucket.nbytes:
        raise ValueError(f"need a 1-D uint8 buffer of >= {bucket.nbytes} bytes")
    return buffer[: bucket.nbytes].view(dtype_from_str(bucket.dtype))


def as_bytes(flat: torch.Tensor) -> torch.Tensor:
    """A 1-D contiguous tensor viewed as uint8 (no copy)."""
    return flat.reshape(-1).view(torch.uint8)
