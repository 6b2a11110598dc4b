"""SGLang ``ServerArgs`` names that ``Engine(**kwargs)`` accepts: one table, one translation.

A trainer written for ``sglang.Engine(model_path=..., **server_args)`` runs on
``engine_core.Engine`` by changing the import. Every accepted SGLang name is one row of
``SGLANG_ARGS`` (README "Migrating from SGLang" lists them all), of one of four kinds:

- ``map``: the knob has an ``EngineConfig`` counterpart; the value is converted, and SGLang's
  ``None`` ("choose for me") keeps the ``EngineConfig`` default.
- ``fixed``: the knob changes *what* is computed and only the behaviour of this engine is
  available (SGLang's default, sometimes a synonym of it); any other value raises
  ``InvalidConfigError`` naming the field instead of being silently dropped.
- ``no_effect``: nothing to do on this engine (HTTP ports, CUDA graphs, kernel backends,
  observability): accepted and logged once per engine, naming it.
- ``kept``: no ``EngineConfig`` field, but the ``Engine`` uses the value (``log_level``) or
  reports it (``get_model_info`` / ``get_server_info``).

A name that is neither an ``EngineConfig`` field nor a row here raises ``InvalidConfigError``
naming it. Pure Python (no torch at import): the Ray service validates engine kwargs with it.
What ``mem_fraction_static`` sizes is computed in ``engine_core.kv_budget``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine_core.errors import InvalidConfigError

log = logging.getLogger(__name__)

OMIT = object()  # a converter's answer: leave the EngineConfig default
DEFAULT_MAX_PREFILL_TOKENS = 16384  # SGLang's max_prefill_tokens default


@dataclass(frozen=True)
class Rule:
    kind: str  # "map" | "fixed" | "no_effect" | "kept"
    default: Any  # SGLang's default
    note: str
    target: str | None = None  # EngineConfig field ("map")
    convert: Callable[[Any, dict[str, Any]], Any] | None = None  # (value, all kwargs) -> value
    allowed: tuple[Any, ...] = ()  # "fixed": accepted values besides the default


def _map(target: str, default: Any, note: str, convert=None) -> Rule:
    return Rule("map", default, note, target=target, convert=convert or _none_keeps_default)


def _fixed(default: Any, note: str, *allowed: Any) -> Rule:
    return Rule("fixed", default, note, allowed=(default, *allowed))


def _no_effect(default: Any, note: str) -> Rule:
    return Rule("no_effect", default, note)


def _kept(default: Any, note: str) -> Rule:
    return Rule("kept", default, note)


def _none_keeps_default(value: Any, kwargs: dict[str, Any]) -> Any:
    return OMIT if value is None else value


def _radix_cache_disabled(value: Any, kwargs: dict[str, Any]) -> Any:
    if value is not None and not isinstance(value, bool):  # "false" would read as True
        raise InvalidConfigError("disable_radix_cache", value, "must be a bool")
    return OMIT if value is None else not value


def _dtype(value: Any, kwargs: dict[str, Any]) -> Any:
    return {"half": "float16", "float": "float32", None: OMIT}.get(value, value)


def _chunked_prefill(value: Any, kwargs: dict[str, Any]) -> Any:
    if value is None:
        return OMIT
    if value == -1:  # SGLang: no chunking; a step is then bounded by max_prefill_tokens
        return kwargs.get("max_prefill_tokens") or DEFAULT_MAX_PREFILL_TOKENS
    return value


def _cpu_backup(value: Any, kwargs: dict[str, Any]) -> Any:
    if not isinstance(value, bool):
        return value  # EngineConfig names the bad value
    device = kwargs.get("device")
    if device is None:
        from engine_core.config import default_device

        device = default_device()
    if device != "cuda":
        return OMIT  # CPU weights are host memory already: a copy would free nothing
    return value


_NO_HTTP = "no HTTP server: the engine is in-process"
_CUDA_ONLY = "no CUDA graphs / torch.compile: the engine runs eagerly"
_KERNELS = "kernels are chosen per device and mode (docs/ARCHITECTURE.md)"
_OBSERVE = "no metrics server or request log; see get_server_info()"
_SINGLE = "one engine = one tensor-parallel group on one node"

SGLANG_ARGS: dict[str, Rule] = {
    # ---------------------------------------------------------------- model and tokenizer
    "tokenizer_path": _fixed(None, "the tokenizer is read from model_path (or give model_path)"),
    "tokenizer_mode": _no_effect("auto", "the HF fast tokenizer of model_path is used"),
    "skip_tokenizer_init": _map("skip_tokenizer_init", False, ""),
    "load_format": _fixed("auto", "safetensors only (never pickles)", "safetensors"),
    "trust_remote_code": _no_effect(False, "built-in architectures only; no remote code runs"),
    "context_length": _map("context_length", None, "None: the model's config"),
    "is_embedding": _fixed(False, "generation only"),
    "enable_multimodal": _fixed(None, "text only", False),
    "revision": _fixed(None, "local HF directories only"),
    "model_impl": _fixed("auto", "the built-in implementation", "sglang"),
    "json_model_override_args": _fixed("{}", "config.json is used as it is"),
    "served_model_name": _kept(None, "reported by get_model_info (None: model_path)"),
    "weight_version": _map("weight_version", "default", ""),
    "chat_template": _no_effect(None, "no chat API; apply the template in the tokenizer"),
    "completion_template": _no_effect(None, "no completion API"),
    "reasoning_parser": _kept(None, "reported by get_model_info; nothing parses"),
    "tool_call_parser": _kept(None, "reported by get_model_info; nothing parses"),
    "preferred_sampling_params": _kept(None, "reported by get_model_info"),
    # ---------------------------------------------------------------- data types
    "dtype": _map("dtype", "auto", "'half' -> float16, 'float' -> float32", _dtype),
    "quantization": _fixed(None, "unquantized weights only"),
    "kv_cache_dtype": _fixed("auto", "the KV cache has the model's dtype"),
    "enable_fp32_lm_head": _no_effect(False, "logprobs are computed in float32 already"),
    "enable_tf32_matmul": _no_effect(False, "CUDA-only speed knob; fp32 matmul is kept"),
    # ---------------------------------------------------------------- memory and scheduling
    "mem_fraction_static": _map(
        "mem_fraction_static",
        None,
        "KV cache = fraction x device memory (CPU: MemAvailable) - weights; "
        "max_total_tokens wins when both are given",
    ),
    "max_running_requests": _map("max_running_requests", None, "None: 64"),
    "max_queued_requests": _no_effect(None, "the queue is bounded by max_requests_per_call"),
    "max_total_tokens": _map("max_total_tokens", None, "KV cache capacity in tokens"),
    "chunked_prefill_size": _map(
        "max_num_batched_tokens",
        None,
        "tokens per step (prefill chunks); -1 (no chunking) -> max_prefill_tokens",
        _chunked_prefill,
    ),
    "max_prefill_tokens": _no_effect(
        DEFAULT_MAX_PREFILL_TOKENS, "max_num_batched_tokens bounds every step (see above)"
    ),
    "prefill_max_requests": _no_effect(None, "max_running_requests bounds a step"),
    "schedule_policy": _no_effect("fcfs", "oldest first (lpm without a prefix cache is fcfs)"),
    "schedule_conservativeness": _no_effect(1.0, "admission reserves each request's pages"),
    "retraction_policy": _no_effect("length", "the newest running request is retracted"),
    "page_size": _map("page_size", None, "None: 16"),
    "disable_radix_cache": _map(
        "enable_prefix_cache", False, "True -> enable_prefix_cache=False", _radix_cache_disabled
    ),
    "disable_overlap_schedule": _no_effect(False, "steps are not overlapped"),
    "num_continuous_decode_steps": _no_effect(1, "one step per scheduling round"),
    "enable_mixed_chunk": _no_effect(False, "prefill chunks and decodes always share a step"),
    "disable_chunked_prefix_cache": _no_effect(
        False, "cached prefixes and chunked prefill always combine"
    ),
    "enable_priority_scheduling": _no_effect(False, "requests are served oldest first"),
    "enable_memory_saver": _no_effect(
        False, "release/resume_memory_occupation always work (weights and KV really freed)"
    ),
    "enable_weights_cpu_backup": _map(
        "weights_host_copy", False, "True keeps released weights in host memory (CUDA)", _cpu_backup
    ),
    "cpu_offload_gb": _fixed(0, "no weight offloading"),
    "enable_deterministic_inference": _map(
        "deterministic", False, "batch-invariant kernels: bitwise-repeatable outputs"
    ),
    "rl_on_policy_target": _no_effect(None, "PolicyModel shares the engine's kernels instead"),
    "sleep_on_idle": _no_effect(False, "the loop thread blocks when idle already"),
    # ---------------------------------------------------------------- parallelism and devices
    "tp_size": _map("tp_size", 1, ""),
    "dp_size": _fixed(1, "one engine per data-parallel replica (run several: rollout service)"),
    "pp_size": _fixed(1, "no pipeline parallelism"),
    "ep_size": _fixed(1, "no expert parallelism"),
    "enable_dp_attention": _fixed(False, "no data-parallel attention"),
    "nnodes": _fixed(1, _SINGLE),
    "node_rank": _fixed(0, _SINGLE),
    "dist_init_addr": _no_effect(None, "TP ranks rendezvous on a loopback port of their own"),
    "nccl_port": _no_effect(None, "the TP group's port is asked from the OS per engine"),
    "dist_timeout": _no_effect(None, "TP ranks are child processes of the engine"),
    "device": _map("device", None, "None: cuda when available, else cpu"),
    "base_gpu_id": _no_effect(0, "the engine uses the current CUDA device (CUDA_VISIBLE_DEVICES)"),
    "gpu_id_step": _no_effect(1, "the engine uses the current CUDA device"),
    "random_seed": _map("seed", None, "None: 0, so runs repeat"),
    "watchdog_timeout": _no_effect(300, "a stuck step is not killed"),
    "enable_p2p_check": _no_effect(False, _KERNELS),
    "disable_custom_all_reduce": _no_effect(False, "see deterministic_all_reduce"),
    "enable_nccl_nvls": _no_effect(False, _KERNELS),
    "enable_symm_mem": _no_effect(False, _KERNELS),
    # ---------------------------------------------------------------- kernels, graphs
    "attention_backend": _no_effect(None, _KERNELS),
    "prefill_attention_backend": _no_effect(None, _KERNELS),
    "decode_attention_backend": _no_effect(None, _KERNELS),
    "sampling_backend": _no_effect(None, _KERNELS),
    "grammar_backend": _no_effect(None, "no constrained decoding"),
    "mm_attention_backend": _no_effect(None, "text only"),
    "triton_attention_reduce_in_fp32": _no_effect(False, _KERNELS),
    "triton_attention_num_kv_splits": _no_effect(8, _KERNELS),
    "disable_cuda_graph": _no_effect(False, _CUDA_ONLY),
    "disable_cuda_graph_padding": _no_effect(False, _CUDA_ONLY),
    "cuda_graph_max_bs": _no_effect(None, _CUDA_ONLY),
    "cuda_graph_bs": _no_effect(None, _CUDA_ONLY),
    "enable_torch_compile": _no_effect(False, _CUDA_ONLY),
    "torch_compile_max_bs": _no_effect(32, _CUDA_ONLY),
    "enable_return_hidden_states": _map(
        "enable_return_hidden_states", False, "allows generate(return_hidden_states=True)"
    ),
    "enable_custom_logit_processor": _no_effect(False, "generate(custom_logit_processor) raises"),
    "delete_ckpt_after_loading": _no_effect(False, "checkpoints are never deleted"),
    "allow_auto_truncate": _fixed(
        False, "a prompt, or prompt + a given max_new_tokens, reaching the context raises"
    ),
    "enable_lora": _fixed(None, "no LoRA", False),
    "lora_paths": _fixed(None, "no LoRA"),
    "speculative_algorithm": _fixed(None, "no speculative decoding"),
    # ---------------------------------------------------------------- servers, logging
    "host": _no_effect("127.0.0.1", _NO_HTTP),
    "port": _no_effect(30000, _NO_HTTP),
    "api_key": _no_effect(None, _NO_HTTP),
    "skip_server_warmup": _no_effect(False, "no warm-up request is sent"),
    "warmups": _no_effect(None, "no warm-up request is sent"),
    "stream_interval": _no_effect(1, "a chunk per step with new text (as stream_interval=1)"),
    "incremental_streaming_output": _map(
        "incremental_streaming_output", False, "stream chunks hold only what is new"
    ),
    "tokenizer_worker_num": _no_effect(1, "tokenization runs in the caller's thread"),
    "detokenizer_worker_num": _no_effect(1, "detokenization runs on the loop thread"),
    "log_level": _kept("error", "the level of the engine_core loggers (SGLang's Engine: error)"),
    "log_level_http": _no_effect(None, _NO_HTTP),
    "log_requests": _no_effect(False, _OBSERVE),
    "log_requests_level": _no_effect(2, _OBSERVE),
    "enable_metrics": _no_effect(False, _OBSERVE),
    "show_time_cost": _no_effect(False, _OBSERVE),
    "decode_log_interval": _no_effect(40, _OBSERVE),
    "enable_cache_report": _no_effect(False, "meta_info.cached_tokens is always reported"),
    "gc_threshold": _no_effect(None, "Python's GC settings are left alone"),
    "use_ray": _no_effect(False, "Ray lives in the rollout package (EngineActor)"),
    "numa_node": _no_effect(None, "see num_threads"),
}


@dataclass
class Translated:
    """``engine``: EngineConfig kwargs; ``given``: every SGLang name given (as given);
    ``no_effect``: those among them with nothing to do here; ``aliases``: EngineConfig field
    -> the SGLang name that set it (to name the SGLang field in errors)."""

    engine: dict[str, Any] = field(default_factory=dict)
    given: dict[str, Any] = field(default_factory=dict)
    no_effect: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


def translate(model_path: str, kwargs: dict[str, Any], engine_fields: set[str]) -> Translated:
    """Split ``kwargs`` into EngineConfig kwargs and SGLang-only values; raises
    ``InvalidConfigError`` naming an unknown name, an unsupported value or a field set twice."""
    out = Translated()
    for name, value in kwargs.items():
        rule = SGLANG_ARGS.get(name)
        if rule is None:
            if name not in engine_fields:
                known = sorted(engine_fields | set(SGLANG_ARGS))
                raise InvalidConfigError(
                    name,
                    value,
                    f"unknown engine option (neither EngineConfig's nor a supported "
                    f"SGLang ServerArgs name); known: {known}",
                )
            _set(out, name, value, name)
            continue
        out.given[name] = value
        if rule.kind == "map":
            converted = rule.convert(value, kwargs)
            if converted is OMIT:
                if value is not None and value != rule.default:
                    out.no_effect[name] = value
                continue
            _set(out, rule.target, converted, name)
        elif rule.kind == "fixed":
            if not _fixed_ok(name, value, rule, model_path):
                raise InvalidConfigError(
                    name, value, f"not supported here: {rule.note} (accepted: {list(rule.allowed)})"
                )
        elif rule.kind == "no_effect":
            out.no_effect[name] = value
        elif name == "log_level" and not isinstance(logging.getLevelName(str(value).upper()), int):
            raise InvalidConfigError(name, value, "must be a logging level name (e.g. 'error')")
    if "mem_fraction_static" in out.engine and "kv_cache_memory_bytes" in out.engine:
        raise InvalidConfigError(
            "mem_fraction_static",
            out.engine["mem_fraction_static"],
            "give either mem_fraction_static or kv_cache_memory_bytes",
        )
    return out


def _set(out: Translated, target: str, value: Any, name: str) -> None:
    if target in out.engine:
        other = out.aliases.get(target, target)
        raise InvalidConfigError(name, value, f"sets {target} like {other} does; give one of them")
    out.engine[target] = value
    if name != target:
        out.aliases[target] = name


def _fixed_ok(name: str, value: Any, rule: Rule, model_path: str) -> bool:
    if name == "tokenizer_path" and value is not None:
        return os.path.abspath(str(value)) == os.path.abspath(model_path)
    return any(value == ok and type(value) is type(ok) for ok in rule.allowed)


def log_no_effect(no_effect: dict[str, Any]) -> None:
    """One line for the names that do nothing here: a warning for values SGLang would act on,
    info for values equal to SGLang's default."""
    changed = {k: v for k, v in no_effect.items() if v != SGLANG_ARGS[k].default}
    same = sorted(set(no_effect) - set(changed))
    if changed:
        shown = ", ".join(f"{k}={v!r} ({SGLANG_ARGS[k].note})" for k, v in changed.items())
        log.warning("SGLang options with no effect on this engine: %s", shown)
    if same:
        log.info("SGLang options accepted at their defaults (no effect here): %s", same)


def server_args_view(config: Any, given: dict[str, Any]) -> dict[str, Any]:
    """SGLang's flat ``ServerArgs`` keys for ``get_server_info``: mapped names report the value
    in effect here, the others what was given (else SGLang's default)."""
    view: dict[str, Any] = {
        name: given.get(name, rule.default) for name, rule in SGLANG_ARGS.items()
    }
    for name, rule in SGLANG_ARGS.items():
        if rule.kind == "map":
            view[name] = getattr(config, rule.target)
    view["chunked_prefill_size"] = config.max_num_batched_tokens
    view["random_seed"] = config.seed
    view["enable_deterministic_inference"] = config.deterministic
    host_copy = config.weights_host_copy
    view["enable_weights_cpu_backup"] = config.device == "cuda" if host_copy is None else host_copy
    view["disable_radix_cache"] = not config.enable_prefix_cache
    view["model_path"] = config.model_path
    view["tokenizer_path"] = None if config.skip_tokenizer_init else config.model_path
    return view
