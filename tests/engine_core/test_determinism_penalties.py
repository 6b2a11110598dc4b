"""Deterministic mode with SGLang's penalties: a penalized request's tokens and logprobs are
bitwise identical alone, in a batch whose partners use other penalties, under chunked
prefill, after retraction (its penalty state is derived from its tokens) and across runs."""

from __future__ import annotations

import random

import pytest

from engine_core import Engine

TARGET = [7, 19, 23, 5, 88, 41, 3, 17, 29]
BASE = {"max_new_tokens": 16, "ignore_eos": True}
PENALIZED = {
    "seeded": dict(
        BASE,
        temperature=1.0,
        sampling_seed=5,
        frequency_penalty=0.6,
        presence_penalty=0.4,
        repetition_penalty=1.4,
        min_new_tokens=6,
    ),
    "greedy": dict(BASE, temperature=0, repetition_penalty=1.8, presence_penalty=-0.5),
}


def partner_params(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        dict(
            BASE,
            temperature=rng.choice([0, 0.7, 1.0]),
            sampling_seed=rng.randrange(1000),
            frequency_penalty=rng.uniform(-2, 2),
            presence_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
            repetition_penalty=rng.choice([1.0, rng.uniform(0.1, 2)]),
            min_new_tokens=rng.randrange(0, 10),
        )
        for _ in range(count)
    ]


def partners(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(1, 30))] for _ in range(count)]


def signature(engine: Engine, prompts: list, params: list[dict], index: int) -> tuple:
    outs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    meta = outs[index]["meta_info"]
    return tuple(outs[index]["output_ids"]), tuple(lp for lp, _, _ in meta["output_token_logprobs"])


@pytest.fixture(scope="module")
def path(model_dir):
    return model_dir("llama")


@pytest.fixture(scope="module")
def engine(path):
    with Engine(path, device="cpu", deterministic=True, page_size=4) as eng:
        yield eng


@pytest.fixture(scope="module")
def alone(engine):
    return {name: signature(engine, [TARGET], [p], 0) for name, p in PENALIZED.items()}


def test_penalties_are_active(engine, alone):
    for name, params in PENALIZED.items():
        plain = {k: v for k, v in params.items() if "penalty" not in k and k != "min_new_tokens"}
        assert signature(engine, [TARGET], [plain], 0) != alone[name]


@pytest.mark.parametrize("name", sorted(PENALIZED))
@pytest.mark.parametrize("count", [1, 7, 33])
def test_invariant_to_partners_with_other_penalties(engine, alone, name, count):
    position = count // 2
    prompts = partners(count, seed=count)
    params = partner_params(count, seed=count)
    prompts.insert(position, TARGET)
    params.insert(position, PENALIZED[name])
    assert signature(engine, prompts, params, position) == alone[name]


def test_same_seed_repeats_and_other_seed_differs(engine, alone):
    params = PENALIZED["seeded"]
    assert signature(engine, [TARGET], [params], 0) == alone["seeded"]
    assert signature(engine, [TARGET], [dict(params, sampling_seed=6)], 0) != alone["seeded"]


def test_invariant_to_chunked_prefill_and_retraction(path, alone):
    prompts = partners(6, seed=5) + [TARGET]
    params = partner_params(6, seed=5) + [PENALIZED["seeded"]]
    with Engine(
        path, device="cpu", deterministic=True, page_size=4, max_num_batched_tokens=3
    ) as eng:
        assert signature(eng, prompts, params, 6) == alone["seeded"]
    # A tiny KV budget forces retraction: the penalty state must survive the recompute.
    with Engine(path, device="cpu", deterministic=True, page_size=4, max_total_tokens=96) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    target = outs[6]
    assert target["meta_info"]["num_retractions"] > 0  # the penalized request itself
    lps = tuple(lp for lp, _, _ in target["meta_info"]["output_token_logprobs"])
    assert (tuple(target["output_ids"]), lps) == alone["seeded"]
