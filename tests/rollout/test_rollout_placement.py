"""Placement that cannot be satisfied fails fast with a message naming what was asked and what
the cluster has, and leaves no placement group behind; so does an engine that cannot start."""

from __future__ import annotations

import shutil
import time

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout import PlacementError, deploy

ENGINE = {"device": "cpu"}


@ray.remote
class _Holder:
    def ping(self) -> bool:
        return True


def _live_groups() -> int:
    return sum(1 for pg in placement_group_table().values() if pg["state"] != "REMOVED")


def _deploy_fails(config: dict, match: str, within_s: float = 10) -> None:
    before = _live_groups()
    started = time.monotonic()
    with pytest.raises(PlacementError, match=match):
        deploy(config)
    assert time.monotonic() - started < within_s
    assert _live_groups() == before


def test_more_cpus_than_the_cluster(ray_local, tiny_model):
    have = ray.cluster_resources()["CPU"]
    _deploy_fails(
        {"model_path": tiny_model, "engine": ENGINE, "num_engines": 2, "cpus_per_rank": have},
        rf"need CPU={2 * have:g} in total, but the cluster has CPU={have:g}",
    )


def test_missing_engine_resource(ray_local, tiny_model):
    _deploy_fails(
        {
            "model_path": tiny_model,
            "engine": ENGINE,
            "mode": "disaggregated",
            "engine_resource": "rollout_engine",
            "cpus_per_rank": 0.5,
        },
        r"need rollout_engine=1 in total, but the cluster has rollout_engine=0",
    )


def test_no_node_with_labels(ray_local, tiny_model):
    _deploy_fails(
        {
            "model_path": tiny_model,
            "engine": ENGINE,
            "mode": "disaggregated",
            "node_labels": {"role": "rollout"},
            "cpus_per_rank": 0.5,
        },
        r"no alive node has labels \{'role': 'rollout'\}",
    )


def test_busy_cluster_times_out_instead_of_hanging(ray_local, tiny_model):
    # Hold all but 0.25 CPU. Earlier tests' actors may still be releasing theirs (Ray frees a
    # killed actor's resources asynchronously), so first wait, bounded, until all CPU is free.
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 120
    while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    # Block all but 0.25 of what is free now (an actor still holding CPU after the wait must
    # not make the blocker unplaceable).
    free = ray.available_resources().get("CPU", 0.0)
    blocker = placement_group([{"CPU": free - 0.25}])
    ray.get(blocker.ready(), timeout=60)
    try:
        _deploy_fails(
            {
                "model_path": tiny_model,
                "engine": ENGINE,
                "cpus_per_rank": 1.0,
                "placement_timeout_s": 1.0,
            },
            r"was not placed within 1s \(placement_timeout_s\); resources available now: "
            r"\{CPU: 0.25\}",
        )
    finally:
        remove_placement_group(blocker)


def test_colocated_bundle_too_small(ray_local, tiny_model):
    pg = placement_group([{"CPU": 0.25}])
    ray.get(pg.ready(), timeout=30)
    try:
        with pytest.raises(PlacementError, match=r"bundle 0 .* is \{CPU: 0.25\}; an engine needs"):
            deploy(
                {
                    "model_path": tiny_model,
                    "engine": ENGINE,
                    "mode": "colocated",
                    "cpus_per_rank": 0.5,
                },
                placement_group=pg,
            )
    finally:
        remove_placement_group(pg)


def test_colocated_bundle_already_taken(ray_local, tiny_model):
    pg = placement_group([{"CPU": 1.0}])
    ray.get(pg.ready(), timeout=30)
    # A trainer-like actor holds 0.75 of bundle 0's CPU.
    holder = _Holder.options(
        num_cpus=0.75,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
    ).remote()
    try:
        ray.get(holder.ping.remote(), timeout=30)
        with pytest.raises(PlacementError, match=r"bundle 0 .* has \{CPU: 0.25\} free of"):
            deploy(
                {
                    "model_path": tiny_model,
                    "engine": ENGINE,
                    "mode": "colocated",
                    "cpus_per_rank": 0.5,
                },
                placement_group=pg,
            )
    finally:
        ray.kill(holder)
        remove_placement_group(pg)


def test_engine_that_cannot_load_fails_deploy_with_its_error(ray_local, tiny_model, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # config.json fine, weights truncated
    before = _live_groups()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"engine 0 failed to start: .*creation task"):
        deploy({"model_path": str(broken), "engine": ENGINE, "cpus_per_rank": 0.5})
    assert time.monotonic() - started < 60
    assert _live_groups() == before  # the service removed the group it had created
