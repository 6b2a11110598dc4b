"""pause_generation / continue_generation: every mode keeps every request (abort returns it
partial, retract and in_place continue it to the uninterrupted output), aborts and refits work
while paused, and tokens after a refit carry the new version."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from engine_core import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
SEEDED = {"temperature": 1.0, "max_new_tokens": 48, "ignore_eos": True, "sampling_seed": 7}
PROMPTS = [[5, 17, 33, 2], [9, 8, 7, 6, 5], [100, 3], [42] * 7]
KW = {"device": "cpu", "max_total_tokens": 2048, "page_size": 4}


@pytest.fixture(scope="module")
def path(model_dir):
    return model_dir("llama")


@pytest.fixture(scope="module")
def reference(path):
    with Engine(path, **KW) as engine:
        return engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as executor:
        yield executor


def progress(engine: Engine) -> tuple[list[int], list[int]]:
    """Output lengths of the running and the waiting requests, read between two steps."""
    sched = engine.scheduler
    return engine.loop.call(
        lambda: (
            [len(r.output_ids) for r in sched.running],
            [len(r.output_ids) for r in sched.waiting],
        )
    )


def start(engine: Engine, pool, params=GREEDY, at_least: int = 3) -> Future:
    """Generate PROMPTS in the background; return once all run with ``at_least`` tokens."""
    future = pool.submit(
        engine.generate, input_ids=PROMPTS, sampling_params=params, return_logprob=True
    )
    deadline = time.monotonic() + 30
    while True:
        running, _ = progress(engine)
        if len(running) == len(PROMPTS) and min(running) >= at_least:
            return future
        assert not future.done() and time.monotonic() < deadline, "requests never got going"
        time.sleep(0.002)


def logprobs(out: dict) -> list[float]:
    return [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]


def assert_frozen(engine: Engine) -> tuple[list[int], list[int]]:
    before = progress(engine)
    time.sleep(0.3)
    assert progress(engine) == before, "a paused engine generated tokens"
    return before


def test_abort_mode_returns_partials_and_queues_new_requests(path, reference, pool):
    with Engine(path, **KW) as engine:
        future = start(engine, pool)
        info = engine.pause_generation(mode="abort")
        assert info["running"] == len(PROMPTS) and engine.is_paused
        outs = future.result(timeout=30)
        for out, ref in zip(outs, reference):
            n = len(out["output_ids"])
            assert out["meta_info"]["finish_reason"]["type"] == "abort"
            assert 3 <= n < GREEDY["max_new_tokens"]
            assert out["output_ids"] == ref["output_ids"][:n]
            assert logprobs(out) == pytest.approx(logprobs(ref)[:n], rel=1e-5, abs=1e-5)
            assert out["meta_info"]["weight_versions"] == ["default"] * n
        late = pool.submit(engine.generate, input_ids=PROMPTS[0], sampling_params=GREEDY)
        time.sleep(0.3)
        assert not late.done() and progress(engine) == ([], [0])
        engine.continue_generation()
        assert not engine.is_paused
        assert late.result(timeout=30)["output_ids"] == reference[0]["output_ids"]


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_retract_and_in_place_continue_to_the_uninterrupted_output(path, reference, pool, mode):
    with Engine(path, **KW) as engine:
        future = start(engine, pool)
        engine.pause_generation(mode=mode)
        running, waiting = assert_frozen(engine)
        if mode == "retract":
            assert running == [] and len(waiting) == len(PROMPTS) and min(waiting) >= 3
            # KV pages freed, except prefixes the retracted requests left in the cache.
            cached = engine.scheduler.prefix.cache.num_pages
            assert engine.pool.num_free + cached == engine.pool.num_pages
        else:
            assert len(running) == len(PROMPTS) and waiting == []
            assert engine.pool.num_free < engine.pool.num_pages  # KV kept
        assert not future.done()
        engine.continue_generation()
        outs = future.result(timeout=30)
        retractions = engine.get_server_info()["num_retractions"]
    assert retractions == (len(PROMPTS) if mode == "retract" else 0)
    for out, ref in zip(outs, reference):
        assert out["meta_info"]["finish_reason"]["type"] == "length"
        assert out["output_ids"] == ref["output_ids"]
        assert logprobs(out) == pytest.approx(logprobs(ref), rel=1e-5, abs=1e-5)


def test_retract_is_bitwise_invisible_in_deterministic_mode(path, pool):
    with Engine(path, deterministic=True, **KW) as engine:
        alone = engine.generate(input_ids=PROMPTS, sampling_params=SEEDED, return_logprob=True)
        future = start(engine, pool, SEEDED)
        engine.pause_generation(mode="retract")
        engine.continue_generation()
        outs = future.result(timeout=30)
    for out, ref in zip(outs, alone):
        assert out["output_ids"] == ref["output_ids"]
        assert logprobs(out) == logprobs(ref)  # bitwise


def test_abort_request_while_paused(path, reference, pool):
    with Engine(path, **KW) as engine:
        futures = [
            pool.submit(engine.generate, input_ids=p, sampling_params=GREEDY, rid=f"r{i}")
            for i, p in enumerate(PROMPTS)
        ]
        while len(progress(engine)[0]) < len(PROMPTS):
            time.sleep(0.002)
        engine.pause_generation(mode="in_place")
        engine.abort_request(rid="r1")
        one = futures[1].result(timeout=30)
        assert one["meta_info"]["finish_reason"]["type"] == "abort"
        assert not any(f.done() for i, f in enumerate(futures) if i != 1)
        engine.abort_request(abort_all=True)
        rest = [f.result(timeout=30) for f in futures]
        assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in rest)
        assert progress(engine) == ([], [])
        engine.continue_generation()
        out = engine.generate(input_ids=PROMPTS[2], sampling_params=GREEDY)
    assert out["output_ids"] == reference[2]["output_ids"]


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_refit_while_paused_continues_on_new_weights(model_dir, path, reference, pool, mode):
    new = model_dir("llama", seed=1)
    with Engine(path, **KW) as engine:
        future = start(engine, pool)
        engine.pause_generation(mode=mode)
        assert engine.update_weights_from_disk(new, weight_version="v2")[0] is True
        engine.continue_generation()
        outs = future.result(timeout=30)
    with Engine(new, **KW) as fresh:
        for prompt, out, ref in zip(PROMPTS, outs, reference):
            versions = out["meta_info"]["weight_versions"]
            k = versions.count("default")
            assert k >= 3 and versions == ["default"] * k + ["v2"] * (48 - k)
            assert out["output_ids"][:k] == ref["output_ids"][:k]
            if mode != "retract":
                continue  # in place, the prefix's KV is the old weights': no fresh equivalent
            rest = fresh.generate(
                input_ids=prompt + out["output_ids"][:k],
                sampling_params=dict(GREEDY, max_new_tokens=48 - k),
            )
            assert out["output_ids"][k:] == rest["output_ids"]


def test_bad_mode_is_rejected(path):
    with Engine(path, **KW) as engine:
        with pytest.raises(ValueError, match="pause mode"):
            engine.pause_generation(mode="freeze")
        assert not engine.is_paused
