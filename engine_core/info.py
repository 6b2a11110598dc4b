"""What ``Engine.get_server_info`` and ``get_model_info`` report: the engine's own state and
SGLang's keys (``engine_core.sglang_args``), read from the engine's parts."""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

from engine_core.sglang_args import server_args_view


def server_info(engine: Any) -> dict[str, Any]:
    """Engine state (``config``, ``model``, ``memory``, counters), plus SGLang's flat keys:
    every ``ServerArgs`` name of ``engine_core.sglang_args`` (the value in effect here),
    ``max_total_num_tokens``, ``max_req_input_len``, ``internal_states`` and ``version``."""
    stats = engine.loop.stats
    throughput = stats.generated_tokens / stats.busy_seconds if stats.busy_seconds else 0.0
    ours = {
        "config": engine.config.to_dict(),
        "model": engine.model_config.__dict__ | {"context_length": engine.context_length},
        "weight_version": engine.weight_version,
        "num_running_requests": len(engine.scheduler.running),
        "num_waiting_requests": len(engine.scheduler.waiting),
        "num_total_pages": engine.pool.num_pages,
        "num_free_pages": engine.pool.num_free,
        "max_total_num_tokens": engine.pool.capacity_tokens,
        "num_retractions": engine.scheduler.stats.num_retractions,
        "page_size": engine.config.page_size,
        "prefill_tokens": stats.prefill_tokens,
        **prefix_cache_info(engine.scheduler),
        "deterministic_matmul": engine.rank_info.deterministic_matmul,
        "memory": engine.memory.info(),
        **peak_rss_info(engine.ranks.rank_pids()),
        **engine.loop.pause.info(),
        "generated_tokens": stats.generated_tokens,
        "steps": stats.steps,
        "decode_throughput": throughput,
    }
    sglang = server_args_view(engine.config, engine.server_args_given) | {
        "context_length": engine.context_length,
        "model_path": engine.served["model_path"],
        "load_format": engine.served["load_format"] or "auto",
        "served_model_name": model_info(engine)["served_model_name"],
        "max_req_input_len": min(engine.context_length, engine.pool.capacity_tokens) - 1,
        "internal_states": [
            {
                "last_gen_throughput": throughput,
                "memory_usage": {"token_capacity": engine.pool.capacity_tokens},
                "weight_version": engine.weight_version,
            }
        ],
        "version": package_version(),
    }
    return sglang | ours  # our keys win (same meaning where both have one)


def peak_rss_info(rank_pids: list[int]) -> dict[str, Any]:
    """``peak_rss_bytes``: the high-water resident memory of this engine (its own process plus
    its rank processes; with tp_size 1 the rank is this process), and ``rank_peak_rss_bytes``
    per rank, from ``VmHWM`` in ``/proc/<pid>/status`` (None where it cannot be read)."""
    own = os.getpid()
    ranks = [_vm_hwm_bytes(pid) for pid in rank_pids]
    total = sum(r for pid, r in zip(rank_pids, ranks) if r is not None and pid != own)
    mine = _vm_hwm_bytes(own)
    return {
        "peak_rss_bytes": None if mine is None else mine + total,
        "rank_peak_rss_bytes": ranks,
    }


def _vm_hwm_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def prefix_cache_info(scheduler: Any) -> dict[str, Any]:
    """``cache_hit_rate`` (prompt tokens served from the cache / prompt tokens admitted, since
    start) and the radix cache's counters under ``prefix_cache``."""
    cache = scheduler.prefix.cache
    if cache is None:
        return {"cache_hit_rate": 0.0, "prefix_cache": {"enabled": False}}
    st = cache.stats
    rate = st.hit_tokens / st.looked_up_tokens if st.looked_up_tokens else 0.0
    return {
        "cache_hit_rate": rate,
        "prefix_cache": {
            "enabled": True,
            "cached_pages": cache.num_pages,
            "hit_tokens": st.hit_tokens,
            "looked_up_tokens": st.looked_up_tokens,
            "inserted_pages": st.inserted_pages,
            "evicted_pages": st.evicted_pages,
            "resets": st.resets,
            "deferred_admissions": scheduler.stats.num_deferred,
        },
    }


def model_info(engine: Any) -> dict[str, Any]:
    """SGLang's ``get_model_info``: what this engine serves now (``model_path`` and
    ``load_format`` follow the last successful ``update_weights_from_disk``)."""
    given = engine.server_args_given
    return {
        "model_path": engine.served["model_path"],
        "tokenizer_path": None if engine.tokenizer is None else engine.config.model_path,
        "served_model_name": given.get("served_model_name") or engine.config.model_path,
        "is_generation": True,
        "weight_version": engine.weight_version,
        "load_format": engine.served["load_format"],
        "reasoning_parser": given.get("reasoning_parser"),
        "tool_call_parser": given.get("tool_call_parser"),
        "preferred_sampling_params": given.get("preferred_sampling_params"),
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": engine.model_config.model_type,
        "architectures": [engine.model_config.architecture],
    }


def package_version() -> str:
    try:
        return importlib.metadata.version("rl-rollout")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
