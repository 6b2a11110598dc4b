"""Disaggregated mode on a simulated 3-node cluster (``ray.cluster_utils.Cluster``): a trainer
head node without the engine resource, and two engine nodes (one also labelled)."""

from __future__ import annotations

import time

import pytest
import ray

from rollout import PlacementError, deploy
from rollout.ray_env import init_ray, make_cluster, node_args

pytestmark = pytest.mark.slow

ENGINE = {"device": "cpu"}
GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def cluster():
    """Owns its own Ray: the session's local instance (if any) is shut down first; the next
    module that needs it starts it again."""
    if ray.is_initialized():
        ray.shutdown()
    cl = make_cluster({"num_cpus": 1})
    try:
        nodes = {"head": cl.head_node.node_id}
        nodes["b"] = cl.add_node(
            **node_args(1, resources={"rollout_engine": 1}, labels={"role": "rollout"})
        ).node_id
        nodes["c"] = cl.add_node(**node_args(1, resources={"rollout_engine": 1})).node_id
        init_ray(cl.address)
        yield nodes
    finally:
        ray.shutdown()
        cl.shutdown()


def _config(tiny_model: str, **kwargs) -> dict:
    return {
        "model_path": tiny_model,
        "mode": "disaggregated",
        "engine": ENGINE,
        "cpus_per_rank": 0.5,
        **kwargs,
    }


def test_engines_only_on_engine_resource_nodes(cluster, tiny_model):
    config = _config(
        tiny_model, num_engines=2, engine_resource="rollout_engine", placement_strategy="SPREAD"
    )
    with deploy(config) as service:
        nodes = [h["node_id"] for h in service.health()]
        assert sorted(nodes) == sorted([cluster["b"], cluster["c"]])
        outs = service.generate(input_ids=[[1, 2, 3]] * 4, sampling_params=GREEDY)
        assert {o["meta_info"]["engine_index"] for o in outs} == {0, 1}
        # A third engine does not fit: the resource is taken, so it fails fast, not hangs.
        started = time.monotonic()
        with pytest.raises(PlacementError, match="not placed within 2s"):
            deploy(dict(config, num_engines=1, placement_timeout_s=2.0))
        assert time.monotonic() - started < 15


def test_engine_by_node_label(cluster, tiny_model):
    with deploy(_config(tiny_model, node_labels={"role": "rollout"})) as service:
        assert service.health()[0]["node_id"] == cluster["b"]


def test_infeasible_disaggregated_placement(cluster, tiny_model):
    with pytest.raises(
        PlacementError,
        match=r"need rollout_engine=3 in total, but the cluster has rollout_engine=2",
    ):
        deploy(_config(tiny_model, num_engines=3, engine_resource="rollout_engine"))
    with pytest.raises(
        PlacementError,
        match=r"need CPU=1.5 in total, but the cluster has CPU=1 on nodes with labels "
        r"\{'role': 'rollout'\}",
    ):
        deploy(_config(tiny_model, node_labels={"role": "rollout"}, cpus_per_rank=1.5))
    # Enough CPUs in the cluster (3), but no single node has 2 besides the engine resource.
    with pytest.raises(
        PlacementError,
        match=r"no single node can hold a bundle of \{CPU: 2, rollout_engine: 1\}",
    ):
        deploy(_config(tiny_model, engine_resource="rollout_engine", cpus_per_rank=2.0))
