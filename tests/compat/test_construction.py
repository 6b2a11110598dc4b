"""``Engine(**kwargs)`` takes SGLang's ``ServerArgs`` names (python/sglang/srt/server_args.py):
each accepted name at SGLang's default, the mapped ones landing on EngineConfig, values this
engine cannot honour and unknown names rejected naming them, no-effect names logged once, and
``mem_fraction_static`` sizing the KV cache from the available memory minus the weights."""

from __future__ import annotations

import logging
import os
import re

import pytest
from safetensors.torch import load_file

from engine_core import Engine, EngineConfig, InvalidConfigError, kv_budget
from engine_core import sglang_args as sa
from engine_core.execution.kv_cache import kv_bytes_per_page
from engine_core.model_config import load_model_config
from engine_core.requests.generate_request import NO_EFFECT, UNSUPPORTED

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def config(**kwargs) -> EngineConfig:
    return EngineConfig.from_kwargs("/models/m", **{"device": "cpu", **kwargs})


@pytest.mark.parametrize("name", sorted(sa.SGLANG_ARGS))
def test_every_accepted_name_at_sglang_default(name):
    rule = sa.SGLANG_ARGS[name]
    cfg = config(**{name: rule.default})
    if rule.kind == "map" and rule.default is not None:
        assert cfg == config(), name  # SGLang's default is this engine's default


def test_a_trainer_s_sglang_kwargs_build_an_engine(tiny_model):
    """A typical RL trainer's ``sgl.Engine(...)`` call, unchanged."""
    kwargs = dict(
        model_path=tiny_model,
        dtype="float",
        random_seed=7,
        tp_size=1,
        mem_fraction_static=None,
        max_total_tokens=512,
        max_running_requests=8,
        chunked_prefill_size=128,
        page_size=16,
        context_length=64,
        enable_deterministic_inference=True,
        disable_radix_cache=True,
        skip_tokenizer_init=False,
        trust_remote_code=True,
        load_format="auto",
        log_level="error",
        enable_memory_saver=True,
        sleep_on_idle=True,
        base_gpu_id=0,
        port=30011,
        nccl_port=30012,
        weight_version="step-0",
        device="cpu",
    )
    with Engine(**kwargs) as engine:
        cfg = engine.config
        assert (cfg.seed, cfg.dtype, cfg.deterministic) == (7, "float32", True)
        assert (cfg.max_total_tokens, cfg.max_running_requests, cfg.page_size) == (512, 8, 16)
        assert (cfg.max_num_batched_tokens, cfg.context_length) == (128, 64)
        assert engine.weight_version == "step-0"
        out = engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 3})
        assert len(out["output_ids"]) == 3
    logging.getLogger("engine_core").setLevel(logging.NOTSET)


@pytest.mark.parametrize(
    "kwargs, field, value",
    [
        ({"random_seed": 7}, "seed", 7),
        ({"random_seed": None}, "seed", 0),
        ({"enable_deterministic_inference": True}, "deterministic", True),
        ({"chunked_prefill_size": 512}, "max_num_batched_tokens", 512),
        ({"chunked_prefill_size": -1}, "max_num_batched_tokens", 16384),
        ({"chunked_prefill_size": -1, "max_prefill_tokens": 4096}, "max_num_batched_tokens", 4096),
        ({"chunked_prefill_size": None}, "max_num_batched_tokens", 2048),
        ({"dtype": "half"}, "dtype", "float16"),
        ({"dtype": "float"}, "dtype", "float32"),
        ({"dtype": "bfloat16"}, "dtype", "bfloat16"),
        ({"page_size": None}, "page_size", 16),
        ({"page_size": 32}, "page_size", 32),
        ({"max_running_requests": None}, "max_running_requests", 64),
        ({"max_total_tokens": 1024}, "max_total_tokens", 1024),
        ({"context_length": 128}, "context_length", 128),
        ({"skip_tokenizer_init": True}, "skip_tokenizer_init", True),
        ({"tp_size": 2}, "tp_size", 2),
        ({"mem_fraction_static": 0.4}, "mem_fraction_static", 0.4),
        ({"weight_version": "v1"}, "weight_version", "v1"),
        ({"enable_weights_cpu_backup": True}, "weights_host_copy", None),  # CPU: frees nothing
        ({"enable_weights_cpu_backup": False}, "weights_host_copy", None),
        ({"device": None}, "device", EngineConfig("/m").device),
    ],
)
def test_mapped_names_set_engine_config(kwargs, field, value):
    args = {"device": "cpu", **kwargs} if "device" not in kwargs else kwargs
    assert getattr(EngineConfig.from_kwargs("/models/m", **args), field) == value


