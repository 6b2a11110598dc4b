"""The RL-control verbs over Ray (EngineActor): pause/continue with a generate call pending,
release/resume memory, abort while paused."""

from __future__ import annotations

import time

import pytest
import ray

from engine_core import Engine
from rollout.engine_actor import EngineActor

GREEDY = {"temperature": 0, "max_new_tokens": 150, "ignore_eos": True}
PROMPT = [5, 17, 29, 41]


@pytest.fixture(scope="module")
def actor(ray_local, tiny_model):
    handle = EngineActor.options(num_cpus=0.5, max_restarts=0).remote(
        tiny_model, {"device": "cpu", "max_total_tokens": 1024}
    )
    yield handle
    ray.kill(handle)


@pytest.fixture(scope="module")
def expected(tiny_model):
    with Engine(tiny_model, device="cpu", max_total_tokens=1024) as engine:
        return engine.generate(input_ids=PROMPT, sampling_params=GREEDY)["output_ids"]


def info(actor) -> dict:
    return ray.get(actor.get_server_info.remote())


def wait_running(actor) -> None:
    deadline = time.monotonic() + 30
    while info(actor)["num_running_requests"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_pause_in_place_and_continue_over_ray(actor, expected):
    ref = actor.generate.remote(input_ids=PROMPT, sampling_params=GREEDY)
    wait_running(actor)
    assert ray.get(actor.pause_generation.remote(mode="in_place"))["paused"]
    tokens = info(actor)["generated_tokens"]
    time.sleep(0.3)
    assert info(actor)["generated_tokens"] == tokens and info(actor)["paused"]
    assert not ray.wait([ref], timeout=0)[0]
    ray.get(actor.continue_generation.remote())
    assert ray.get(ref, timeout=60)["output_ids"] == expected


def test_pause_abort_and_abort_while_paused_over_ray(actor, expected):
    ref = actor.generate.remote(input_ids=PROMPT, sampling_params=GREEDY)
    wait_running(actor)
    ray.get(actor.pause_generation.remote(mode="abort"))
    out = ray.get(ref, timeout=60)
    n = len(out["output_ids"])
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and n < 150
    assert out["output_ids"] == expected[:n]
    queued = actor.generate.remote(input_ids=PROMPT, sampling_params=GREEDY, rid="late")
    while info(actor)["num_waiting_requests"] == 0:
        time.sleep(0.005)
    ray.get(actor.abort_request.remote(rid="late"))
    assert ray.get(queued, timeout=60)["meta_info"]["finish_reason"]["type"] == "abort"
    ray.get(actor.continue_generation.remote())


def test_release_and_resume_over_ray(actor, expected):
    released = ray.get(actor.release_memory_occupation.remote())
    assert released["released"] == ["kv_cache", "weights"]
    with pytest.raises(Exception, match="resume_memory_occupation"):
        ray.get(actor.generate.remote(input_ids=PROMPT, sampling_params=GREEDY))
    ray.get(actor.resume_memory_occupation.remote())
    out = ray.get(actor.generate.remote(input_ids=PROMPT, sampling_params=GREEDY))
    assert out["output_ids"] == expected
