"""Seeded sampling through the engine: reproducible and independent of batch partners."""

from __future__ import annotations

import pytest

from engine_core import Engine

PROMPT = [11, 22, 33, 44, 55]
SAMPLED = {"temperature": 1.0, "max_new_tokens": 24, "ignore_eos": True, "sampling_seed": 7}


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_dir("llama"), device="cpu", max_num_batched_tokens=16) as eng:
        yield eng


def test_seed_reproducible_and_batch_independent(engine):
    alone = engine.generate(input_ids=PROMPT, sampling_params=SAMPLED)["output_ids"]
    again = engine.generate(input_ids=PROMPT, sampling_params=SAMPLED)["output_ids"]
    others = [[3, 1, 4, 1, 5, 9, 2, 6] * 3, [2, 7, 1, 8], [100, 101]]
    batch = engine.generate(
        input_ids=others[:2] + [PROMPT] + others[2:],
        sampling_params=[dict(SAMPLED, sampling_seed=s) for s in (1, 2, 7, 3)],
    )
    assert alone == again == batch[2]["output_ids"]
    different = engine.generate(input_ids=PROMPT, sampling_params=dict(SAMPLED, sampling_seed=8))
    assert different["output_ids"] != alone


def test_n_seeded_samples_differ_but_reproduce(engine):
    first = engine.generate(input_ids=PROMPT, sampling_params=dict(SAMPLED, n=4))
    second = engine.generate(input_ids=PROMPT, sampling_params=dict(SAMPLED, n=4))
    ids = [o["output_ids"] for o in first]
    assert ids == [o["output_ids"] for o in second]
    assert len({tuple(x) for x in ids}) == 4
    assert ids[0] == engine.generate(input_ids=PROMPT, sampling_params=SAMPLED)["output_ids"]


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate(
        input_ids=PROMPT,
        sampling_params={"temperature": 0, "max_new_tokens": 12, "ignore_eos": True},
    )
    top1 = engine.generate(
        input_ids=PROMPT, sampling_params=dict(SAMPLED, top_k=1, max_new_tokens=12)
    )
    tiny_p = engine.generate(
        input_ids=PROMPT, sampling_params=dict(SAMPLED, top_p=1e-6, max_new_tokens=12)
    )
    assert greedy["output_ids"] == top1["output_ids"] == tiny_p["output_ids"]


def test_sampled_logprobs_use_temperature(engine):
    import math

    out = engine.generate(
        input_ids=PROMPT,
        sampling_params=dict(SAMPLED, temperature=0.5),
        return_logprob=True,
        top_logprobs_num=5,
    )
    meta = out["meta_info"]
    for (lp, tok, _), tops in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert lp <= 0.0
        # the full-vocab distribution at T=0.5 sums to one; the top-5 mass cannot exceed it
        assert sum(math.exp(t[0]) for t in tops) <= 1.0 + 1e-5
        top_ids = [t[1] for t in tops]
        if tok in top_ids:
            assert abs(tops[top_ids.index(tok)][0] - lp) < 1e-6
