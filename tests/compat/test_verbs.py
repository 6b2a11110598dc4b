"""SGLang's engine verbs (python/sglang/srt/entrypoints/engine.py): ``flush_cache`` succeeds only
when idle, ``get_model_info`` / ``get_server_info`` keys, ``get_weights_by_name``'s shape,
``update_weights_from_disk``'s keywords, and release / resume tag edge cases."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors.torch import load_file

from engine_core import Engine, MemoryStateError, ModelLoadError

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
# As long as the 256-token context allows (prompt + max_new_tokens must stay below it).
LONG = {"temperature": 0, "max_new_tokens": 240, "ignore_eos": True}
IDS = [5, 17, 29, 41, 53]
SGLANG_MODEL_INFO = (
    "model_path",
    "served_model_name",
    "is_generation",
    "weight_version",
    "load_format",
    "reasoning_parser",
    "tool_call_parser",
)


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(tiny_model, device="cpu", max_total_tokens=1024, random_seed=5) as eng:
        yield eng


def _wait_running(engine: Engine, n: int = 1) -> None:
    deadline = time.monotonic() + 30
    while len(engine.scheduler.running) < n:
        assert time.monotonic() < deadline, "request never started"
        time.sleep(0.001)


def test_flush_cache_when_idle_succeeds(engine):
    result = engine.flush_cache()
    assert result.success is True and result.message == ""
    assert result["success"] is True


def test_flush_cache_with_requests_in_flight_fails_then_succeeds(engine, caplog):
    caplog.set_level(logging.WARNING, logger="engine_core")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(engine.generate, input_ids=IDS, sampling_params=LONG)
        _wait_running(engine)
        busy = engine.flush_cache()
        engine.abort_request(abort_all=True)
        out = future.result(timeout=60)
    assert busy.success is False and "pending requests" in busy.message
    assert "#running-req: 1" in busy.message
    assert any("Cache not flushed" in r.getMessage() for r in caplog.records)
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert engine.flush_cache().success is True


def test_get_model_info_has_sglang_s_keys(engine, tiny_model):
    info = engine.get_model_info()
    assert set(SGLANG_MODEL_INFO) <= set(info)
    assert info["model_path"] == info["served_model_name"] == tiny_model
    assert info["is_generation"] is True and info["weight_version"] == engine.weight_version
    assert info["architectures"] == ["LlamaForCausalLM"] and info["model_type"] == "llama"


def test_get_model_info_follows_a_disk_refit(tiny_model, tiny_model_v2):
    with Engine(tiny_model, device="cpu", max_total_tokens=256, served_model_name="policy") as e:
        assert e.get_model_info()["served_model_name"] == "policy"
        e.update_weights_from_disk(tiny_model_v2, load_format="safetensors", weight_version="v2")
        info = e.get_model_info()
        assert (info["model_path"], info["load_format"], info["weight_version"]) == (
            tiny_model_v2,
            "safetensors",
            "v2",
        )
        assert e.get_server_info()["model_path"] == tiny_model_v2


def test_get_server_info_has_sglang_s_flat_keys_and_ours(engine, tiny_model):
    info = engine.get_server_info()
    cfg = engine.config
    assert info["model_path"] == tiny_model and info["tp_size"] == 1
    assert info["random_seed"] == 5 and info["page_size"] == cfg.page_size
    assert info["chunked_prefill_size"] == cfg.max_num_batched_tokens
    assert info["max_running_requests"] == cfg.max_running_requests
    assert info["max_total_tokens"] == 1024 and info["max_total_num_tokens"] == 1024
    assert info["max_req_input_len"] == min(engine.context_length, 1024) - 1
    assert info["disable_radix_cache"] is False  # the radix prefix cache is on by default
    assert info["enable_deterministic_inference"] is False and info["dtype"] == "auto"
    assert isinstance(info["internal_states"], list) and info["version"]
    assert info["weight_version"] == engine.weight_version
    for key in ("config", "model", "memory", "num_free_pages", "num_retractions", "paused"):
        assert key in info  # our own keys stay


def test_get_weights_by_name_returns_sglang_s_shape(engine, tiny_model):
    """SGLang: ``param.cpu().float().numpy().tolist()[:truncate_size]``: rows of dim 0."""
    ref = load_file(os.path.join(tiny_model, "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    got = engine.get_weights_by_name(name, truncate_size=3)
    assert len(got) == 3 and all(len(row) == ref[name].shape[1] for row in got)
    assert got == ref[name][:3].tolist()
    assert engine.get_weights_by_name(name) == ref[name][:100].tolist()  # default 100 rows
    norm = engine.get_weights_by_name("model.norm.weight", truncate_size=5)
    assert norm == ref["model.norm.weight"][:5].tolist() and isinstance(norm[0], float)
    rows = ref[name].shape[0]
    assert len(engine.get_weights_by_name(name, truncate_size=rows + 10)) == rows


NORM = "model.norm.weight"


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda e: e.get_weights_by_name(5), ModelLoadError, "weight name 5 is of type int"),
        (lambda e: e.get_weights_by_name(None), ModelLoadError, "weight name None"),
        (lambda e: e.get_weights_by_name(NORM, "2"), ValueError, "truncate_size='2'"),
        (lambda e: e.get_weights_by_name(NORM, -1), ValueError, "truncate_size=-1"),
        (lambda e: e.get_weights_checksum([5]), ModelLoadError, "got \\[5\\]"),
        (lambda e: e.get_weights_checksum("model.norm.weight"), ModelLoadError, "got 'model.norm"),
    ],
)
def test_weight_names_and_sizes_of_the_wrong_type_are_named(engine, call, error, message):
    with pytest.raises(error, match=message):
        call(engine)
    import torch

    ok, text = engine.update_weights_from_tensor({5: torch.zeros(4)})
    assert not ok and "weight name 5 is of type int" in text
    assert engine.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"]


def test_update_weights_from_disk_takes_sglang_s_keywords(tiny_model, tiny_model_v2):
    with Engine(tiny_model_v2, device="cpu", max_total_tokens=256) as fresh:
        want = fresh.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"]
    with Engine(tiny_model, device="cpu", max_total_tokens=256) as e:
        before = e.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"]
        ok, message, paused = e.update_weights_from_disk(tiny_model_v2, "pt")
        assert not ok and message.startswith("ModelLoadError: load_format='pt'") and paused == 0
        ok, message, _ = e.update_weights_from_disk(tiny_model_v2, manifest={"a": 1})
        assert not ok and "manifest" in message
        assert e.weight_version == "default"
        assert e.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"] == before
        result = e.update_weights_from_disk(
            tiny_model_v2,
            "auto",  # SGLang's second positional: load_format
            flush_cache=True,
            abort_all_requests=False,
            is_async=False,
            torch_empty_cache=True,
            keep_pause=False,
            recapture_cuda_graph=True,
            token_step=3,
        )
        assert result[0] is True
        assert e.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"] == want


def test_update_weights_from_disk_abort_all_requests(tiny_model, tiny_model_v2):
    with Engine(tiny_model, device="cpu", max_total_tokens=1024) as e:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(e.generate, input_ids=IDS, sampling_params=LONG)
            _wait_running(e)
            e.update_weights_from_disk(tiny_model_v2, abort_all_requests=True)
            out = future.result(timeout=60)
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert len(out["output_ids"]) < LONG["max_new_tokens"]


def test_release_and_resume_tag_edge_cases(tiny_model):
    with Engine(tiny_model, device="cpu", max_total_tokens=256) as e:
        with pytest.raises(MemoryStateError, match="not released"):
            e.resume_memory_occupation()  # nothing released
        with pytest.raises(MemoryStateError, match="not released"):
            e.resume_memory_occupation(["kv_cache"])
        # SGLang's cuda_graph tag: accepted, nothing behind it, pairs up like the others.
        assert e.release_memory_occupation(["cuda_graph"])["released"] == []
        with pytest.raises(MemoryStateError, match="already released"):
            e.release_memory_occupation("cuda_graph")
        e.resume_memory_occupation(["cuda_graph"])
        with pytest.raises(MemoryStateError, match="not released"):
            e.resume_memory_occupation(["cuda_graph"])
        # A double release raises and changes nothing.
        e.release_memory_occupation(["kv_cache"])
        with pytest.raises(MemoryStateError, match="already released"):
            e.release_memory_occupation(["kv_cache"])
        assert e.get_server_info()["memory"]["released"] == ["kv_cache"]
        # None means every tag: once everything is released, None raises too.
        e.release_memory_occupation(["weights", "cuda_graph"])
        with pytest.raises(MemoryStateError, match="already released"):
            e.release_memory_occupation()
        with pytest.raises(MemoryStateError, match="cuda_graph"):
            e.release_memory_occupation(["cuda_graph", "weights"])
        # Resuming a released and an unreleased tag together raises before resuming either.
        e.resume_memory_occupation(["kv_cache"])
        with pytest.raises(MemoryStateError, match="kv_cache"):
            e.resume_memory_occupation(["weights", "kv_cache"])
        assert e.get_server_info()["memory"]["released"] == ["weights"]
        e.resume_memory_occupation()  # None: whatever is released (weights, cuda_graph)
        assert e.get_server_info()["memory"]["released"] == []
        assert len(e.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"]) == 8


def test_a_caller_s_release_after_an_idle_sleep_is_not_a_double_release(tiny_model):
    with Engine(tiny_model, device="cpu", max_total_tokens=256, sleep_on_idle_s=0.2) as e:
        e.generate(input_ids=IDS, sampling_params=GREEDY)
        deadline = time.monotonic() + 10
        while not e.get_server_info()["memory"]["asleep_on_idle"]:
            assert time.monotonic() < deadline, "never fell asleep"
            time.sleep(0.02)
        e.release_memory_occupation(["kv_cache"])  # the idle release becomes the caller's
        with pytest.raises(MemoryStateError):
            e.release_memory_occupation(["kv_cache"])
        e.resume_memory_occupation(["kv_cache"])
        assert len(e.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"]) == 8


def test_update_weight_version_relabels_and_stays_restorable(tiny_model):
    with Engine(tiny_model, device="cpu", max_total_tokens=1024) as eng:
        before = eng.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"]
        result = eng.update_weight_version("relabelled")
        assert result["success"] and result["new_version"] == "relabelled"
        assert eng.weight_version == eng.get_model_info()["weight_version"] == "relabelled"
        out = eng.generate(input_ids=IDS, sampling_params=GREEDY)
        assert out["output_ids"] == before  # same weights, new label
        assert set(out["meta_info"]["weight_versions"]) == {"relabelled"}
        # the checkpoint still equals the weights: released weights restore from it
        eng.release_memory_occupation(["weights"])
        eng.resume_memory_occupation(["weights"])
        assert eng.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"] == before
        with pytest.raises(ValueError, match="new_version=''"):
            eng.update_weight_version("")
