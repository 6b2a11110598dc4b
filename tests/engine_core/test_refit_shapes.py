"""Every tensor of a refit or a checkpoint must have its HF shape exactly and real values to
copy: a q/k/v part with extra rows, an embedding or LM head with too few or too many vocab
rows, a meta / sparse / integer tensor is refused by name before anything is written (the
loader once cut such tensors to the rows it wanted, or failed halfway through the copy)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_core import Engine, ModelLoadError

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.1.self_attn.k_proj.weight"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _bad(name: str, shape_of: dict[str, tuple[int, ...]], how: str) -> torch.Tensor:
    rows, *rest = shape_of[name]
    if how == "rows+1":
        return torch.randn(rows + 1, *rest)
    if how == "rows-1":
        return torch.randn(rows - 1, *rest)
    if how == "double":
        return torch.randn(2 * rows, *rest)
    if how == "one-row":
        return torch.randn(1, *rest)
    if how == "meta":
        return torch.empty(rows, *rest, device="meta")
    if how == "sparse":
        return torch.randn(rows, *rest).to_sparse()
    assert how == "int"
    return torch.ones(rows, *rest, dtype=torch.int32)


CASES = [
    (Q, "rows+1", "shape"),
    (K, "double", "shape"),
    (K, "rows-1", "shape"),
    (EMBED, "rows-1", "shape"),
    (EMBED, "double", "shape"),
    (HEAD, "one-row", "shape"),
    (HEAD, "rows+1", "shape"),
    (K, "meta", "meta device"),
    (EMBED, "sparse", "layout"),
    (Q, "int", "floating point"),
]


@pytest.mark.parametrize(("name", "how", "message"), CASES)
def test_a_wrong_tensor_refit_is_refused_before_any_write(model_dir, name, how, message):
    path = model_dir("llama")  # untied: the LM head is its own tensor
    with Engine(path, device="cpu", refit_errors="raise", skip_tokenizer_init=True) as engine:
        state = engine.runner.model.state_dict()
        shape_of = {EMBED: (320, 64), HEAD: (320, 64), Q: (64, 64), K: (32, 64)}
        snap = {k: v.clone() for k, v in state.items()}
        before = engine.generate(input_ids=[[3, 1, 4]], sampling_params=GREEDY)[0]["output_ids"]
        # A good tensor first, so a refit that wrote as it went would show it.
        good = (Q, torch.randn(64, 64)) if name != Q else (K, torch.randn(32, 64))
        bad = (name, _bad(name, shape_of, how))
        with pytest.raises(ModelLoadError, match=f"{name}.*{message}"):
            engine.update_weights_from_tensor([good, bad], weight_version="bad")
        assert engine.weight_version == "default"
        for key, value in engine.runner.model.state_dict().items():
            assert torch.equal(value, snap[key]), key
        engine.flush_cache()
        after = engine.generate(input_ids=[[3, 1, 4]], sampling_params=GREEDY)[0]["output_ids"]
        assert after == before
        ok, _ = engine.update_weights_from_tensor([good], weight_version="v1")
        assert ok and engine.weight_version == "v1"


@pytest.mark.parametrize(("name", "rows"), [(EMBED, 300), (Q, 65), (K, 64)])
def test_a_checkpoint_with_a_wrong_shape_is_refused(model_dir, tmp_path, name, rows):
    src = model_dir("llama")
    shutil.copytree(src, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors[name] = torch.randn(rows, tensors[name].shape[1])
    save_file(tensors, str(weights))
    with pytest.raises(ModelLoadError, match=f"{name}.*shape \\({rows}, "):
        Engine(str(tmp_path / "m"), device="cpu", skip_tokenizer_init=True)
    with Engine(src, device="cpu", refit_errors="raise", skip_tokenizer_init=True) as engine:
        with pytest.raises(ModelLoadError, match=f"{name}.*shape"):
            engine.update_weights_from_disk(str(tmp_path / "m"))
        assert engine.weight_version == "default"
