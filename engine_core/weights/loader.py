"""The one weight-ingest path: HF-named tensors -> shard-aware parameters.

Checkpoint load and every refit go through ``load_weights``: names are mapped (fused q/k/v and
gate/up), each tensor is cut to this rank's shard, and every name, shape (and, for refits,
dtype) is validated *before* anything is written, so a bad update leaves the model untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from engine_core.errors import ModelLoadError
from engine_core.layers.sharded import WeightOwner
from engine_core.weights.adopt import Part, commit_adopting, commit_by_copy

Key = tuple[str, str, object]  # (module path, parameter leaf, shard id)
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_path: str) -> list[str]:
    """Safetensors files of a HF directory (single file or sharded index); never pickles."""
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        paths = [os.path.join(model_path, name) for name in files]
    else:
        paths = [os.path.join(model_path, "model.safetensors")]
    for path in paths:
        if not os.path.isfile(path):
            raise ModelLoadError(f"missing weights file {path!r}")
    return paths


def iter_checkpoint(model_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from every safetensors file; corrupt files raise ModelLoadError."""
    for path in checkpoint_files(model_path):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise ModelLoadError(f"cannot read weights file {path!r}: {exc}") from exc


def owner_key(model: nn.Module, name: str) -> Key:
    """(module path, leaf, shard id) of HF name ``name``; fused parts per the model class's
    ``packed_modules`` (HF leaf module -> (fused module, shard id))."""
    if not isinstance(name, str):
        raise ModelLoadError(f"weight name {name!r} is of type {type(name).__name__}, not str")
    module_path, _, leaf = name.rpartition(".")
    parent, _, last = module_path.rpartition(".")
    packed = model.packed_modules
    if last in packed:
        fused, shard_id = packed[last]
        return f"{parent}.{fused}", leaf, shard_id
    return module_path, leaf, None


def owner_of(model: nn.Module, path: str) -> WeightOwner | None:
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    return module if isinstance(module, WeightOwner) else None


def expected_keys(model: nn.Module) -> set[Key]:
    """Every (module, leaf, shard) a complete checkpoint must provide."""
    keys: set[Key] = set()
    for path, module in model.named_modules():
        if isinstance(module, WeightOwner):
            for leaf in module.loaded_leaves():
                keys.update((path, leaf, shard) for shard in module.shard_ids())
    return keys


def hf_name(model: nn.Module, key: Key) -> str:
    """The HF name of (module path, leaf, shard id): ``owner_key``'s inverse."""
    path, leaf, shard = key
    if shard is None:
        return f"{path}.{leaf}"
    unpacked = {(fused, sid): hf for hf, (fused, sid) in model.packed_modules.items()}
    parent, _, last = path.rpartition(".")
    return f"{parent}.{unpacked[(last, shard)]}.{leaf}"


def hf_names(model: nn.Module) -> list[str]:
    """Every HF parameter name the model loads (fused layers split back into q/k/v, gate/up;
    a tied LM head is left out: it is ``model.embed_tokens.weight``), in module order."""
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    shard_order = {None: 0, "q": 0, "k": 1, "v": 2, 0: 0, 1: 1}  # HF order within a fused layer
    keys = sorted(
        expected_keys(model), key=lambda k: (order[k[0]], shard_order[k[2]], k[1] != "weight")
    )
    names = [hf_name(model, key) for key in keys]
    return [n for n in names if not n.endswith(SKIPPED_SUFFIXES)]


def _target(model: nn.Module, name: str, tensor: torch.Tensor, key: Key) -> Part:
    path, leaf, shard_id = key
    module = owner_of(model, path)
    if module is None or leaf not in module.loaded_leaves():
        raise ModelLoadError(f"unexpected weight {name!r}: the model has no such parameter")
    if shard_id not in module.shard_ids():
        parts = [hf_name(model, (path, leaf, sid)) for sid in module.shard_ids()]
        raise ModelLoadError(
            f"weight {name!r} is the engine's fused parameter; send its HF parts {parts}"
        )
    expected = module.full_shape(leaf, shard_id)
    if tuple(tensor.shape) != tuple(expected):
        raise ModelLoadError(
            f"weight {name!r}: shape {tuple(tensor.shape)}, expected {tuple(expected)}"
        )
    try:
        dst, src = module.shard_target(leaf, tensor, shard_id)
    except (ValueError, RuntimeError, IndexError) as exc:
        raise ModelLoadError(f"weight {name!r} with shape {tuple(tensor.shape)}: {exc}") from exc
    if tuple(dst.shape) != tuple(src.shape):
        raise ModelLoadError(
            f"weight {name!r}: shape {tuple(tensor.shape)} does not fit parameter "
            f"{path}.{leaf} (shard {tuple(src.shape)} vs expected {tuple(dst.shape)})"
        )
    return Part(getattr(module, leaf), dst, src)


