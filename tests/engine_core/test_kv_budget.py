"""The default KV budget (no max_total_tokens / mem_fraction_static / kv_cache_memory_bytes):
a capped share of the memory available at start-up, honoured by the cache; peak RSS per engine
in get_server_info."""

from __future__ import annotations

import pytest

from engine_core import Engine, kv_budget
from engine_core.errors import InvalidConfigError
from engine_core.execution.kv_cache import kv_bytes_per_page

MiB = 1 << 20


def _per_token(mc) -> int:
    return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 4  # fp32


def _engine(tiny_model, monkeypatch, available: int, **kwargs) -> Engine:
    monkeypatch.setattr(kv_budget, "available_memory_bytes", lambda device: available)
    return Engine(tiny_model, device="cpu", skip_tokenizer_init=True, **kwargs)


def _check_honoured(engine: Engine, budget: int) -> None:
    assert engine.config.kv_cache_memory_bytes == budget
    mc = engine.model_config
    per_page = kv_bytes_per_page(
        mc, mc.num_kv_heads, engine.config.page_size, engine.runner.kv.dtype
    )
    assert engine.pool.num_pages == budget // per_page
    assert engine.runner.kv.nbytes() <= budget


def _weights_bytes(tiny_model) -> int:
    """fp32 weights, twice where the CPU matmul keeps a packed copy (layers.packed_linear)."""
    from kernels import cpu_linear

    return kv_budget.checkpoint_numel(tiny_model) * 4 * (2 if cpu_linear.available() else 1)


def test_share_of_available_memory_minus_weights(tiny_model, monkeypatch):
    weights = _weights_bytes(tiny_model)
    available = 4 * (200 * MiB) + 4 * weights  # the share, 200 MiB, is below both caps
    kwargs = dict(max_running_requests=4096, context_length=2048)
    with _engine(tiny_model, monkeypatch, available, **kwargs) as engine:
        assert 200 * MiB < 4096 * 2048 * _per_token(engine.model_config)
        _check_honoured(engine, int(kv_budget.DEFAULT_KV_FRACTION * available) - weights)


def test_capped_per_engine_on_a_large_host(tiny_model, monkeypatch):
    kwargs = dict(max_running_requests=8192, context_length=2048)  # would use 8 GiB
    with _engine(tiny_model, monkeypatch, 1 << 40, **kwargs) as engine:
        assert 8192 * 2048 * _per_token(engine.model_config) > kv_budget.DEFAULT_KV_CAP_BYTES
        _check_honoured(engine, kv_budget.DEFAULT_KV_CAP_BYTES)


def test_never_more_than_the_running_requests_can_use(tiny_model, monkeypatch):
    kwargs = dict(max_running_requests=1024, context_length=256)
    with _engine(tiny_model, monkeypatch, 1 << 40, **kwargs) as engine:
        useful = 1024 * 256 * _per_token(engine.model_config)
        assert kv_budget.DEFAULT_KV_FLOOR_BYTES < useful < kv_budget.DEFAULT_KV_CAP_BYTES
        _check_honoured(engine, useful)


def test_floor_on_a_small_host(tiny_model, monkeypatch):
    with _engine(tiny_model, monkeypatch, 1 * MiB) as engine:
        _check_honoured(engine, kv_budget.DEFAULT_KV_FLOOR_BYTES)


def test_an_explicit_budget_is_kept(tiny_model, monkeypatch):
    with _engine(tiny_model, monkeypatch, 1 << 40, kv_cache_memory_bytes=3 * MiB) as engine:
        _check_honoured(engine, 3 * MiB)


def test_bad_explicit_budget_names_the_field():
    with pytest.raises(InvalidConfigError, match="kv_cache_memory_bytes"):
        Engine("/nonexistent", device="cpu", kv_cache_memory_bytes=0)


def test_peak_rss_is_reported_and_covers_the_kv_cache(tiny_model, monkeypatch):
    kv = 96 * MiB
    with _engine(tiny_model, monkeypatch, 1 << 40, kv_cache_memory_bytes=kv) as engine:
        engine.generate(input_ids=[[5, 6, 7]], sampling_params={"max_new_tokens": 2})
        info = engine.get_server_info()
    assert len(info["rank_peak_rss_bytes"]) == 1
    # torch.zeros touches every page of the cache, so the high-water mark includes it
    assert info["peak_rss_bytes"] >= info["rank_peak_rss_bytes"][0] >= kv


@pytest.mark.slow
def test_peak_rss_per_rank_with_tp(tiny_model, monkeypatch):
    kv = 64 * MiB  # per rank
    with _engine(tiny_model, monkeypatch, 1 << 40, tp_size=2, kv_cache_memory_bytes=kv) as e:
        info = e.get_server_info()
    ranks = info["rank_peak_rss_bytes"]
    assert len(ranks) == 2 and all(r >= kv for r in ranks)
    assert info["peak_rss_bytes"] >= sum(ranks)


@pytest.mark.parametrize(
    ("field", "value"),
    [("page_size", 10**9), ("max_total_tokens", 10**15), ("kv_cache_memory_bytes", 10**16)],
)
def test_a_kv_size_beyond_the_memory_is_refused_by_name(tiny_model, monkeypatch, field, value):
    """Refused before the allocator is asked for it (it raised an untyped RuntimeError)."""
    with pytest.raises(InvalidConfigError, match=f"{field}={value}.*available RAM") as info:
        _engine(tiny_model, monkeypatch, 1 << 30, **{field: value})
    assert info.value.field == field


def test_a_kv_size_that_fits_is_accepted(tiny_model, monkeypatch):
    with _engine(tiny_model, monkeypatch, 1 << 30, max_total_tokens=4096) as engine:
        assert engine.pool.num_pages * engine.config.page_size >= 4096
