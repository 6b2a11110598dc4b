"""``EngineActor.remote(model_path, **engine_kwargs)``: engine options as keywords (SGLang's
names included), as one would write ``sglang.Engine(model_path=..., **kwargs)``; the
service's positional form ``(model_path, engine_kwargs, registry, index)`` keeps working
(tests/rollout/test_rollout_engine_actor.py)."""

from __future__ import annotations

import pytest
import ray

from engine_core import Engine
from rollout.engine_actor import EngineActor

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
IDS = [5, 17, 29, 41]


@pytest.fixture(scope="module")
def actor(ray_local, tiny_model):
    handle = EngineActor.options(num_cpus=0.5, max_restarts=0).remote(
        tiny_model, device="cpu", random_seed=3, max_total_tokens=256, disable_radix_cache=True
    )
    yield handle
    ray.kill(handle)


def test_keyword_engine_args_reach_the_engine(actor, tiny_model):
    info = ray.get(actor.get_server_info.remote())
    assert info["config"]["seed"] == 3 and info["max_total_num_tokens"] == 256
    got = ray.get(actor.generate.remote(input_ids=IDS, sampling_params=GREEDY))
    with Engine(tiny_model, device="cpu", random_seed=3, max_total_tokens=256) as engine:
        want = engine.generate(input_ids=IDS, sampling_params=GREEDY)
    assert got["output_ids"] == want["output_ids"]


def test_sglang_verbs_are_forwarded(actor, tiny_model):
    assert ray.get(actor.flush_cache.remote()).success is True
    assert ray.get(actor.get_model_info.remote())["model_path"] == tiny_model


def test_options_given_twice_fail_the_actor(ray_local, tiny_model):
    handle = EngineActor.options(num_cpus=0.5, max_restarts=0).remote(
        tiny_model, {"device": "cpu"}, device="cpu"
    )
    try:
        with pytest.raises(ray.exceptions.RayActorError, match="given twice"):
            ray.get(handle.health.remote(), timeout=60)
    finally:
        ray.kill(handle)