def unfused(
    model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Split a fused tensor named as the engine's own parameter (SGLang's ``qkv_proj`` /
    ``gate_up_proj``, e.g. ``load_format="direct"``: the full tensor, parts stacked on dim 0 in
    HF order) into its HF parts; other tensors pass through."""
    for name, tensor in named_tensors:
        path, leaf, shard = owner_key(model, name)
        module = owner_of(model, path) if shard is None else None
        rows = module.fused_rows() if module is not None else None
        if rows is None or not isinstance(tensor, torch.Tensor) or leaf not in ("weight", "bias"):
            yield name, tensor
            continue
        if tensor.dim() == 0 or tensor.shape[0] != sum(rows):
            parts = [hf_name(model, (path, leaf, sid)) for sid in module.shard_ids()]
            raise ModelLoadError(
                f"fused weight {name!r} with shape {tuple(tensor.shape)}: expected {sum(rows)} "
                f"rows ({parts} stacked, full size {list(rows)})"
            )
        for sid, piece in zip(module.shard_ids(), tensor.split(list(rows)), strict=True):
            yield hf_name(model, (path, leaf, sid)), piece


@dataclass
class StagedWeights:
    """Validated sources for parameter slices, ready to commit; nothing written yet.

    ``adopt``: the sources' memory belongs to the engine from now on (a received staging
    buffer), so a complete update may become the parameters' storage instead of being copied
    (``engine_core.adopt``). Otherwise every source is copied and may be reused by its owner.
    """

    parts: list[Part]
    names: list[str]
    params: list[nn.Parameter]
    adopt: bool = False

    def commit(self) -> int:
        if self.adopt:
            commit_adopting(self.parts, self.params)
        else:
            commit_by_copy(self.parts)
        return len(self.names)


def stage_weights(
    model: nn.Module,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    require_complete: bool,
    expected_dtype: torch.dtype | None = None,
    adopt: bool = False,
) -> StagedWeights:
    """Map and validate every tensor (names, shapes, and dtype when ``expected_dtype`` is set).

    ``require_complete``: every parameter must be provided (checkpoint load and full refits).
    ``adopt``: see :class:`StagedWeights`. Raises ModelLoadError naming the first bad tensor;
    the model is never touched here.
    """
    tied = model.config.tie_word_embeddings
    parts: list[Part] = []
    seen: dict[Key, str] = {}
    for name, tensor in unfused(model, named_tensors):
        if name.endswith(SKIPPED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ModelLoadError(f"weight {name!r} is a {type(tensor).__name__}, not a tensor")
        _check_readable(name, tensor)
        if expected_dtype is not None and tensor.dtype != expected_dtype:
            raise ModelLoadError(
                f"weight {name!r} has dtype {tensor.dtype}, expected {expected_dtype}"
            )
        key = owner_key(model, name)
        if key in seen:
            raise ModelLoadError(f"weight {name!r} given twice (also as {seen[key]!r})")
        seen[key] = name
        parts.append(_target(model, name, tensor, key))
    if require_complete:
        missing = expected_keys(model) - set(seen)
        if missing:
            shown = sorted(
                f"{p}.{leaf}" + (f"[{s}]" if s is not None else "") for p, leaf, s in missing
            )
            raise ModelLoadError(f"missing weights: {shown[:8]}{' ...' if len(shown) > 8 else ''}")
    return StagedWeights(parts, list(seen.values()), list(model.parameters()), adopt)


def _check_readable(name: str, tensor: torch.Tensor) -> None:
    """Refuse, before anything is written, a tensor whose values a copy cannot read or that
    has no real-number values to give (a commit must not fail halfway)."""
    if tensor.is_meta:
        raise ModelLoadError(f"weight {name!r} is on the meta device (it holds no data)")
    if tensor.layout != torch.strided:
        raise ModelLoadError(f"weight {name!r} has layout {tensor.layout}, expected dense")
    if not tensor.is_floating_point():
        raise ModelLoadError(f"weight {name!r} has dtype {tensor.dtype}, expected floating point")


def load_weights(
    model: nn.Module,
    named_tensors,
    *,
    require_complete: bool,
    expected_dtype: torch.dtype | None = None,
) -> list[str]:
    """Stage then commit: on error nothing has been written. Returns the names loaded."""
    staged = stage_weights(
        model, named_tensors, require_complete=require_complete, expected_dtype=expected_dtype
    )
    staged.commit()
    return staged.names


def param_view(model: nn.Module, name: str) -> torch.Tensor:
    """This rank's parameter data behind HF name ``name`` (a view into the fused tensor)."""
    path, leaf, shard_id = owner_key(model, name)
    module = owner_of(model, path)
    try:
        view = module.shard_view(leaf, shard_id) if module is not None else None
    except (AttributeError, KeyError, TypeError, ValueError):
        view = None
    if not isinstance(view, torch.Tensor):
        raise ModelLoadError(f"unknown weight name {name!r}")
    return view
