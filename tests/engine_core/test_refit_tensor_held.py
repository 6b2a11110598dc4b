"""``update_weights_from_tensor(commit=False)``: the update is validated and a private copy is
held on every rank; nothing changes until ``commit_staged_weights`` (then the engine equals a
fresh engine on the new weights) and ``discard_staged_weights`` leaves the old weights. The
caller may overwrite its tensors after the call: the held copy is what commits."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from engine_core import Engine
from engine_core.errors import ModelLoadError, RefitStateError

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4], [9, 8, 7, 6, 5]]


def run(engine: Engine) -> list:
    engine.flush_cache()  # compare weights through outputs, never through cached KV
    outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    return [
        (o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]])
        for o in outs
    ]


def weights(path: str) -> dict:
    return load_file(f"{path}/model.safetensors")


@pytest.mark.parametrize("tp_size", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_held_tensor_update_commits_only_when_asked(model_dir, tp_size):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    with Engine(new, device="cpu", tp_size=tp_size) as fresh:
        expected = run(fresh)
    with Engine(old, device="cpu", refit_errors="raise", tp_size=tp_size) as engine:
        before = run(engine)
        assert before != expected
        sent = weights(new)
        held = engine.update_weights_from_tensor(sent, weight_version="v1", commit=False)
        assert held[0] is True
        assert engine.weight_version == "default" and run(engine) == before
        with pytest.raises(RefitStateError, match="held"):
            engine.update_weights_from_tensor(sent, commit=False)
        for tensor in sent.values():  # the trainer moves on: the held copy must not follow
            tensor.zero_()
        assert engine.commit_staged_weights()["weight_version"] == "v1"
        assert run(engine) == expected

        engine.update_weights_from_tensor(weights(old), weight_version="v2", commit=False)
        assert engine.discard_staged_weights()["discarded"] is True
        assert engine.weight_version == "v1" and run(engine) == expected


def test_bad_held_tensor_update_holds_nothing(model_dir):
    old = model_dir("llama")
    with Engine(old, device="cpu", refit_errors="raise") as engine:
        before = run(engine)
        bad = weights(old)
        name = "model.layers.0.mlp.down_proj.weight"
        bad[name] = bad[name][:, :3].contiguous()
        with pytest.raises(ModelLoadError, match="down_proj"):
            engine.update_weights_from_tensor(bad, commit=False)
        assert engine.discard_staged_weights()["discarded"] is False
        with pytest.raises(RefitStateError, match="no staged update"):
            engine.commit_staged_weights()
        assert run(engine) == before
