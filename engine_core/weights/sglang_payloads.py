"""SGLang's colocated refit payloads, decoded without importing sglang.

What verl and slime hand ``sglang.Engine.update_weights_from_tensor``:

- ``serialized_named_tensors``: one payload per TP rank, each what SGLang's
  ``MultiprocessingSerializer.serialize(obj, output_str=...)`` produces -- a
  ``multiprocessing.reduction.ForkingPickler`` dump (torch's reductions: CPU tensors travel as
  shared-memory file descriptors, CUDA tensors as IPC handles) as bytes, or base64 text when
  ``output_str=True``. Rank ``r`` decodes entry ``r`` only (a descriptor can be fetched once).
- ``obj``: ``[(name, tensor), ...]`` (verl may wrap each tensor in a ``LocalSerializedTensor``
  whose ``values`` hold one serialized tensor per rank), or with
  ``load_format="flattened_bucket"`` SGLang's ``FlattenedTensorBucket`` dict
  ``{"flattened_tensor": 1-D tensor, "metadata": [FlattenedTensorMetadata(name, shape, dtype,
  start_idx, end_idx, numel), ...]}``.

Unpickling is restricted to what those payloads contain (torch's rebuild functions, storages,
dtypes, the metadata record): a payload naming anything else raises ``ModelLoadError``.
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from engine_core.errors import ModelLoadError

FLATTENED_BUCKET = "flattened_bucket"


@dataclass
class FlattenedTensorMetadata:
    """SGLang's per-tensor record of a flattened bucket (same fields; any module name
    unpickles to this class)."""

    name: str
    shape: Any
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


# SGLang's monkey_patch_torch_reductions sends a CUDA tensor's device as its UUID (argument 6
# of torch's rebuild_cuda_tensor), so processes with different CUDA_VISIBLE_DEVICES agree.
_CUDA_DEVICE_ARG = 6


def _device_index(device: int | str) -> int:
    if isinstance(device, int):
        return device
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == device:
            return index
    raise ModelLoadError(f"serialized CUDA tensor on device {device!r}: no such device here")


def _rebuild_cuda_tensor_by_uuid(*args: Any) -> torch.Tensor:
    from torch.multiprocessing import reductions

    if len(args) > _CUDA_DEVICE_ARG:
        fixed = _device_index(args[_CUDA_DEVICE_ARG])
        args = (*args[:_CUDA_DEVICE_ARG], fixed, *args[_CUDA_DEVICE_ARG + 1 :])
    return reductions.rebuild_cuda_tensor(*args)


def _allowed(module: str, name: str) -> bool:
    if module == "torch.multiprocessing.reductions":
        return name.startswith("rebuild_")
    if module == "torch._utils":
        return name.startswith("_rebuild_")
    if module == "torch.storage":
        return name in ("UntypedStorage", "TypedStorage")
    if module == "torch":
        return name in ("Tensor", "Size") or isinstance(getattr(torch, name, None), torch.dtype)
    return (module, name) in {
        ("multiprocessing.resource_sharer", "DupFd"),
        ("collections", "OrderedDict"),
    }


class _PayloadUnpickler(pickle.Unpickler):
    """Only what a weight payload needs; SGLang's own classes map to ours."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "FlattenedTensorMetadata":
            return FlattenedTensorMetadata
        if name == "_rebuild_cuda_tensor_modified":  # SGLang's patched CUDA rebuild
            return _rebuild_cuda_tensor_by_uuid
        if _allowed(module, name):
            return super().find_class(module, name)
        raise ModelLoadError(f"serialized weights name {module}.{name}: not a weight payload")


def is_serialized(named_tensors: Any) -> bool:
    """Whether ``named_tensors`` is SGLang's list of per-rank serialized payloads."""
    if not isinstance(named_tensors, list | tuple) or not named_tensors:
        return False
    return all(isinstance(item, bytes | bytearray | str) for item in named_tensors)


def per_rank_tensors(named_tensors: Any, tp_size: int) -> list[list] | None:
    """verl's ``[(name, LocalSerializedTensor(values=[one payload per TP rank]))]`` as one
    ``[(name, payload)]`` list per rank (None: not that shape). SGLang unwraps such a tensor
    on rank ``r`` as ``deserialize(values[r])``."""
    if not isinstance(named_tensors, list | tuple) or not named_tensors:
        return None
    values = [
        getattr(item[1], "values", None)
        if isinstance(item, tuple | list) and len(item) == 2
        else None
        for item in named_tensors
    ]
    if not all(isinstance(v, list | tuple) and is_serialized(v) for v in values):
        return None
    for (name, _), v in zip(named_tensors, values):
        if len(v) != tp_size:
            raise ModelLoadError(
                f"weight {name!r}: {len(v)} serialized values, expected one per TP rank ({tp_size})"
            )
    return [[(name, v[r]) for (name, _), v in zip(named_tensors, values)] for r in range(tp_size)]


