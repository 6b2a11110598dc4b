"""Partial rollouts on one in-process engine (no Ray): samples cut by a pause(abort) and
continued with ``rollout.partial`` equal the uninterrupted run (bitwise in deterministic mode,
seeded n>1 groups included); continued after a refit, per-token versions show the switch."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine_core import Engine
from rollout.partial import continuation, is_done, make_sample, merge, sample_requests

SEEDED = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 40, "ignore_eos": True}
GREEDY = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
PROMPTS = [[5, 17, 33, 2], [9, 8, 7, 6, 5]]
KW = {"device": "cpu", "max_total_tokens": 2048, "page_size": 4}


def requests(params: dict) -> list[dict]:
    return [
        {
            "input_ids": p,
            "sampling_params": dict(params, n=2, sampling_seed=11 + i),
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        for i, p in enumerate(PROMPTS)
    ]


def cut(engine: Engine, reqs: list[dict], at_least: int = 3) -> list[dict]:
    """Run ``reqs`` and stop them with pause_generation("abort") once every sample has
    ``at_least`` tokens; returns the samples (as the driver builds them)."""
    with ThreadPoolExecutor(len(reqs)) as pool:
        futures = [pool.submit(engine.generate, **r) for r in reqs]
        deadline = time.monotonic() + 30
        while True:
            lens = engine.loop.call(lambda: [len(r.output_ids) for r in engine.scheduler.running])
            if len(lens) == 2 * len(reqs) and min(lens) >= at_least:
                break
            assert time.monotonic() < deadline
            time.sleep(0.002)
        engine.pause_generation("abort")
        outputs = [f.result(timeout=30) for f in futures]
    engine.continue_generation()
    return [
        make_sample(g, j, sample_requests(reqs[g])[j], out)
        for g, outs in enumerate(outputs)
        for j, out in enumerate(outs)
    ]


def resume(engine: Engine, samples: list[dict]) -> list[dict]:
    merged = []
    for sample in samples:
        request = continuation(sample)
        assert request is not None and request["sampling_params"]["n"] == 1
        merged.append(merge(sample, engine.generate(**request)))
    return merged


def flat(outputs: list[list[dict]]) -> list[dict]:
    return [o for outs in outputs for o in outs]


def lps(out: dict) -> list[float]:
    return [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]


@pytest.mark.parametrize("params", [SEEDED, GREEDY], ids=["seeded", "greedy"])
def test_cut_and_continued_equals_uninterrupted_bitwise(model_dir, params):
    reqs = requests(params)
    with Engine(model_dir("llama"), deterministic=True, **KW) as engine:
        whole = flat([engine.generate(**r) for r in reqs])
        samples = cut(engine, reqs)
        assert not any(is_done(s) for s in samples)
        assert all(0 < len(s["output_ids"]) < 40 for s in samples)
        merged = resume(engine, samples)
    for got, ref in zip(merged, whole):
        assert got["output_ids"] == ref["output_ids"]
        assert lps(got) == lps(ref)  # bitwise: deterministic mode
        meta = got["meta_info"]
        assert meta["input_token_logprobs"] == ref["meta_info"]["input_token_logprobs"]
        assert meta["completion_tokens"] == 40 and meta["num_resumes"] == 1
        assert meta["prompt_tokens"] == ref["meta_info"]["prompt_tokens"]
        assert meta["weight_versions"] == ["default"] * 40
        assert meta["finish_reason"]["type"] == "length" and is_done(got)


def test_greedy_continued_equals_uninterrupted_without_deterministic_mode(model_dir):
    reqs = requests(GREEDY)
    with Engine(model_dir("llama"), **KW) as engine:
        whole = flat([engine.generate(**r) for r in reqs])
        merged = resume(engine, cut(engine, reqs))
    for got, ref in zip(merged, whole):
        assert got["output_ids"] == ref["output_ids"]
        assert lps(got) == pytest.approx(lps(ref), rel=1e-5, abs=1e-5)


def test_continued_after_refit_records_versions(model_dir):
    new = model_dir("llama", seed=1)
    reqs = requests(SEEDED)
    with Engine(model_dir("llama"), deterministic=True, **KW) as engine:
        samples = cut(engine, reqs)
        engine.update_weights_from_disk(new, weight_version="v2")
        merged = resume(engine, samples)
    with Engine(new, deterministic=True, **KW) as fresh:
        for sample, got in zip(samples, merged):
            k = len(sample["output_ids"])
            assert got["meta_info"]["weight_versions"] == ["default"] * k + ["v2"] * (40 - k)
            assert got["output_ids"][:k] == sample["output_ids"]
            # The rest is what the new weights draw from that prefix, at the same positions.
            rest = fresh.generate(**continuation(sample))
            assert got["output_ids"][k:] == rest["output_ids"]
            assert lps(got)[k:] == lps(rest)


def test_sample_cut_before_its_first_token_is_resubmitted_whole(model_dir):
    request = requests(GREEDY)[0]
    with Engine(model_dir("llama"), **KW) as engine:
        engine.pause_generation("in_place")  # queued, never started
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(engine.generate, **request)
            while not engine.scheduler.waiting:
                time.sleep(0.002)
            engine.abort_request(abort_all=True)
            outputs = future.result(timeout=30)
        engine.continue_generation()
        sample = make_sample(0, 0, sample_requests(request)[0], outputs[0])
        assert sample["output_ids"] == [] and not is_done(sample)
        assert continuation(sample) == sample["request"]
        merged = merge(sample, engine.generate(**continuation(sample)))
        whole = engine.generate(**sample["request"])
    assert merged["output_ids"] == whole["output_ids"]
    assert merged["meta_info"]["num_resumes"] == 1
