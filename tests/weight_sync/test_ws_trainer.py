"""Trainer-side helpers: named tensors from a module / state dict."""

from __future__ import annotations

import pytest
import torch

from weight_sync import named_tensors_of


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