def deserialize(payload: bytes | bytearray | str) -> Any:
    """One rank's payload -> the object SGLang serialized (tensors mapped, not copied)."""
    if isinstance(payload, str):
        try:
            payload = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ModelLoadError(f"serialized weights: not base64 text ({exc})") from None
    import torch.multiprocessing  # noqa: F401  (registers torch's rebuild functions)

    try:
        return _PayloadUnpickler(io.BytesIO(bytes(payload))).load()
    except ModelLoadError:
        raise
    except Exception as exc:  # truncated data, a dead producer's descriptors, ...
        raise ModelLoadError(f"cannot deserialize weights payload: {exc}") from exc


def bucket_pairs(bucket: Any) -> list[tuple[str, torch.Tensor]]:
    """A ``FlattenedTensorBucket`` dict -> ``(name, tensor)`` views into its flat tensor.

    Index ranges count elements of the flat tensor (SGLang's layout: every tensor flattened and
    concatenated); a ``uint8`` flat tensor holding other dtypes is read as bytes and viewed as
    each tensor's dtype."""
    if not isinstance(bucket, Mapping) or not {"flattened_tensor", "metadata"} <= set(bucket):
        raise ModelLoadError(
            f"load_format={FLATTENED_BUCKET!r}: expected a FlattenedTensorBucket dict "
            f"{{'flattened_tensor', 'metadata'}}, got {type(bucket).__name__}"
        )
    flat, pairs = bucket["flattened_tensor"], []
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
        raise ModelLoadError("flattened_tensor must be a 1-D tensor")
    for meta in bucket["metadata"]:
        start, end, shape = int(meta.start_idx), int(meta.end_idx), tuple(meta.shape)
        if not 0 <= start <= end <= flat.numel():
            raise ModelLoadError(
                f"weight {meta.name!r}: range [{start}, {end}) outside the flattened tensor "
                f"of {flat.numel()} elements"
            )
        piece = flat[start:end]
        if flat.dtype == torch.uint8 and meta.dtype != torch.uint8:
            piece = piece.view(meta.dtype)
        elif piece.dtype != meta.dtype:
            raise ModelLoadError(
                f"weight {meta.name!r}: metadata dtype {meta.dtype} but the flattened tensor "
                f"holds {piece.dtype} (refits never cast)"
            )
        if piece.numel() != torch.Size(shape).numel():
            raise ModelLoadError(
                f"weight {meta.name!r}: {piece.numel()} elements do not make shape {shape}"
            )
        pairs.append((str(meta.name), piece.view(shape)))
    return pairs


def decode_pairs(payload: Any, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """One rank's SGLang payload (serialized or already deserialized) -> ``(name, tensor)``."""
    obj = deserialize(payload) if isinstance(payload, bytes | bytearray | str) else payload
    if load_format == FLATTENED_BUCKET:
        return bucket_pairs(obj)
    if isinstance(obj, Mapping):
        return list(obj.items())
    pairs = list(obj) if isinstance(obj, list | tuple) else None
    if pairs is None or not all(isinstance(p, tuple | list) and len(p) == 2 for p in pairs):
        raise ModelLoadError(
            f"serialized weights: expected a list of (name, tensor), got {type(obj).__name__}"
        )
    # Each tensor may itself be serialized (verl's LocalSerializedTensor, this rank's value).
    return [
        (str(name), deserialize(t) if isinstance(t, bytes | bytearray | str) else t)
        for name, t in pairs
    ]


@dataclass
class FlattenedMetas:
    """SGLang's ``update_weights_from_distributed(..., load_format="flattened_bucket")``: the
    trainer broadcasts the listed tensors as one ``FlattenedTensorBucket`` tensor (each
    flattened, concatenated in list order). One dtype per call (the bucket's)."""

    metas: list[tuple[str, str, list[int]]]  # (name, dtype name, shape)

    def __post_init__(self) -> None:
        dtypes = {dtype for _, dtype, _ in self.metas}
        if len(dtypes) != 1:
            raise ModelLoadError(
                f"load_format={FLATTENED_BUCKET!r}: one dtype per flattened bucket, got "
                f"{sorted(dtypes)}"
            )

    def flat_meta(self) -> tuple[str, str, list[int]]:
        """The one tensor actually broadcast."""
        total = sum(torch.Size(shape).numel() for _, _, shape in self.metas)
        return "<flattened bucket>", self.metas[0][1], [total]

    def split(self, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        pairs, start = [], 0
        for name, _, shape in self.metas:
            numel = torch.Size(shape).numel()
            pairs.append((name, flat[start : start + numel].view(tuple(shape))))
            start += numel
        return pairs
