"""RolloutDriver over two engines: input order, n samples kept on one engine, progress."""

from __future__ import annotations

import pytest
import ray

from engine_core import Engine
from rollout import deploy
from rollout.driver import RolloutDriver
from rollout.engine_actor import WeightsSource

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
PROMPTS = [[3 + i, 40 + 2 * i, 7, 90 + i] for i in range(16)]


@pytest.fixture(scope="module")
def service(ray_local, tiny_model):
    with deploy(
        {
            "model_path": tiny_model,
            "num_engines": 2,
            "engine": {"device": "cpu"},
            "cpus_per_rank": 0.5,
            "policy": "round_robin",
        }
    ) as svc:
        yield svc


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Greedy outputs of the in-process Engine, one per prompt."""
    with Engine(tiny_model, device="cpu") as engine:
        return engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)


def test_batch_in_input_order_with_groups_on_one_engine(service, reference):
    snaps: list[dict] = []
    outs = service.generate(
        input_ids=PROMPTS, sampling_params=dict(GREEDY, n=4), on_progress=snaps.append
    )
    assert len(outs) == 16 * 4
    for i, out in enumerate(outs):
        group, sample = divmod(i, 4)
        assert out["meta_info"]["id"].endswith(f"-{group}-{sample}")
        assert out["output_ids"] == reference[group]["output_ids"]
    engines = [[o["meta_info"]["engine_index"] for o in outs[g * 4 : g * 4 + 4]] for g in range(16)]
    assert all(len(set(e)) == 1 for e in engines), engines
    assert [e[0] for e in engines] == [0, 1] * 8  # round robin over groups
    final = snaps[-1]
    assert final["done"] and final["finished_samples"] == final["total_samples"] == 64
    assert final["completion_tokens"] == 64 * 8 and final["tokens_per_s"] > 0
    assert service.progress(final["rollout_id"])["finished_groups"] == 16


def test_single_prompt_and_per_prompt_params(service, reference):
    one = service.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
    assert isinstance(one, dict) and one["output_ids"] == reference[0]["output_ids"]
    params = [dict(GREEDY, n=1 + i % 3, max_new_tokens=4) for i in range(4)]
    outs = service.generate(input_ids=PROMPTS[:4], sampling_params=params)
    groups = [int(o["meta_info"]["id"].split("-")[1]) for o in outs]
    assert groups == [0, 1, 1, 2, 2, 2, 3]
    assert all(o["output_ids"] == reference[g]["output_ids"][:4] for g, o in zip(groups, outs))


def test_text_prompts_with_progress_bar(service, capsys):
    outs = service.generate(
        prompt=["hello world", "the end"], sampling_params=GREEDY, progress=True
    )
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [8, 8]
    drawn = capsys.readouterr().out
    assert "\r[" in drawn and "2/2 samples  16 tok" in drawn and drawn.endswith("\n")
    # Not a terminal (pytest captures stdout): no bar by default.
    service.generate(prompt="hello world", sampling_params=GREEDY)
    assert capsys.readouterr().out == ""


def test_bad_request_fails_the_rollout_and_driver_survives(service, reference):
    params = [GREEDY, dict(GREEDY, max_new_tokens=-1)]
    with pytest.raises(ValueError, match=r"max_new_tokens=-1"):
        service.generate(input_ids=PROMPTS[:2], sampling_params=params)
    with pytest.raises(ValueError, match=r"n=0"):
        service.generate(input_ids=PROMPTS[:2], sampling_params=dict(GREEDY, n=0))
    assert (
        service.generate(input_ids=PROMPTS[1], sampling_params=GREEDY)["output_ids"]
        == (reference[1]["output_ids"])
    )
    states = ray.get(service.driver.engine_states.remote())
    assert [s["state"] for s in states] == ["up", "up"]
    assert all(s["outstanding_tokens"] == 0 for s in states)


def test_health_and_server_info(service):
    health = service.health()
    assert [h["engine_index"] for h in health] == [0, 1] and all(h["ok"] for h in health)
    pg_id = service.placement_group.id.hex()
    assert {h["placement_group_id"] for h in health} == {pg_id}
    info = service.server_info()
    assert [i["actor"]["engine_index"] for i in info] == [0, 1]


def test_least_load_balances_estimated_tokens(service, tiny_model):
    # A second driver over the same engines, with the other policy.
    driver = RolloutDriver.options(num_cpus=0).remote(
        service.engines, "least_load", WeightsSource(tiny_model, "default")
    )
    try:
        # One long group, then short ones: the short ones avoid the engine holding the long one
        # until their estimated tokens add up to it.
        params = [dict(GREEDY, max_new_tokens=m) for m in (60, 10, 10, 10, 10, 10, 10, 10)]
        outs = ray.get(driver.generate.remote(input_ids=PROMPTS[:8], sampling_params=params))
        engines = [o["meta_info"]["engine_index"] for o in outs]
        assert engines == [0, 1, 1, 1, 1, 1, 0, 1], engines
    finally:
        ray.kill(driver)


def test_update_weights_from_disk_reaches_every_engine(service, tiny_model, tiny_model_v2):
    with Engine(tiny_model_v2, device="cpu") as engine:
        want = engine.generate(input_ids=PROMPTS[:4], sampling_params=GREEDY)
    results = service.update_weights_from_disk(tiny_model_v2, "v2")
    assert [r[0] for r in results] == [True, True]
    try:
        assert ray.get(service.driver.weights_source.remote()) == WeightsSource(tiny_model_v2, "v2")
        outs = service.generate(input_ids=PROMPTS[:4], sampling_params=GREEDY)
        assert {o["meta_info"]["engine_index"] for o in outs} == {0, 1}
        assert [o["output_ids"] for o in outs] == [w["output_ids"] for w in want]
        assert {o["meta_info"]["weight_version"] for o in outs} == {"v2"}
    finally:
        service.update_weights_from_disk(tiny_model, "default")
