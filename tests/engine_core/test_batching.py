"""Chunked prefill, retraction under a tiny KV budget and n > 1 give the plain run's tokens."""

from __future__ import annotations

import pytest

from engine_core import Engine

PROMPTS = [[3 + i, 50 + 2 * i, 7, 9 + i] * (2 + i) for i in range(6)]
GREEDY = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference(model_dir):
    with Engine(model_dir("llama"), device="cpu", max_total_tokens=4096) as engine:
        return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def test_chunked_prefill_same_tokens(model_dir, reference):
    with Engine(model_dir("llama"), device="cpu", max_num_batched_tokens=5, page_size=4) as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == reference


def test_retraction_under_tiny_kv_budget(model_dir, reference):
    # Each request needs up to 44 tokens; 64 tokens of KV cannot hold all six at once.
    with Engine(model_dir("llama"), device="cpu", max_total_tokens=64, page_size=4) as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        info = engine.get_server_info()
        engine.scheduler.check_integrity()
        assert engine.flush_cache().success
        engine.scheduler.check_integrity()
        assert engine.pool.num_free == engine.pool.num_pages
    assert info["num_retractions"] > 0
    assert [o["output_ids"] for o in outs] == reference
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [20] * 6


def test_n_samples_greedy_are_identical(model_dir, reference):
    with Engine(model_dir("llama"), device="cpu") as engine:
        outs = engine.generate(
            input_ids=PROMPTS[:2], sampling_params=dict(GREEDY, n=3), rid=["a", "b"]
        )
    assert len(outs) == 6
    assert [o["meta_info"]["id"] for o in outs] == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    assert [o["output_ids"] for o in outs] == [reference[0]] * 3 + [reference[1]] * 3


def test_request_that_can_never_fit_is_rejected(model_dir):
    from engine_core import InvalidRequestError

    with Engine(model_dir("llama"), device="cpu", max_total_tokens=32, page_size=4) as engine:
        with pytest.raises(InvalidRequestError, match="max_new_tokens"):
            engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 40})
        out = engine.generate(
            input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 5, "ignore_eos": True}
        )
        assert len(out["output_ids"]) == 5


def test_many_concurrent_callers_share_batches(model_dir, reference):
    import threading

    results = {}
    with Engine(model_dir("llama"), device="cpu") as engine:

        def call(i):
            results[i] = engine.generate(input_ids=PROMPTS[i], sampling_params=GREEDY)["output_ids"]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        steps = engine.get_server_info()["steps"]
    assert [results[i] for i in range(len(PROMPTS))] == reference
    # 6 callers x 20 tokens each took far fewer than 120 separate steps: they were batched
    assert steps < 90
