"""``weight_dtype="int8"`` on CPU: the matmul reads int8 packs of the matrices (symmetric, one
scale per output row), compute in fp32; the parameters stay fp32. Oracle: an fp32 engine on
the checkpoint whose matrices were quantized and dequantized by the same formula (computed
here, independently of the kernel) computes the same function up to fp32 summation noise;
against the unquantized weights the difference is the quantization's (bounded here, measured
on the default model in docs/PERFORMANCE.md). Refits re-quantize; deterministic mode stays
batch invariant."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bf16_weights import PROMPTS, logprobs, max_gap

from engine_core import Engine
from kernels import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="no C compiler / AVX2+FMA")


def dequantized(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale).clamp(-127, 127) * scale


def dequantized_copy(src: str, dst: str) -> str:
    """The checkpoint with every matmul weight quantized and dequantized (the embedding
    table stays: lookups read the fp32 parameter)."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {
        n: dequantized(t) if t.dim() == 2 and "embed_tokens" not in n else t
        for n, t in tensors.items()
    }
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_int8_weights_compute_the_dequantized_model(model_dir, tmp_path):
    path = model_dir("llama")  # untied embeddings: the LM head is a matmul weight of its own
    with Engine(path, device="cpu", weight_dtype="int8") as narrow:
        rank = narrow.ranks.local
        assert {p.dtype for p in rank.model.parameters()} == {torch.float32}
        matrices = sum(p.nbytes for p in rank.model.parameters() if p.dim() == 2)
        embed = rank.model.model.embed_tokens.weight.nbytes
        assert rank.packed.nbytes < 0.3 * (matrices - embed) + 4 * 2 * matrices // 64
        got = logprobs(narrow)
    with Engine(dequantized_copy(path, str(tmp_path / "d")), device="cpu") as reference:
        assert max_gap(got, logprobs(reference)) < 1e-4
    with Engine(path, device="cpu") as full:
        full_out = logprobs(full)
    gaps = [abs(x - y) for (_, a), (_, b) in zip(got, full_out) for x, y in zip(a, b)]
    assert 0 < max(gaps) < 0.1, max(gaps)


def test_refit_requantizes(model_dir):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    tensors = load_file(os.path.join(new, "model.safetensors"))
    with Engine(new, device="cpu", weight_dtype="int8") as fresh:
        want = logprobs(fresh)
    with Engine(old, device="cpu", weight_dtype="int8", refit_errors="raise") as engine:
        before = logprobs(engine)
        engine.update_weights_from_tensor(tensors, weight_version="v1")
        assert logprobs(engine) == want != before
        engine.update_weights_from_disk(old)
        assert logprobs(engine) == before


def test_deterministic_int8_weights_are_batch_invariant(model_dir):
    with Engine(model_dir("qwen3"), device="cpu", weight_dtype="int8", deterministic=True) as e:
        assert "int8" in e.get_server_info()["deterministic_matmul"]
        alone = [logprobs(e, [p])[0] for p in PROMPTS]
        assert logprobs(e) == alone
