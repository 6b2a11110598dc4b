"""release_memory_occupation / resume_memory_occupation and sleep-on-idle on tiny models:
memory really leaves the process (tree), generating while released raises (or waits), requests
in flight survive a KV release, and the weights come back from the right place."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors.torch import load_file

from engine_core import Engine, EngineReleasedError, InvalidConfigError
from engine_core.control.rank_memory import process_tree_rss
from weight_sync import list_segments

GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
PROMPTS = [[5, 17, 33, 2], [9, 8, 7, 6, 5], [100, 3]]
KV = 256 << 20  # large enough that its release dwarfs allocator noise


@pytest.fixture(scope="module")
def old(model_dir):
    return model_dir("llama")


@pytest.fixture(scope="module")
def new(model_dir):
    return model_dir("llama", seed=1)


def run(engine: Engine) -> list[list[int]]:
    return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


@pytest.fixture(scope="module")
def expected(old, new):
    outputs = {}
    for name, path in (("old", old), ("new", new)):
        with Engine(path, device="cpu", refit_errors="raise", max_total_tokens=1024) as engine:
            outputs[name] = run(engine)
    assert outputs["old"] != outputs["new"]
    return outputs


def test_release_frees_memory_blocks_generation_and_resume_restores(old, expected):
    with Engine(old, device="cpu", refit_errors="raise", kv_cache_memory_bytes=KV) as engine:
        assert run(engine) == expected["old"]
        loaded = process_tree_rss()
        result = engine.release_memory_occupation()
        released = process_tree_rss()
        assert result["freed_bytes"]["kv_cache"] >= KV - (1 << 20)
        assert loaded - released >= 0.9 * KV, (loaded, released)
        assert engine.get_server_info()["memory"]["released"] == ["kv_cache", "weights"]
        with pytest.raises(EngineReleasedError, match="resume_memory_occupation"):
            engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
        assert engine.resume_memory_occupation()["weights_source"] == "checkpoint"
        assert process_tree_rss() - released >= 0.9 * KV
        assert run(engine) == expected["old"]


def test_kv_release_retracts_requests_in_flight_and_they_continue(old, expected):
    params = dict(GREEDY, max_new_tokens=200)
    with Engine(old, device="cpu", refit_errors="raise", max_total_tokens=1024) as engine:
        full = engine.generate(input_ids=PROMPTS, sampling_params=params)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(engine.generate, input_ids=PROMPTS, sampling_params=params)
            while len(engine.scheduler.running) < len(PROMPTS):
                time.sleep(0.001)
            engine.release_memory_occupation(["kv_cache"])
            waiting = engine.loop.call(
                lambda: [len(r.output_ids) for r in engine.scheduler.waiting]
            )
            assert len(waiting) == len(PROMPTS) and not engine.scheduler.running
            time.sleep(0.2)
            assert not future.done()
            engine.resume_memory_occupation(["kv_cache"])
            outs = future.result(timeout=60)
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in full]
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)


def test_wait_policy_queues_until_resume(old, expected):
    with Engine(
        old,
        device="cpu",
        refit_errors="raise",
        max_total_tokens=1024,
        generate_while_released="wait",
    ) as e:
        e.release_memory_occupation("kv_cache")
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(run, e)
            time.sleep(0.3)
            assert not future.done()
            e.resume_memory_occupation()
            assert future.result(timeout=60) == expected["old"]


def test_resume_restores_the_last_disk_refit(old, new, expected):
    with Engine(old, device="cpu", refit_errors="raise", max_total_tokens=1024) as engine:
        engine.update_weights_from_disk(new, weight_version="v2")
        engine.release_memory_occupation(["weights"])
        with pytest.raises(EngineReleasedError, match="before a refit"):
            engine.update_weights_from_disk(old, weight_version="v3")
        assert engine.weight_version == "v2"
        engine.resume_memory_occupation(["weights"])
        assert run(engine) == expected["new"]
        engine.update_weights_from_disk(old, weight_version="v3")  # refits still work
        assert run(engine) == expected["old"]


def test_after_a_tensor_refit_weights_resume_empty_until_a_full_refit(old, new, expected):
    tensors = load_file(os.path.join(new, "model.safetensors"))
    with Engine(old, device="cpu", refit_errors="raise", max_total_tokens=1024) as engine:
        engine.update_weights_from_tensor(list(tensors.items()), weight_version="t1")
        assert run(engine) == expected["new"]
        engine.release_memory_occupation(["weights"])
        with pytest.raises(ValueError, match="tensor/distributed refit"):
            engine.resume_memory_occupation(weights="checkpoint")
        assert engine.resume_memory_occupation()["weights_source"] == "empty"
        with pytest.raises(EngineReleasedError, match="refit first"):
            engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
        # A partial refit leaves NaN sentinels elsewhere: still refused, never garbage.
        one = [("model.norm.weight", tensors["model.norm.weight"])]
        engine.update_weights_from_tensor(one, weight_version="t2")
        with pytest.raises(EngineReleasedError, match="refit first"):
            engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
        engine.update_weights_from_tensor(list(tensors.items()), weight_version="t3")
        assert run(engine) == expected["new"]
        assert engine.get_server_info()["memory"]["awaiting_refit"] is False


def test_sleep_on_idle_releases_and_wakes_transparently(old, new, expected):
    kwargs = dict(device="cpu", kv_cache_memory_bytes=KV, sleep_on_idle_weights=True)
    with Engine(old, sleep_on_idle_s=0.5, **kwargs) as engine:
        assert run(engine) == expected["old"]
        awake = process_tree_rss()
        deadline = time.monotonic() + 10
        while not engine.get_server_info()["memory"]["asleep_on_idle"]:
            assert time.monotonic() < deadline, "never fell asleep"
            time.sleep(0.05)
        memory = engine.get_server_info()["memory"]
        assert memory["released"] == ["kv_cache", "weights"] and memory["num_idle_sleeps"] == 1
        assert awake - process_tree_rss() >= 0.9 * KV
        assert run(engine) == expected["old"]  # wakes on the request
        memory = engine.get_server_info()["memory"]
        assert memory["num_wakes"] == 1 and 0 < memory["last_wake_latency_s"] < 10
        while not engine.get_server_info()["memory"]["asleep_on_idle"]:
            time.sleep(0.05)
        # A refit wakes sleeping weights first; the next wake keeps the new weights.
        engine.update_weights_from_disk(new, weight_version="v2")
        assert run(engine) == expected["new"]


def test_tp2_release_frees_memory_on_every_rank(old, expected):
    with Engine(
        old, device="cpu", refit_errors="raise", tp_size=2, kv_cache_memory_bytes=KV
    ) as engine:
        assert run(engine) == expected["old"]
        loaded = process_tree_rss()
        engine.release_memory_occupation()
        released = process_tree_rss()
        # Each rank holds KV bytes of its own: both must have let go.
        assert loaded - released >= 0.9 * 2 * KV, (loaded, released)
        engine.resume_memory_occupation()
        assert process_tree_rss() - released >= 0.9 * 2 * KV
        assert run(engine) == expected["old"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sleep_on_idle_s": 0}, "sleep_on_idle_s"),
        ({"sleep_on_idle_s": "5"}, "sleep_on_idle_s"),
        ({"weights_host_copy": True}, "weights_host_copy"),
        ({"sleep_on_idle_weights": 1}, "sleep_on_idle_weights"),
        ({"generate_while_released": "block"}, "generate_while_released"),
    ],
)
def test_config_validation(old, kwargs, field):
    with pytest.raises(InvalidConfigError, match=field):
        Engine(old, device="cpu", refit_errors="raise", **kwargs)


def test_unknown_tag_and_source_are_rejected(old):
    with Engine(old, device="cpu", refit_errors="raise", max_total_tokens=256) as engine:
        with pytest.raises(ValueError, match="unknown memory tags"):
            engine.release_memory_occupation(["kv"])
        engine.release_memory_occupation(["weights"])
        with pytest.raises(ValueError, match="no host copy"):
            engine.resume_memory_occupation(weights="host")
        with pytest.raises(ValueError, match="weights="):
            engine.resume_memory_occupation(weights="disk")
        engine.resume_memory_occupation()
        assert engine.get_server_info()["memory"]["released"] == []
        for tags in (5, [["weights"]], b"weights", {"weights": 1}):
            with pytest.raises(ValueError, match="invalid tags="):
                engine.release_memory_occupation(tags)
        # A bad source is refused before anything changes: the retry resumes both tags.
        engine.release_memory_occupation(["cuda_graph", "weights"])
        with pytest.raises(ValueError, match="weights='bogus'"):
            engine.resume_memory_occupation(["cuda_graph", "weights"], weights="bogus")
        engine.resume_memory_occupation(["cuda_graph", "weights"])
        assert engine.get_server_info()["memory"]["released"] == []


def test_idle_sleep_also_unlinks_the_tp_refit_segments(old, new, expected):
    """A TP tensor refit keeps its shared segments for the next refit; sleeping weights free
    them too (and the next refit makes them again)."""
    tensors = load_file(os.path.join(new, "model.safetensors"))
    kwargs = dict(device="cpu", tp_size=2, sleep_on_idle_weights=True, sleep_on_idle_s=0.5)
    with Engine(old, **kwargs) as engine:
        engine.update_weights_from_tensor(list(tensors.items()), weight_version="v2")
        assert list_segments("rlr-refit")
        # Idle sleep releases weights only when they can be re-read: refit from disk last.
        engine.update_weights_from_disk(new, weight_version="v2-disk")
        deadline = time.monotonic() + 10
        while not engine.get_server_info()["memory"]["asleep_on_idle"]:
            assert time.monotonic() < deadline, "never fell asleep"
            time.sleep(0.05)
        assert engine.get_server_info()["memory"]["released"] == ["kv_cache", "weights"]
        assert list_segments("rlr-refit") == []
        engine.update_weights_from_tensor(list(tensors.items()), weight_version="v3")
        assert run(engine) == expected["new"]
    assert list_segments("rlr-refit") == []
