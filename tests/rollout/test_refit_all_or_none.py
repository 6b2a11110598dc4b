"""The HTTP service's tensor refit across engines (``service_backend.commit_everywhere``): every
engine stages (``commit=False``) before any commits. Two real engines, the second unable to take
the update (another intermediate size): the first must keep its old weights and hold nothing.
The engines are in-process ``Engine``s behind the actor calling convention (``.remote``)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from engine_core import Engine
from engine_core.errors import ModelLoadError, RefitStateError
from rollout.http.service_backend import commit_everywhere

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


class AsActor:
    """``engine.method.remote(...)`` -> an awaitable running the method in a thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __getattr__(self, name: str):
        method = getattr(self.engine, name)
        return SimpleNamespace(remote=lambda *a, **k: asyncio.to_thread(method, *a, **k))


def outputs(engine: Engine) -> list:
    engine.flush_cache()
    return [o["output_ids"] for o in engine.generate(input_ids=[[3, 4, 5]], sampling_params=GREEDY)]


def refit(engines: list[AsActor], tensors: dict, version: str):
    staging = [
        e.update_weights_from_tensor.remote(tensors, weight_version=version, commit=False)
        for e in engines
    ]
    return asyncio.run(commit_everywhere(engines, staging, version, True))


def test_one_engine_failing_to_stage_leaves_every_engine_unchanged(model_dir):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    other = model_dir("llama", intermediate_size=48)
    tensors = load_file(f"{new}/model.safetensors")
    with (
        Engine(old, device="cpu", refit_errors="raise") as a,
        Engine(other, device="cpu", refit_errors="raise") as b,
    ):
        before = outputs(a), outputs(b)
        with pytest.raises(ModelLoadError, match="mlp"):
            refit([AsActor(a), AsActor(b)], tensors, "v1")
        assert (outputs(a), outputs(b)) == before
        assert a.weight_version == b.weight_version == "default"
        with pytest.raises(RefitStateError, match="no staged update"):
            a.commit_staged_weights()  # the staged copy on the first engine was discarded


def test_every_engine_commits_when_all_staged(model_dir):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    tensors = load_file(f"{new}/model.safetensors")
    with Engine(new, device="cpu") as fresh:
        want = outputs(fresh)
    with (
        Engine(old, device="cpu", refit_errors="raise") as a,
        Engine(old, device="cpu", refit_errors="raise") as b,
    ):
        answer, version = refit([AsActor(a), AsActor(b)], tensors, "v1")
        assert answer["success"] is True and version == "v1"
        assert a.weight_version == b.weight_version == "v1"
        assert outputs(a) == outputs(b) == want
