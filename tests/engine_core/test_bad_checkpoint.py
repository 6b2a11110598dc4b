"""A bad engine config or checkpoint raises a typed error naming what is wrong, at
construction; a sharded checkpoint loads like the single-file one."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_core import Engine, InvalidConfigError, ModelLoadError

OK = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}


def test_bad_config(model_dir):
    with pytest.raises(InvalidConfigError, match="page_size"):
        Engine(model_dir("llama"), device="cpu", page_size=0)
    with pytest.raises(InvalidConfigError, match="dtype"):
        Engine(model_dir("llama"), device="cpu", dtype="int8")
    with pytest.raises(InvalidConfigError, match="not_an_option"):
        Engine(model_dir("llama"), device="cpu", not_an_option=1)


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(model_dir, tmp_path):
    path = _copy(model_dir("llama"), str(tmp_path / "m"))
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ModelLoadError, match="GPTNeoXForCausalLM"):
        Engine(path, device="cpu")


def _edit_weights(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_weight_named(model_dir, tmp_path):
    path = _copy(model_dir("llama"), str(tmp_path / "m"))
    _edit_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"model.layers.1.mlp.gate_up_proj.weight\[1\]"):
        Engine(path, device="cpu")


def test_shape_mismatch_named(model_dir, tmp_path):
    path = _copy(model_dir("llama"), str(tmp_path / "m"))

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)

    _edit_weights(path, shrink)
    with pytest.raises(ModelLoadError, match="model.layers.0.self_attn.k_proj.weight"):
        Engine(path, device="cpu")


def test_unexpected_weight_named(model_dir, tmp_path):
    path = _copy(model_dir("llama"), str(tmp_path / "m"))
    _edit_weights(path, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match="model.layers.0.extra.weight"):
        Engine(path, device="cpu")


def test_corrupt_and_missing_weights_file(model_dir, tmp_path):
    path = _copy(model_dir("llama"), str(tmp_path / "m"))
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        Engine(path, device="cpu")
    os.remove(file)
    with pytest.raises(ModelLoadError, match="missing weights file"):
        Engine(path, device="cpu")


def test_sharded_checkpoint_loads(model_dir, tmp_path):
    src = model_dir("qwen2")
    path = _copy(src, str(tmp_path / "m"))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(
            {n: tensors[n] for n in part}, os.path.join(path, fname), metadata={"format": "pt"}
        )
        weight_map.update({n: fname for n in part})
    json.dump(
        {"weight_map": weight_map}, open(os.path.join(path, "model.safetensors.index.json"), "w")
    )
    with Engine(src, device="cpu") as a, Engine(path, device="cpu") as b:
        assert (
            a.generate(input_ids=[1, 2, 3], sampling_params=OK)["output_ids"]
            == b.generate(input_ids=[1, 2, 3], sampling_params=OK)["output_ids"]
        )
