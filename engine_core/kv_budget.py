"""The default KV budget: sized from the memory available when the engine starts, capped.

Used when neither ``max_total_tokens``, ``mem_fraction_static`` nor ``kv_cache_memory_bytes``
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

from typing import Any

DEFAULT_KV_FRACTION = 0.25
DEFAULT_KV_CAP_BYTES = 2 << 30
DEFAULT_KV_FLOOR_BYTES = 64 << 20


def default_kv_budget_bytes(config: Any, model_cfg: Any, context_length: int) -> int:
    """Per-rank KV bytes for an engine whose config gives no KV size (module docstring)."""
    import torch

    from engine_core import sglang_args
    from engine_core.execution.model_runner import packed_copy_fraction, resolve_dtype

    dtype = resolve_dtype(config, model_cfg)
    elem = torch.empty(0, dtype=dtype).element_size()
    weights = sglang_args.checkpoint_numel(config.model_path) * elem
    # the packed copy of the matrices (layers.packed_linear)
    weights = int(weights * (1.0 + packed_copy_fraction(config, dtype)))
    available = sglang_args.available_memory_bytes(config.device)
    per_token = 2 * model_cfg.num_layers * model_cfg.num_kv_heads * model_cfg.head_dim * elem
    useful = config.max_running_requests * context_length * per_token
    share = int(DEFAULT_KV_FRACTION * available) - weights
    engine_bytes = max(DEFAULT_KV_FLOOR_BYTES, min(share, DEFAULT_KV_CAP_BYTES, useful))
    if config.device == "cuda":
        return engine_bytes
    return max(1, engine_bytes // config.tp_size)
