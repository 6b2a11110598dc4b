"""Trainer-side helpers: named tensors from a module / state dict."""

from __future__ import annotations

import pytest
import torch

from weight_sync import (
    WeightSender,
    create_group,
    flatten_parameters,
    free_port,
    named_tensors_of,
    pack,
    plan_buckets,
)
from weight_sync.bucket import ALIGN_BYTES, contiguous_span


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.register_buffer("running", torch.ones(3))
        self.register_buffer("rope_cache", torch.zeros(5), persistent=False)


def test_module_names_skip_non_persistent_buffers_and_strip_wrappers() -> None:
    wrapped = torch.nn.Sequential()
    wrapped.add_module("module", _Block())  # same naming as DDP's wrapper
    named = dict(named_tensors_of(wrapped))
    assert list(named) == ["running", "proj.weight", "proj.bias"]  # state_dict order
    assert all(not t.requires_grad for t in named.values())
    block = wrapped.module
    assert named["proj.weight"].data_ptr() == block.proj.weight.data_ptr()  # no copy


def test_state_dict_input_is_made_contiguous() -> None:
    weight = torch.randn(4, 6)
    named = dict(named_tensors_of({"model.w": weight.t()}))
    assert named["model.w"].is_contiguous() and torch.equal(named["model.w"], weight.t())


def test_bad_inputs_raise() -> None:
    with pytest.raises(TypeError, match="expected a tensor"):
        named_tensors_of({"w": 3.0})
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        named_tensors_of([torch.ones(1)])
    with pytest.raises(ValueError, match="two entries"):
        named_tensors_of({"module.w": torch.ones(1), "w": torch.ones(1)})


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.scale = torch.nn.Parameter(torch.randn(3, dtype=torch.float16))


def test_tied_weights_are_sent_once_unless_asked() -> None:
    model = _Tied()
    names = [n for n, _ in named_tensors_of(model)]
    assert "embed.weight" in names and "head.weight" not in names
    assert "head.weight" in [n for n, _ in named_tensors_of(model, dedupe_tied=False)]


def test_flatten_parameters_keeps_values_and_identity_and_sends_without_packing() -> None:
    torch.manual_seed(0)
    model = _Tied()
    before = {n: t.clone() for n, t in named_tensors_of(model)}
    params = list(model.parameters())
    flats = flatten_parameters(model)
    assert set(flats) == {torch.float32, torch.float16}
    assert list(model.parameters()) == params  # same objects (optimizers keep working)
    after = dict(named_tensors_of(model))
    assert all(torch.equal(after[n], t) for n, t in before.items())
    flat32 = flats[torch.float32]
    start, end = flat32.data_ptr(), flat32.data_ptr() + 4 * flat32.numel()
    for t in after.values():
        assert t.data_ptr() % ALIGN_BYTES == 0  # laid out like the plan (aligned)
        if t.dtype == torch.float32:
            assert start <= t.data_ptr() < end

    # An optimizer step lands in the flat buffer.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.norm.weight.grad = torch.ones(4)
    opt.step()
    assert torch.equal(dict(named_tensors_of(model))["norm.weight"], before["norm.weight"] - 0.1)

    # The plan merges the flat buffer into one bucket per dtype (beyond bucket_bytes), and
    # every bucket is a view of the trainer's memory: nothing to pack.
    with create_group("127.0.0.1", free_port(), 0, 1, "plan-only", timeout_s=10) as group:
        sender = WeightSender(group, bucket_bytes=64)
        plan = sender.plan(named_tensors_of(model), 1)
        unmerged = sender.plan(named_tensors_of(model), 1, merge_spans=False)
    assert sorted(b.dtype for b in plan.buckets) == ["float16", "float32"]
    assert len(unmerged.buckets) > 2
    named = dict(named_tensors_of(model))
    for bucket in plan.buckets:
        span = contiguous_span([named[t.name] for t in bucket.tensors], bucket)
        assert span is not None and span.data_ptr() == flats[span.dtype].data_ptr()
        assert torch.equal(span, pack(named, bucket))  # the alignment gaps are zeros in both


def test_contiguous_span_rejects_what_must_be_packed() -> None:
    step = ALIGN_BYTES // 4  # "b" starts on the next aligned boundary
    flat = torch.arange(step + 8.0)
    a, b = flat[:4].view(2, 2), flat[step : step + 6]
    bucket = plan_buckets([("a", torch.float32, (2, 2)), ("b", torch.float32, (6,))], 1 << 20)[0]
    assert contiguous_span([a, b], bucket) is not None
    assert contiguous_span([a, flat[step + 1 : step + 7]], bucket) is None  # off the layout
    assert contiguous_span([a, flat[4:10]], bucket) is None  # packed tight: not the layout
    assert contiguous_span([a, torch.arange(6.0)], bucket) is None  # another storage
    assert contiguous_span([flat[:8].view(2, 4)[:, :2], b], bucket) is None  # not contiguous
