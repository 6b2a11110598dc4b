"""The C linear kernel (``kernels/cpu_linear.py``) against a float64 torch reference, and its
batch invariance: every row bitwise equal to the same row computed alone, whatever the number
of rows, the other rows or the thread count."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="no C compiler / AVX2+FMA")


def reference(x, w, b=None):
    out = x.double() @ w.double().T
    return (out if b is None else out + b.double()).float()


def operands(m, n, k, seed, wdtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen).to(wdtype)
    b = torch.randn(n, generator=gen)
    return x, w, b


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 37),
    n=st.integers(1, 130),
    k=st.integers(1, 80),
    bias=st.booleans(),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_the_float64_reference(m, n, k, bias, bf16, seed):
    x, w, b = operands(m, n, k, seed, torch.bfloat16 if bf16 else torch.float32)
    b = b if bias else None
    out = cpu_linear.linear(x, w, b)
    assert out.shape == (m, n) and out.dtype == torch.float32
    want = reference(x, w.float(), b)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * k**0.5)


@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (576, 3072), (67, 101)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_rows_are_batch_invariant(k, n, wdtype):
    x, w, b = operands(150, n, k, 7, wdtype)
    alone = torch.cat([cpu_linear.linear(x[i : i + 1], w, b) for i in range(len(x))])
    for rows in (1, 2, 3, 4, 5, 7, 9, 16, 33, 70, 97, 150):
        assert torch.equal(cpu_linear.linear(x[:rows], w, b), alone[:rows]), rows
    # A row's value does not depend on its neighbours either.
    shuffled = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))]
    again = cpu_linear.linear(shuffled, w, b)
    for i in range(len(x)):
        j = int((shuffled == x[i]).all(dim=1).nonzero()[0])
        assert torch.equal(again[j], alone[i])


def test_rows_do_not_depend_on_the_thread_count():
    x, w, b = operands(19, 300, 576, 3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_linear.linear(x, w, b)
        torch.set_num_threads(2)
        two = cpu_linear.linear(x, w, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_leading_dims_and_strided_inputs():
    x, w, b = operands(12, 40, 24, 5)
    out = cpu_linear.linear(x.reshape(3, 4, 24), w, b)
    assert out.shape == (3, 4, 40)
    assert torch.equal(out.reshape(12, 40), cpu_linear.linear(x, w, b))
    wide = torch.randn(12, 48)[:, ::2]  # not contiguous
    torch.testing.assert_close(cpu_linear.linear(wide, w), reference(wide, w), rtol=1e-5, atol=1e-4)


def test_packed_once_equals_packed_per_call():
    """The engine packs once, a trainer per call: the same bits either way."""
    for wdtype in (torch.float32, torch.bfloat16):
        x, w, b = operands(13, 37, 50, 9, wdtype)  # 37 outputs: a partial last panel
        packed = cpu_linear.pack(w)
        assert packed.panels.shape == (3, 50, cpu_linear.PANEL)
        assert packed.panels.dtype == wdtype and packed.nbytes == packed.panels.nbytes
        assert not packed.panels[2, :, 37 - 32 :].any()  # outputs past N are zero
        assert torch.equal(cpu_linear.packed_linear(x, packed, b), cpu_linear.linear(x, w, b))
    assert cpu_linear.supports(x, w) and not cpu_linear.supports(x.double(), w)


def test_packed_linear_refuses_mismatched_input():
    """A wrong feature count or dtype is refused by name before the kernel reads past x."""
    packed = cpu_linear.pack(torch.randn(20, 8))
    with pytest.raises(ValueError, match="x has 9 features, weight 20x8"):
        cpu_linear.packed_linear(torch.randn(3, 9), packed)
    with pytest.raises(ValueError, match="fp32 CPU input"):
        cpu_linear.packed_linear(torch.randn(3, 8, dtype=torch.float64), packed)
    with pytest.raises(ValueError, match="bias has 19 values, weight has 20 outputs"):
        cpu_linear.packed_linear(torch.randn(3, 8), packed, torch.zeros(19))
    x3 = torch.randn(2, 3, 8)  # leading dims still come back
    assert cpu_linear.packed_linear(x3, packed).shape == (2, 3, 20)
