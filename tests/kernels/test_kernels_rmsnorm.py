"""RMSNorm: torch path equals the HF Llama formula bitwise, is batch invariant, and the Triton
kernel (interpreter) matches it."""

from __future__ import annotations

import pytest
import torch

from kernels import rms_norm
from kernels.rmsnorm import rms_norm_ref


def hf_llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` from transformers, verbatim."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ref_equals_hf_bitwise(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 3, 96, generator=gen) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    out = rms_norm_ref(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, hf_llama_rms_norm(x, w, 1e-5))
    assert torch.equal(rms_norm(x, w, 1e-5), out)  # CPU dispatch takes the torch path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [576, 1536])
def test_ref_batch_invariant(dtype, hidden):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, hidden, generator=gen).to(dtype)
    w = torch.randn(hidden, generator=gen).to(dtype)
    singles = torch.stack([rms_norm_ref(x[i : i + 1], w, 1e-6)[0] for i in range(64)])
    for m in (1, 2, 3, 8, 17, 33, 64):
        assert torch.equal(rms_norm_ref(x[:m], w, 1e-6), singles[:m]), m
        assert torch.equal(rms_norm_ref(x[-m:], w, 1e-6), singles[-m:]), m


triton = pytest.importorskip("triton")
from kernels.rmsnorm import rms_norm_triton  # noqa: E402


@pytest.mark.parametrize("hidden", [32, 48, 100])
def test_triton_matches_ref_fp32(hidden):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, hidden, generator=gen) * 2
    w = torch.randn(hidden, generator=gen)
    out = rms_norm_triton(x, w, 1e-5)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-5), atol=1e-6, rtol=1e-5)


def test_triton_matches_ref_bf16_and_strided_rows():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(5, 128, generator=gen).to(torch.bfloat16)
    x = base[:, :64]  # row stride 128, not contiguous
    w = (1 + 0.1 * torch.randn(64, generator=gen)).to(torch.bfloat16)
    out = rms_norm_triton(x, w, 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), rms_norm_ref(x, w, 1e-5).float(), atol=2e-2, rtol=1e-2)


def test_triton_batch_invariant():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 40, generator=gen)
    w = torch.randn(40, generator=gen)
    full = rms_norm_triton(x, w, 1e-6)
    for i in (0, 4, 8):
        assert torch.equal(rms_norm_triton(x[i : i + 1], w, 1e-6)[0], full[i])