def test_engine_config_names_keep_working():
    cfg = config(
        seed=3, deterministic=True, max_num_batched_tokens=64, kv_cache_memory_bytes=1 << 20
    )
    assert (cfg.seed, cfg.deterministic, cfg.max_num_batched_tokens) == (3, True, 64)


def test_unknown_name_is_rejected_naming_it(tiny_model):
    with pytest.raises(InvalidConfigError, match="enable_warp_drive") as info:
        Engine(tiny_model, device="cpu", enable_warp_drive=True)
    assert info.value.field == "enable_warp_drive"
    assert "unknown engine option" in str(info.value)


@pytest.mark.parametrize(
    "name, value",
    [
        ("dp_size", 2),
        ("pp_size", 2),
        ("nnodes", 2),
        ("load_format", "pt"),
        ("load_format", "dummy"),
        ("quantization", "fp8"),
        ("kv_cache_dtype", "fp8_e5m2"),
        ("is_embedding", True),
        ("enable_lora", True),
        ("speculative_algorithm", "EAGLE"),
        ("allow_auto_truncate", True),
        ("tokenizer_path", "/elsewhere/tokenizer"),
        ("dtype", "int8"),
        ("mem_fraction_static", 1.5),
        ("mem_fraction_static", 0),
        ("log_level", "loud"),
    ],
)
def test_values_this_engine_cannot_honour_are_rejected(name, value):
    with pytest.raises(InvalidConfigError, match=re.escape(name)):
        config(**{name: value})


@pytest.mark.parametrize(
    "name", ["deterministic", "skip_tokenizer_init", "enable_prefix_cache", "disable_radix_cache"]
)
@pytest.mark.parametrize("value", ["false", "no", 0, 1])
def test_a_bool_option_takes_only_a_bool(name, value):
    """A string such as "false" is truthy: taken as given it would mean the opposite."""
    with pytest.raises(InvalidConfigError, match=f"{name}={value!r}: must be a bool"):
        config(**{name: value})


@pytest.mark.parametrize("threads", [1025, 10**6, 2**32])
def test_thread_count_is_bounded(threads):
    with pytest.raises(InvalidConfigError, match=f"num_threads={threads}"):
        config(num_threads=threads)


