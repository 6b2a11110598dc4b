"""Wire metadata: dtype strings, validation and JSON/pickle round trips."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from ws_workers import make_named

from weight_sync import TensorMeta, UpdatePlan, dtype_from_str, dtype_to_str, metas_of, plan_buckets
from weight_sync.bucket import ALIGN_BYTES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_dtype_strings_round_trip(dtype: torch.dtype) -> None:
    text = dtype_to_str(dtype)
    assert "torch" not in text and dtype_from_str(text) is dtype


def test_bad_dtype_strings_are_rejected() -> None:
    for bad in ("Tensor", "nn", "", "float33"):
        with pytest.raises(ValueError, match="unknown dtype"):
            dtype_from_str(bad)
    with pytest.raises(ValueError, match="use 'float32'"):
        dtype_from_str("float")  # an alias: plans carry canonical names only


def _plan(version: int = 3) -> UpdatePlan:
    buckets = plan_buckets(metas_of(make_named(seed=1).items()), 1024)
    return UpdatePlan(buckets=tuple(buckets), weight_version=version)


def test_plan_json_and_pickle_round_trip() -> None:
    plan = _plan()
    text = plan.to_json()
    assert json.loads(text)["weight_version"] == 3
    assert UpdatePlan.from_json(text) == plan
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert UpdatePlan.from_json(text).fingerprint() == plan.fingerprint()
    assert _plan(version=4).fingerprint() != plan.fingerprint()


def test_plan_totals() -> None:
    named = make_named(seed=1)
    plan = _plan()
    assert plan.num_tensors == len(named) and sorted(plan.names()) == sorted(named)
    payload = sum(t.numel() * t.element_size() for t in named.values())
    # Bytes on the wire: the tensors plus the alignment gaps between them.
    assert payload <= plan.total_bytes < payload + ALIGN_BYTES * len(named)


def test_meta_validation() -> None:
    with pytest.raises(ValueError, match="numel"):
        TensorMeta("w", "float32", (2, 3), 0, 5)
    with pytest.raises(ValueError, match="negative offset"):
        TensorMeta("w", "float32", (2,), -1, 2)
    assert TensorMeta("w", "float32", [2, 3], 0, 6).shape == (2, 3)  # JSON lists accepted
    plan = _plan()
    doubled = plan.buckets + plan.buckets[:1]
    with pytest.raises(ValueError, match="duplicate"):
        UpdatePlan(buckets=doubled, weight_version=0)


def test_weight_version_may_be_a_string_but_not_a_bool() -> None:
    buckets = _plan().buckets
    plan = UpdatePlan(buckets=buckets, weight_version="step-7")
    assert UpdatePlan.from_json(plan.to_json()).weight_version == "step-7"
    assert plan.fingerprint() != UpdatePlan(buckets=buckets, weight_version="step-8").fingerprint()
    with pytest.raises(ValueError, match="weight_version"):
        UpdatePlan(buckets=buckets, weight_version=True)
