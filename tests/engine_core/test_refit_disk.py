"""Refit from disk: atomic, versioned, equal to a fresh engine on the new weights."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_core import Engine, ModelLoadError

GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 4, 3]]


def run(engine: Engine) -> list:
    # Drop the prefix cache: in default mode a cache hit changes the last bits of logprobs
    # (another batch computed the shared KV); these tests compare weights through outputs.
    engine.flush_cache()
    outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    return [
        (o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]])
        for o in outs
    ]


def test_refit_from_disk_equals_fresh_engine(model_dir):
    old, new = model_dir("qwen3"), model_dir("qwen3", seed=1)
    with Engine(new, device="cpu", refit_errors="raise") as fresh:
        expected = run(fresh)
    with Engine(old, device="cpu", refit_errors="raise") as engine:
        before = run(engine)
        result = engine.update_weights_from_disk(new, weight_version="step-1")
        assert result == (
            True,
            "Succeeded to update model weights. Weight version updated to step-1.",
            0,
        )
        assert engine.weight_version == "step-1"
        after = run(engine)
        out = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
    assert after == expected and before != expected
    assert out["meta_info"]["weight_version"] == "step-1"
    assert out["meta_info"]["weight_versions"] == ["step-1"] * 10


def test_failed_refit_leaves_weights_and_version(model_dir, tmp_path):
    old = model_dir("llama")
    bad = str(tmp_path / "bad")
    shutil.copytree(model_dir("llama", seed=1), bad)
    file = os.path.join(bad, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)  # last-ish tensor is bad
    save_file(tensors, file, metadata={"format": "pt"})
    with Engine(old, device="cpu", refit_errors="raise") as engine:
        before = run(engine)
        snapshot = {k: v.clone() for k, v in engine.runner.model.state_dict().items()}
        with pytest.raises(ModelLoadError, match="down_proj"):
            engine.update_weights_from_disk(bad, weight_version="v2")
        assert engine.weight_version == "default"
        for key, value in engine.runner.model.state_dict().items():
            assert torch.equal(value, snapshot[key]), key
        assert run(engine) == before


def test_get_weights_by_name(model_dir):
    path = model_dir("llama")
    ref = load_file(os.path.join(path, "model.safetensors"))
    with Engine(path, device="cpu", refit_errors="raise") as engine:
        for name in (
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.norm.weight",
            "lm_head.weight",
        ):
            got = engine.get_weights_by_name(name, truncate_size=50)
            assert got == ref[name][:50].tolist(), name  # SGLang's shape: rows of dim 0
        with pytest.raises(ModelLoadError, match="nope"):
            engine.get_weights_by_name("model.nope.weight")