def test_cuda_without_cuda_is_refused_at_start(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this check is for a process without CUDA")
    config(device="cuda")  # a driver may describe an engine for another machine
    with pytest.raises(InvalidConfigError, match="device='cuda'.*not available"):
        Engine(tiny_model, device="cuda")


def test_tokenizer_path_equal_to_model_path_is_accepted():
    assert config(tokenizer_path="/models/m").model_path == "/models/m"


def test_a_field_given_twice_is_rejected():
    with pytest.raises(InvalidConfigError, match="random_seed.*seed"):
        config(seed=1, random_seed=2)
    with pytest.raises(InvalidConfigError, match="chunked_prefill_size"):
        config(max_num_batched_tokens=64, chunked_prefill_size=128)
    with pytest.raises(InvalidConfigError, match="mem_fraction_static"):
        config(mem_fraction_static=0.5, kv_cache_memory_bytes=1 << 20)


def test_a_bad_value_names_the_sglang_field():
    with pytest.raises(InvalidConfigError, match=r"random_seed \(-> seed\)"):
        config(random_seed="seven")
    with pytest.raises(InvalidConfigError, match=r"chunked_prefill_size \(-> max_num_batched"):
        config(chunked_prefill_size=0)


def test_model_path_as_keyword(tiny_model):
    with Engine(model_path=tiny_model, device="cpu", max_total_tokens=256) as engine:
        assert engine.config.model_path == tiny_model


def test_no_effect_names_are_logged_once_naming_them(tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="engine_core")
    kwargs = dict(device="cpu", max_total_tokens=256)
    with Engine(
        tiny_model, disable_cuda_graph=True, port=30001, disable_overlap_schedule=False, **kwargs
    ):
        pass
    records = [r for r in caplog.records if r.name == "engine_core.sglang_args"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(warnings) == 1 and len(infos) == 1
    assert "disable_cuda_graph=True" in warnings[0] and "port=30001" in warnings[0]
    assert "disable_overlap_schedule" in infos[0] and "disable_overlap_schedule" not in warnings[0]


def test_log_level_sets_the_engine_loggers(tiny_model):
    try:
        with Engine(tiny_model, device="cpu", max_total_tokens=256, log_level="warning"):
            assert logging.getLogger("engine_core").level == logging.WARNING
    finally:
        logging.getLogger("engine_core").setLevel(logging.NOTSET)


def _weights_bytes(path: str) -> int:
    tensors = load_file(os.path.join(path, "model.safetensors"))
    return sum(t.numel() for t in tensors.values()) * 4  # float32 on CPU


def test_mem_fraction_static_sizes_the_kv_cache_from_available_memory(tiny_model, monkeypatch):
    """KV bytes = fraction x MemAvailable - weights (SGLang: fraction of the device memory for
    weights and KV), here with MemAvailable pinned so the test does not allocate the host."""
    weights = _weights_bytes(tiny_model)
    available = 4 * weights + (8 << 20)
    monkeypatch.setattr(kv_budget, "available_memory_bytes", lambda device: available)
    with Engine(tiny_model, device="cpu", mem_fraction_static=0.5) as engine:
        kv = int(0.5 * available - weights)
        assert engine.config.kv_cache_memory_bytes == kv
        mc = load_model_config(tiny_model)
        per_page = kv_bytes_per_page(mc, mc.num_kv_heads, 16, engine.runner.kv.dtype)
        assert engine.pool.num_pages == kv // per_page
        info = engine.get_server_info()
        assert info["mem_fraction_static"] == 0.5
        assert info["max_total_num_tokens"] == (kv // per_page) * 16


def test_mem_fraction_static_yields_to_max_total_tokens(tiny_model, monkeypatch):
    monkeypatch.setattr(kv_budget, "available_memory_bytes", lambda device: 1 << 40)
    with Engine(tiny_model, device="cpu", mem_fraction_static=0.9, max_total_tokens=64) as engine:
        assert engine.pool.capacity_tokens == 64


def test_mem_fraction_static_too_small_for_the_weights_is_rejected(tiny_model, monkeypatch):
    weights = _weights_bytes(tiny_model)
    monkeypatch.setattr(kv_budget, "available_memory_bytes", lambda device: weights)
    with pytest.raises(InvalidConfigError, match="mem_fraction_static.*weights"):
        Engine(tiny_model, device="cpu", mem_fraction_static=0.5)


def test_available_memory_on_cpu_is_mem_available():
    with open("/proc/meminfo") as f:
        line = next(line for line in f if line.startswith("MemAvailable:"))
    expected = int(line.split()[1]) * 1024
    assert kv_budget.available_memory_bytes("cpu") == pytest.approx(expected, rel=0.1)


def test_checkpoint_numel_reads_the_headers(tiny_model):
    assert kv_budget.checkpoint_numel(tiny_model) * 4 == _weights_bytes(tiny_model)


def test_service_config_takes_sglang_names(tiny_model):
    from rollout.config import ServiceConfig

    cfg = ServiceConfig.from_dict(
        {"model_path": tiny_model, "engine": {"random_seed": 3, "disable_radix_cache": True}}
    )
    assert cfg.engine["random_seed"] == 3


def test_readme_lists_every_accepted_name():
    with open(README) as f:
        text = f.read()
    section = text.split("## Migrating from SGLang", 1)[1].split("\n## ", 1)[0]
    names = [*sa.SGLANG_ARGS, *UNSUPPORTED, *NO_EFFECT]
    missing = [name for name in names if f"`{name}`" not in section]
    assert not missing, missing
