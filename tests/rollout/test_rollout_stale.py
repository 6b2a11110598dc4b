"""An engine Ray restarts after a refit pushed from memory comes back on older weights: the
driver keeps it out of rotation ("stale") until the next refit, which re-forms the weight
group by itself, so no rollout ever mixes policies."""

from __future__ import annotations

import time

import pytest
import ray

from engine_core import Engine
from rollout import deploy

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
PROMPTS = [[3 + i, 40 + 2 * i, 7, 90 + i] for i in range(8)]


def _states(service) -> list[str]:
    return [s["state"] for s in ray.get(service.driver.engine_states.remote())]


def _wait_states(service, want: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _states(service) != want:
        assert time.monotonic() < deadline, _states(service)
        time.sleep(0.2)


def _restart(service, index: int) -> dict:
    """Kill engine ``index``, let Ray restart it, return the new instance's health."""
    old_pid = ray.get(service.engines[index].health.remote())["pid"]
    ray.kill(service.engines[index], no_restart=False)
    deadline = time.monotonic() + 120
    while True:
        try:
            health = ray.get(service.engines[index].health.remote(), timeout=120)
            if health["pid"] != old_pid:
                return health
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.mark.slow
def test_restarted_engine_is_stale_until_the_next_refit(ray_local, tiny_model, tiny_model_v2):
    with Engine(tiny_model_v2, device="cpu") as engine:
        want = [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
    config = {
        "model_path": tiny_model,
        "num_engines": 2,
        "engine": {"device": "cpu"},
        "cpus_per_rank": 0.5,
        "max_restarts": 2,
        "restart_timeout_s": 120,
    }
    with deploy(config) as service:
        sync = service.weight_sync(master_address="127.0.0.1", timeout_s=60)
        ray.get(sync.update_weights.remote(tiny_model_v2, "v2"))
        health = _restart(service, 0)
        assert health["weight_version"] == "default"  # the last checkpoint it can load
        _wait_states(service, ["stale", "up"])
        outs = service.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        assert {o["meta_info"]["engine_index"] for o in outs} == {1}
        assert {o["meta_info"]["weight_version"] for o in outs} == {"v2"}
        assert [o["output_ids"] for o in outs] == want

        _restart(service, 1)
        _wait_states(service, ["stale", "stale"])
        with pytest.raises(RuntimeError, match="older weights"):
            service.generate(input_ids=PROMPTS[:2], sampling_params=GREEDY)

        # Both engines left the old group by restarting: the refit re-forms it.
        ray.get(sync.update_weights.remote(tiny_model_v2, "v3"))
        _wait_states(service, ["up", "up"])
        outs = service.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        assert {o["meta_info"]["engine_index"] for o in outs} == {0, 1}
        assert {o["meta_info"]["weight_version"] for o in outs} == {"v3"}
        assert [o["output_ids"] for o in outs] == want
    with pytest.raises(ray.exceptions.RayActorError):  # the service owned and killed it
        ray.get(sync.group_info.remote(), timeout=30)
