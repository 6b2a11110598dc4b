"""Fault tolerance: an engine killed mid-rollout; every request completes exactly once, and the
restarted engine rejoins on the service's current weights."""

from __future__ import annotations

import time

import pytest
import ray

from engine_core import Engine
from rollout import deploy

# Few running requests per engine, so a rollout lasts long enough to kill an engine mid-way.
ENGINE = {"device": "cpu", "max_running_requests": 4}
GREEDY = {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True}
PROMPTS = [[3 + i, 40 + 2 * i, 7, 90 + i] for i in range(16)]


@pytest.fixture(scope="module")
def service(ray_local, tiny_model):
    with deploy(
        {
            "model_path": tiny_model,
            "num_engines": 2,
            "engine": ENGINE,
            "cpus_per_rank": 0.5,
            "max_restarts": 2,
            "restart_timeout_s": 120,
        }
    ) as svc:
        yield svc


def _states(service) -> list[str]:
    return [s["state"] for s in ray.get(service.driver.engine_states.remote())]


def _wait_up(service, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _states(service) != ["up", "up"]:
        assert time.monotonic() < deadline, _states(service)
        time.sleep(0.2)


def _restart(service, index: int) -> dict:
    """Kill engine ``index`` (Ray restarts it) and return the new instance's health."""
    old_pid = ray.get(service.engines[index].health.remote())["pid"]
    ray.kill(service.engines[index], no_restart=False)
    deadline = time.monotonic() + 120
    while True:  # calls may still reach the old process, or fail while Ray restarts it
        try:
            health = ray.get(service.engines[index].health.remote(), timeout=120)
            if health["pid"] != old_pid:
                return health
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)


def _kill_mid_rollout(service, victim: int, no_restart: bool):
    """Start a rollout, kill engine ``victim`` once some groups finished, return outputs and the
    final progress."""
    rollout_id = f"fault{victim}"
    ref = service.submit(
        input_ids=PROMPTS, sampling_params=dict(GREEDY, n=4), rollout_id=rollout_id
    )
    deadline = time.monotonic() + 60
    while (service.progress(rollout_id) or {}).get("finished_groups", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not service.progress(rollout_id)["done"], "rollout finished before the kill"
    ray.kill(service.engines[victim], no_restart=no_restart)
    outs = ray.get(ref, timeout=120)
    return outs, service.progress(rollout_id)


def _check_exactly_once(outs, reference):
    assert len(outs) == 64
    ids = [o["meta_info"]["id"] for o in outs]
    assert len(set(ids)) == 64
    for i, out in enumerate(outs):
        group, sample = divmod(i, 4)
        # "{rollout}-{group}[.r{attempt}]-{sample}"
        assert ids[i].split("-")[1].split(".")[0] == str(group) and ids[i].endswith(f"-{sample}")
        assert out["output_ids"] == reference[group]["output_ids"]
        assert out["meta_info"]["finish_reason"]["type"] == "length"


@pytest.fixture(scope="module")
def reference(tiny_model):
    with Engine(tiny_model, device="cpu") as engine:
        return engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)


def test_engine_killed_mid_rollout_restarts(service, reference):
    outs, progress = _kill_mid_rollout(service, victim=0, no_restart=False)
    _check_exactly_once(outs, reference)
    assert progress["resent_groups"] >= 1
    assert progress["finished_groups"] == 16 and progress["finished_samples"] == 64
    _wait_up(service)
    health = service.health()
    assert health[0]["reconstructed"] and not health[1]["reconstructed"]
    # The restarted engine serves again.
    again = service.generate(input_ids=PROMPTS[:4], sampling_params=GREEDY)
    assert {o["meta_info"]["engine_index"] for o in again} == {0, 1}
    assert [o["output_ids"] for o in again] == [r["output_ids"] for r in reference[:4]]


def test_engine_dead_for_good_batch_completes_on_the_other(service, reference):
    _wait_up(service)
    outs, progress = _kill_mid_rollout(service, victim=1, no_restart=True)
    _check_exactly_once(outs, reference)
    assert progress["resent_groups"] >= 1
    assert all(o["meta_info"]["engine_index"] == 0 for o in outs[-4:])
    deadline = time.monotonic() + 30
    while _states(service)[1] != "dead":
        assert time.monotonic() < deadline, _states(service)
        time.sleep(0.2)


def test_restarted_engine_rejoins_on_current_weights(service, tiny_model_v2):
    # Runs last: engine 1 is gone for good, engine 0 has one restart left.
    # Record a new current checkpoint without pushing it: only a restarted engine loads it.
    ray.get(service.driver.set_weights_source.remote(tiny_model_v2, "v2"))
    with Engine(tiny_model_v2, device="cpu") as engine:
        want = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["output_ids"]
    health = _restart(service, 0)
    assert health["reconstructed"] and health["weight_version"] == "v2"
    out = ray.get(service.engines[0].generate.remote(input_ids=PROMPTS[0], sampling_params=GREEDY))
    assert out["output_ids"] == want and out["meta_info"]["weight_version"] == "v2"
