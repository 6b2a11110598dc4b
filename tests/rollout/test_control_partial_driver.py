"""RolloutDriver partial rollouts over Ray: stop once K groups finished or at a deadline, return
finished and cut groups, resume the cut ones (after a refit: per-token versions switch; without:
bitwise the uninterrupted run, deterministic mode)."""

from __future__ import annotations

import pytest
import ray

from engine_core import Engine
from rollout import deploy
from rollout.partial import continuation

PROMPTS = [[3 + i, 40 + 2 * i, 7, 90 + i] for i in range(4)]
# The deadline cut must land while samples are in flight on any machine: 250 sequential decode
# steps (the tiny model's context is 256) take far longer than DEADLINE_S anywhere.
LONG = 250
DEADLINE_S = 0.01


def params(short: set[int]) -> list[dict]:
    return [
        {
            "temperature": 0.8,
            "max_new_tokens": 4 if i in short else LONG,
            "ignore_eos": True,
            "n": 2,
            "sampling_seed": 100 + i,
        }
        for i in range(len(PROMPTS))
    ]


@pytest.fixture(scope="module")
def service(ray_local, tiny_model):
    config = {
        "model_path": tiny_model,
        "num_engines": 2,
        "engine": {"device": "cpu", "deterministic": True, "max_total_tokens": 4096},
        "cpus_per_rank": 0.5,
    }
    with deploy(config) as svc:
        yield svc


def lps(sample: dict) -> list[float]:
    return [lp for lp, _, _ in sample["meta_info"]["output_token_logprobs"]]


def samples(result: dict) -> list[dict]:
    return [s for g in result["groups"] for s in g["samples"]]


def test_deadline_cut_then_resumed_equals_uninterrupted(service):
    sp = params(short=set())
    whole = service.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)
    driver = service.driver
    cut = ray.get(
        driver.generate_partial.remote(
            PROMPTS, sp, return_logprob=True, logprob_start_len=0, deadline_s=DEADLINE_S
        )
    )
    assert cut["partial_groups"] >= 1 and len(cut["groups"]) == len(PROMPTS)
    assert all(
        len(s["output_ids"]) < LONG for g in cut["groups"] if not g["done"] for s in g["samples"]
    )
    done = ray.get(driver.resume_partial.remote(cut))
    assert done["finished_groups"] == len(PROMPTS) and done["partial_groups"] == 0
    for got, ref in zip(samples(done), whole):
        assert got["output_ids"] == ref["output_ids"]
        assert lps(got) == lps(ref)  # bitwise: deterministic engines
        assert got["meta_info"]["completion_tokens"] == LONG


def test_stop_after_k_groups_then_resume_after_refit(service, tiny_model, tiny_model_v2):
    driver = service.driver
    cut = ray.get(
        driver.generate_partial.remote(
            PROMPTS, params(short={0, 2}), return_logprob=True, min_groups=2
        )
    )
    assert [g["done"] for g in cut["groups"]] == [True, False, True, False]
    assert cut["finished_groups"] == 2
    for group in cut["groups"]:
        for j, sample in enumerate(group["samples"]):
            assert (sample["group"], sample["sample"]) == (group["index"], j)
            reason = sample["meta_info"]["finish_reason"]["type"]
            assert reason == ("length" if group["done"] else "abort")
    service.update_weights_from_disk(tiny_model_v2, weight_version="v2")
    try:
        done = ray.get(driver.resume_partial.remote(cut))
    finally:
        service.update_weights_from_disk(tiny_model, weight_version="default")
    assert done["finished_groups"] == 4
    with Engine(tiny_model_v2, device="cpu", deterministic=True) as fresh:
        for before, after in zip(samples(cut), samples(done)):
            k = len(before["output_ids"])
            versions = after["meta_info"]["weight_versions"]
            if before["meta_info"]["finish_reason"]["type"] == "length":
                assert after == before  # finished samples are carried unchanged
                continue
            assert versions == ["default"] * k + ["v2"] * (LONG - k)
            assert after["output_ids"][:k] == before["output_ids"]
            assert lps(after)[:k] == lps(before)
            rest = fresh.generate(**continuation(before))
            assert after["output_ids"][k:] == rest["output_ids"]
