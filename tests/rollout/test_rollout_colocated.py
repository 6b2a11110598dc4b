"""Colocated mode: engines and a (dummy) trainer share the bundles of one placement group."""

from __future__ import annotations

import os
import time

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout import deploy

ENGINE = {"device": "cpu"}

GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}


@ray.remote
class Trainer:
    """Stands in for one trainer rank."""

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "pg": ctx.get_placement_group_id(),
            "pid": os.getpid(),
        }


def _trainer(pg, bundle: int):
    return Trainer.options(
        num_cpus=0.5,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=bundle
        ),
    ).remote()


def _bundle_free_cpu(pg, bundle: int) -> float:
    return ray.available_resources().get(f"CPU_group_{bundle}_{pg.id.hex()}", 0.0)


def test_engines_share_the_trainers_bundles(ray_local, tiny_model):
    pg = placement_group([{"CPU": 1.0}, {"CPU": 1.0}], strategy="PACK")
    ray.get(pg.ready(), timeout=30)
    trainers = [_trainer(pg, i) for i in range(2)]
    try:
        spots = ray.get([t.where.remote() for t in trainers])
        config = {
            "model_path": tiny_model,
            "mode": "colocated",
            "num_engines": 2,
            "engine": ENGINE,
            "cpus_per_rank": 0.5,
            "bundle_indices": [1, 0],
        }
        with deploy(config, placement_group=pg) as service:
            health = service.health()
            assert {h["placement_group_id"] for h in health} == {pg.id.hex()}
            assert {s["pg"] for s in spots} == {pg.id.hex()}
            assert health[0]["node_id"] == spots[1]["node_id"]
            # Each bundle is now exactly full: half trainer, half engine.
            assert _bundle_free_cpu(pg, 0) == 0.0 and _bundle_free_cpu(pg, 1) == 0.0
            out = service.generate(input_ids=[[1, 2, 3], [4, 5, 6]], sampling_params=GREEDY)
            assert [o["meta_info"]["completion_tokens"] for o in out] == [4, 4]
        # The trainer's group and actors outlive the service; the engines' halves are free.
        assert placement_group_table(pg)["state"] == "CREATED"
        assert ray.get([t.where.remote() for t in trainers]) == spots
        deadline = time.monotonic() + 30  # killed actors release their share asynchronously
        while not (_bundle_free_cpu(pg, 0) == 0.5 and _bundle_free_cpu(pg, 1) == 0.5):
            assert time.monotonic() < deadline, ray.available_resources()
            time.sleep(0.1)
    finally:
        for t in trainers:
            ray.kill(t)
        remove_placement_group(pg)


def test_service_creates_the_group_for_the_trainer(ray_local, tiny_model):
    config = {
        "model_path": tiny_model,
        "mode": "colocated",
        "num_engines": 1,
        "engine": ENGINE,
        "cpus_per_rank": 0.5,
        "bundle": {"CPU": 1.0},
    }
    with deploy(config) as service:
        pg = service.placement_group
        trainer = _trainer(pg, 0)
        assert ray.get(trainer.where.remote(), timeout=30)["pg"] == pg.id.hex()
        assert _bundle_free_cpu(pg, 0) == 0.0
        assert service.generate(input_ids=[1, 2], sampling_params=GREEDY)["output_ids"]
        ray.kill(trainer)
    assert placement_group_table(pg)["state"] == "REMOVED"


def test_placement_group_only_for_colocated(ray_local, tiny_model):
    pg = placement_group([{"CPU": 0.5}])
    try:
        with pytest.raises(ValueError, match="only mode 'colocated'"):
            deploy({"model_path": tiny_model, "engine": ENGINE}, placement_group=pg)
    finally:
        remove_placement_group(pg)
