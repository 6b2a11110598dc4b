"""The KV cache's size per rank, in bytes, when no ``max_total_tokens`` gives it in tokens.

``resolve_kv_budget`` picks, in order: SGLang's ``mem_fraction_static`` (that fraction of the
device's memory minus the weights), the given ``kv_cache_memory_bytes``, else the default below.

The default budget: sized from the memory available when the engine starts, capped. Used
when neither ``max_total_tokens``, ``mem_fraction_static`` nor ``kv_cache_memory_bytes``
is given. A fixed budget either wastes memory or makes n-sample rollouts retract; taking a
share of what is available adapts to the host, and the caps keep several engines on one
machine (tests start several) from each claiming most of it:

- at most ``DEFAULT_KV_FRACTION`` of the available memory, minus the weights (and their packed
  copy where the matmul keeps one);
- at most ``DEFAULT_KV_CAP_BYTES`` per engine;
- at most the KV of ``max_running_requests`` full-context sequences (more is never used);
- at least ``DEFAULT_KV_FLOOR_BYTES`` (a small host still gets a usable engine).

CPU ranks share the host, so an engine's budget is split over its ranks; each CUDA rank
has its own device and budget.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any

from engine_core.errors import InvalidConfigError, ModelLoadError

DEFAULT_KV_FRACTION = 0.25
DEFAULT_KV_CAP_BYTES = 2 << 30
DEFAULT_KV_FLOOR_BYTES = 64 << 20


def default_kv_budget_bytes(config: Any, model_cfg: Any, context_length: int) -> int:
    """Per-rank KV bytes for an engine whose config gives no KV size (module docstring)."""
    import torch

    from engine_core.execution.model_runner import packed_copy_fraction, resolve_dtype

    dtype = resolve_dtype(config, model_cfg)
    elem = torch.empty(0, dtype=dtype).element_size()
    weights = checkpoint_numel(config.model_path) * elem
    # the packed copy of the matrices (layers.packed_linear)
    weights = int(weights * (1.0 + packed_copy_fraction(config, dtype)))
    available = available_memory_bytes(config.device)
    per_token = kv_bytes_per_token(config, model_cfg)
    useful = config.max_running_requests * context_length * per_token
    share = int(DEFAULT_KV_FRACTION * available) - weights
    engine_bytes = max(DEFAULT_KV_FLOOR_BYTES, min(share, DEFAULT_KV_CAP_BYTES, useful))
    if config.device == "cuda":
        return engine_bytes
    return max(1, engine_bytes // config.tp_size)


def kv_bytes_per_token(config: Any, model_cfg: Any) -> int:
    """K and V of one token in every layer, in the engine's dtype (all KV heads)."""
    import torch

    from engine_core.execution.model_runner import resolve_dtype

    elem = torch.empty(0, dtype=resolve_dtype(config, model_cfg)).element_size()
    return 2 * model_cfg.num_layers * model_cfg.num_kv_heads * model_cfg.head_dim * elem


def available_memory_bytes(device: str) -> int:
    """Device memory a fraction is taken of: on CUDA the device's total (as SGLang), on CPU
    ``MemAvailable`` of ``/proc/meminfo`` (else the free physical pages)."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[1])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def checkpoint_numel(model_path: str) -> int:
    """Parameters in a safetensors checkpoint, from the file headers (no tensor is read)."""
    from engine_core.weights.loader import checkpoint_files

    total = 0
    for path in checkpoint_files(model_path):
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            total += sum(
                math.prod(meta["shape"]) for key, meta in header.items() if key != "__metadata__"
            )
        except (OSError, ValueError, OverflowError, TypeError, KeyError, struct.error) as exc:
            # A corrupt file is the loader's typed error, wherever it is first read.
            raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None
    return total


def mem_fraction_budget_bytes(config: Any, model_cfg: Any) -> int:
    """Per-rank KV bytes for ``mem_fraction_static``: fraction x device memory - weights. CPU
    ranks share the host's memory (the remainder is split over them); each CUDA rank has a
    device of its own and holds 1/tp of the weights."""
    import torch

    from engine_core.execution.model_runner import resolve_dtype

    fraction = config.mem_fraction_static
    elem = torch.empty(0, dtype=resolve_dtype(config, model_cfg)).element_size()
    weights = checkpoint_numel(config.model_path) * elem
    memory = available_memory_bytes(config.device)
    tp = config.tp_size
    if config.device == "cuda":
        per_rank = int(fraction * memory - weights / tp)
    else:
        per_rank = int((fraction * memory - weights) / tp)
    if per_rank <= 0:
        where = "device memory" if config.device == "cuda" else "available RAM (MemAvailable)"
        raise InvalidConfigError(
            "mem_fraction_static",
            fraction,
            f"{fraction} x {memory} bytes of {where} leaves nothing for the KV cache after "
            f"{weights} bytes of weights; raise it or give max_total_tokens",
        )
    return per_rank


def resolve_kv_budget(config: Any, model_cfg: Any, context_length: int) -> Any:
    """``config`` with ``kv_cache_memory_bytes`` set to the per-rank KV bytes (module
    docstring); unchanged when ``max_total_tokens`` or ``kv_cache_memory_bytes`` sizes the
    cache already (after checking that the memory can hold that size)."""
    given = config.max_total_tokens is not None or config.kv_cache_memory_bytes is not None
    _check_fits(config, model_cfg, whole_cache=given)
    if given:
        return config
    if config.mem_fraction_static is not None:
        budget = mem_fraction_budget_bytes(config, model_cfg)
    else:
        budget = default_kv_budget_bytes(config, model_cfg, context_length)
    return dataclasses.replace(config, kv_cache_memory_bytes=budget)


def _check_fits(config: Any, model_cfg: Any, whole_cache: bool) -> None:
    """Refuse, naming the field, a KV size the device cannot hold before the allocator fails
    on it: one page, and (``whole_cache``: a size the caller gave) the whole cache. A budget
    derived here is not checked: the floor may exceed a small host's estimate on purpose."""
    page = config.page_size * kv_bytes_per_token(config, model_cfg)
    available = available_memory_bytes(config.device)
    where = "device memory" if config.device == "cuda" else "available RAM (MemAvailable)"
    if page > available:
        raise InvalidConfigError(
            "page_size", config.page_size, f"one page is {page} bytes of KV, over the {where}"
        )
    if not whole_cache:
        return
    if config.max_total_tokens is not None:
        field, value = "max_total_tokens", config.max_total_tokens
        need = -(-value // config.page_size) * page
    else:
        field, value = "kv_cache_memory_bytes", config.kv_cache_memory_bytes
        need = value if config.device == "cuda" else value * config.tp_size  # CPU ranks share
    if need > available:
        raise InvalidConfigError(
            field, value, f"the KV cache needs {need} bytes, over the {available} bytes of {where}"
        )
