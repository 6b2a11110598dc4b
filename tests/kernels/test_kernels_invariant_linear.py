"""The start-up proof behind deterministic mode's BLAS matmul on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.invariant_linear import padded_linear, rows_invariant


def test_probe_passes_here_and_padding_matters():
    assert rows_invariant(64, 96, torch.float32, torch.get_num_threads())
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(7, 64)
    alone = torch.cat([padded_linear(x[i : i + 1], w) for i in range(7)])
    assert torch.equal(padded_linear(x, w), alone)
    torch.testing.assert_close(padded_linear(x, w), F.linear(x, w))


def test_bias_and_shapes():
    torch.manual_seed(1)
    w, b, x = torch.randn(10, 8), torch.randn(10), torch.randn(3, 8)
    out = padded_linear(x, w, b)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, F.linear(x, w, b))
