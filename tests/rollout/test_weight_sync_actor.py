"""WeightSyncActor: one call refits every engine (2 engines x TP=2 over one gloo group), all or
nothing across engines; the engines end up bitwise equal to a fresh engine on the new weights."""

from __future__ import annotations

import os

import pytest
import ray
import torch
from safetensors.torch import load_file

from engine_core import Engine
from rollout.engine_actor import EngineActor
from rollout.weight_sync_actor import RefitError, WeightSyncActor
from weight_sync.checksum import checksums_of

GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 4, 3]]


def outputs(outs: list) -> list:
    return [
        (o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]])
        for o in outs
    ]


def remote_run(engine) -> list:
    # A cache hit changes the last bits of default-mode logprobs: compare from a cold cache.
    ray.get(engine.flush_cache.remote())
    outs = ray.get(
        engine.generate.remote(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    )
    return outputs(outs)


def local_run(path: str, **kwargs) -> list:
    with Engine(path, device="cpu", **kwargs) as engine:
        return outputs(
            engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        )


def versions(engines) -> list[str]:
    return [h["weight_version"] for h in ray.get([e.health.remote() for e in engines])]


@pytest.mark.slow
def test_weight_sync_actor_refits_all_engines_or_none(ray_local, model_dir):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    other = model_dir("llama", intermediate_size=96)  # an engine the update cannot fit
    old_weights = load_file(os.path.join(old, "model.safetensors"))
    new_weights = load_file(os.path.join(new, "model.safetensors"))
    expected_old, expected_new = local_run(old, tp_size=2), local_run(new, tp_size=2)

    def engine(path, tp):
        opts = dict(num_cpus=0.5, max_restarts=0)
        return EngineActor.options(**opts).remote(path, {"device": "cpu", "tp_size": tp})

    a, b, c = engine(old, 2), engine(old, 2), engine(other, 1)
    sync_opts = dict(master_address="127.0.0.1", bucket_bytes=64 << 10, timeout_s=60.0)
    sync = WeightSyncActor.options(num_cpus=0).remote([a, b], **sync_opts)
    mixed = WeightSyncActor.options(num_cpus=0).remote([a, c], **sync_opts)
    try:
        info = ray.get(sync.init_group.remote())
        assert info["world_size"] == 5 and info["rank_offsets"] == [1, 3]

        # A checkpoint path: every engine switches, bitwise equal to a fresh engine.
        result = ray.get(sync.update_weights.remote(new, "step-1"))
        assert result["num_engines"] == 2 and versions([a, b]) == ["step-1"] * 2
        assert remote_run(a) == remote_run(b) == expected_new != expected_old
        assert ray.get(sync.checksums.remote()) == [checksums_of(new_weights)] * 2

        # A bad tensor: both engines reject it, nothing switches, the group stays usable.
        bad = dict(old_weights, **{"model.norm.weight": torch.ones(3)})
        with pytest.raises(RefitError, match="model.norm.weight"):
            ray.get(sync.update_weights.remote(bad, "bad"))
        assert versions([a, b]) == ["step-1"] * 2 and remote_run(a) == expected_new

        # Engine c cannot take the update while a can: neither switches.
        with pytest.raises(RefitError, match="engine 1"):
            ray.get(mixed.update_weights.remote(old_weights, "step-2"))
        assert versions([a, c]) == ["step-1", "default"]
        assert remote_run(a) == expected_new

        # A state dict, through the first group again.
        ray.get(sync.update_weights.remote(old_weights, "step-2"))
        assert versions([a, b]) == ["step-2"] * 2
        assert remote_run(a) == remote_run(b) == expected_old
    finally:
        ray.get([sync.close.remote(), mixed.close.remote()])
        for actor in (sync, mixed, a, b, c):
            ray.kill(actor)
