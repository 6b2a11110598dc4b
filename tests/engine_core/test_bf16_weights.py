"""``weight_dtype="bfloat16"`` on CPU: matrices stored in bf16, compute in fp32 (the C linear
kernel reads bf16 directly). Oracle: an fp32 engine on the same weights rounded to bf16 first
computes the same function, so their logprobs agree to fp32 summation noise; against the
unrounded weights the difference is the rounding's (bounded here, measured in
docs/PERFORMANCE.md). Refits round the trainer's fp32 tensors the same way; deterministic mode
stays batch invariant."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_core import Engine
from engine_core.errors import InvalidConfigError
from kernels import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="no C compiler / AVX2+FMA")
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], [20, 21, 22, 23, 24, 25, 26]]


def logprobs(engine: Engine, prompts=PROMPTS) -> list[tuple[list[int], list[float]]]:
    engine.flush_cache()
    outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    return [
        (o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]])
        for o in outs
    ]


def rounded_copy(src: str, dst: str) -> str:
    """The checkpoint with every matrix rounded to bf16 (and stored as fp32 again)."""
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    rounded = {n: t.to(torch.bfloat16).float() if t.dim() == 2 else t for n, t in tensors.items()}
    save_file(rounded, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def max_gap(a, b) -> float:
    assert [ids for ids, _ in a] == [ids for ids, _ in b]
    return max(abs(x - y) for (_, la), (_, lb) in zip(a, b) for x, y in zip(la, lb))


def test_bf16_weights_compute_the_rounded_model(model_dir, tmp_path):
    path = model_dir("llama")
    with Engine(path, device="cpu", weight_dtype="bfloat16") as narrow:
        model = narrow.ranks.local.model
        kinds = {p.dtype for n, p in model.named_parameters() if p.dim() == 2}
        assert kinds == {torch.bfloat16}
        assert {p.dtype for p in model.parameters() if p.dim() == 1} == {torch.float32}
        got = logprobs(narrow)
    with Engine(rounded_copy(path, str(tmp_path / "r")), device="cpu") as rounded:
        assert max_gap(got, logprobs(rounded)) < 1e-4
    with Engine(path, device="cpu") as full:
        full_out = logprobs(full)
    # The tiny random model's logits are large; the rounding moves its logprobs this much.
    gaps = [abs(x - y) for (_, a), (_, b) in zip(got, full_out) for x, y in zip(a, b)]
    assert max(gaps) < 0.02, max(gaps)


def test_refit_rounds_trainer_tensors_like_a_load(model_dir, tmp_path):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    tensors = load_file(os.path.join(new, "model.safetensors"))
    with Engine(new, device="cpu", weight_dtype="bfloat16") as fresh:
        want = logprobs(fresh)
    with Engine(old, device="cpu", weight_dtype="bfloat16", refit_errors="raise") as engine:
        engine.update_weights_from_tensor(tensors, weight_version="v1")
        assert logprobs(engine) == want
        engine.update_weights_from_disk(old)
        engine.update_weights_from_disk(new)
        assert logprobs(engine) == want


def test_deterministic_bf16_weights_are_batch_invariant(model_dir):
    path = model_dir("llama")
    with Engine(path, device="cpu", weight_dtype="bfloat16", deterministic=True) as engine:
        info = engine.get_server_info()
        assert "bf16" in info["deterministic_matmul"]
        alone = [logprobs(engine, [p])[0] for p in PROMPTS]
        assert logprobs(engine) == alone


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_dtype": "int4"},
        {"weight_dtype": "bfloat16", "dtype": "bfloat16"},
        {"weight_dtype": "int8", "dtype": "bfloat16"},
    ],
)
def test_bad_weight_dtype_is_refused_by_name(kwargs):
    with pytest.raises(InvalidConfigError, match="weight_dtype"):
        Engine("/nonexistent", device="cpu", **kwargs)
