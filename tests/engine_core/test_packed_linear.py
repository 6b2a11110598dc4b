"""The engine's packed-weight matmul (``engine_core.layers.packed_linear``): packs follow every
write of the weights (refit, release/resume, and any in-place write as a safety net), the
kernel runs at every row count, and the packs are counted and freed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_core import Engine
from engine_core.layers.linear import ColumnParallelLinear
from engine_core.layers.packed_linear import PackedLinear
from engine_core.parallel import TPContext
from kernels import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="no C compiler / AVX2+FMA")

GREEDY = {"max_new_tokens": 6, "temperature": 0.0}


def _layer(op: PackedLinear, seed: int = 0) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(24, 40, True, TPContext(), op)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 24, generator=gen))
        layer.bias.copy_(torch.randn(40, generator=gen))
    return layer


def test_the_kernel_at_every_row_count():
    layer = _layer(PackedLinear())
    for rows in (1, 8, 300):  # prefill sizes too: no BLAS hand-off
        x = torch.randn(rows, 24)
        assert torch.equal(layer(x), cpu_linear.linear(x, layer.weight, layer.bias))


def test_a_pack_follows_every_write_of_its_weight():
    op = PackedLinear()
    layer = _layer(op)
    x = torch.randn(3, 24)
    before = layer(x)
    with torch.no_grad():
        layer.weight.narrow(0, 0, 5).mul_(2.0)  # in place through a view (as a refit copies)
    after = layer(x)
    assert not torch.equal(after[:, :5], before[:, :5]) and torch.equal(after[:, 5:], before[:, 5:])
    assert torch.equal(after, cpu_linear.linear(x, layer.weight, layer.bias))
    layer.weight.data = torch.randn(40, 24)  # rebinding (adoption, resume)
    assert torch.equal(layer(x), cpu_linear.linear(x, layer.weight, layer.bias))
    assert op.nbytes == 3 * 24 * cpu_linear.PANEL * 4  # one pack, the stale ones dropped


def test_refresh_packs_the_layers_that_use_the_op_and_release_frees_them():
    op = PackedLinear()
    mine, other = _layer(op), ColumnParallelLinear(24, 40, False, TPContext(), F.linear)
    model = torch.nn.Sequential(mine, other)
    op.refresh(model)
    assert op.nbytes == 3 * 24 * cpu_linear.PANEL * 4
    assert op.release() == 3 * 24 * cpu_linear.PANEL * 4 and op.nbytes == 0


def test_engine_packs_at_load_and_refit_and_frees_them_with_the_weights(model_dir):
    path = model_dir("llama")
    with Engine(path, device="cpu", page_size=4) as engine:
        rank = engine.runner
        packed = rank.packed
        assert isinstance(packed, PackedLinear) and packed.nbytes > 0  # at load, not on first use
        params = sum(p.nbytes for p in rank.model.parameters())
        assert rank.memory_bytes()["weights"] == params + packed.nbytes
        prompt = [1, 5, 9, 13]
        first = engine.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"]
        freed = engine.release_memory_occupation(["weights"])
        assert packed.nbytes == 0 and freed["freed_bytes"]["weights"] >= params
        engine.resume_memory_occupation(["weights"])  # the checkpoint again
        assert packed.nbytes > 0
        assert engine.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"] == first
        named = [(n, torch.randn_like(p)) for n, p in rank.model.named_parameters()]
        engine.update_weights_from_tensor(named)
        changed = engine.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"]
        with Engine(path, device="cpu", page_size=4) as fresh:
            fresh.update_weights_from_tensor(named)
            want = fresh.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"]
        assert changed == want and changed != first
