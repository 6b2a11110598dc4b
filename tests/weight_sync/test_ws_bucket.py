"""Bucketing: layout planning and bitwise pack/unpack round trips (single process)."""

from __future__ import annotations

import pytest
import torch
from ws_workers import SPECS, bitwise_equal, make_named

from weight_sync import BucketMeta, metas_of, pack, plan_buckets, unpack
from weight_sync.bucket import ALIGN_BYTES
from weight_sync.spec import dtype_from_str


def _roundtrip(named: dict[str, torch.Tensor], bucket_bytes: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for bucket in plan_buckets(metas_of(named.items()), bucket_bytes):
        flat = pack(named, bucket)
        assert flat.dtype == dtype_from_str(bucket.dtype) and flat.numel() == bucket.numel
        out.update(unpack(flat, bucket))
    return out


@pytest.mark.parametrize("bucket_bytes", [1, 256, 4096, 1 << 30])
def test_pack_unpack_roundtrip_is_bitwise(bucket_bytes: int) -> None:
    named = make_named(seed=0)
    got = _roundtrip(named, bucket_bytes)
    assert list(got) != [] and set(got) == set(named)
    for name, tensor in named.items():
        assert bitwise_equal(got[name], tensor), name
    assert got["model.step"].shape == () and got["model.empty"].shape == (0, 4)


def test_roundtrip_of_non_contiguous_source() -> None:
    base = torch.randn(8, 6)
    named = {"t": base.t(), "s": base[:, 1]}  # transposed and strided views
    got = _roundtrip(named, 1 << 20)
    assert torch.equal(got["t"], base.t()) and torch.equal(got["s"], base[:, 1])


def test_buckets_are_per_dtype_and_respect_the_size_limit() -> None:
    named = make_named(seed=0)
    limit = 2048
    buckets = plan_buckets(metas_of(named.items()), limit)
    sizes = {n: t.numel() * t.element_size() for n, t in named.items()}
    for bucket in buckets:
        assert all(m.dtype == bucket.dtype for m in bucket.tensors)
        oversized = any(sizes[m.name] > limit for m in bucket.tensors)
        if oversized:
            assert len(bucket.tensors) == 1  # a big tensor travels alone
        else:
            assert bucket.nbytes <= limit
    assert sum(len(b.tensors) for b in buckets) == len(named)
    assert any(len(b.tensors) > 1 for b in buckets)  # small tensors do share buckets


def test_plan_order_is_stable_and_grouped_by_first_dtype_appearance() -> None:
    metas = metas_of(make_named(seed=0).items())
    first = plan_buckets(metas, 3000)
    assert first == plan_buckets(list(metas), 3000)
    dtypes = [b.dtype for b in first]
    assert dtypes == sorted(dtypes, key=["float32", "bfloat16", "float16", "int64"].index)
    names_in_order = [m.name for b in first for m in b.tensors]
    for dtype in ("float32", "bfloat16"):
        expected = [n for n, _, d in SPECS if str(d) == f"torch.{dtype}"]
        assert [n for n in names_in_order if n in expected] == expected


def test_pack_rejects_mismatched_tensors_before_writing() -> None:
    named = {"a": torch.ones(4), "b": torch.ones(3)}
    (bucket,) = plan_buckets(metas_of(named.items()), 1 << 20)
    out = torch.zeros(bucket.numel)
    with pytest.raises(ValueError, match="b: shape"):
        pack({"a": torch.ones(4), "b": torch.ones(2)}, bucket, out=out)
    with pytest.raises(ValueError, match="dtype"):
        pack({"a": torch.ones(4), "b": torch.ones(3, dtype=torch.float64)}, bucket, out=out)
    with pytest.raises(ValueError, match="missing"):
        pack({"a": torch.ones(4)}, bucket)
    assert torch.count_nonzero(out) == 0


def test_pack_into_larger_out_buffer_and_unpack_checks_size() -> None:
    named = {"a": torch.arange(3.0), "b": torch.arange(2.0)}
    (bucket,) = plan_buckets(metas_of(named.items()), 1 << 20)
    step = ALIGN_BYTES // 4  # "b" starts on the next aligned boundary
    assert [m.offset for m in bucket.tensors] == [0, step] and bucket.numel == step + 2
    out = torch.full((step + 10,), -1.0)
    flat = pack(named, bucket, out=out)
    assert flat.data_ptr() == out.data_ptr()
    assert flat[:3].tolist() == [0, 1, 2] and flat[step:].tolist() == [0, 1]
    assert out[step + 2 :].eq(-1).all()
    with pytest.raises(ValueError, match="elements"):
        unpack(out, bucket)


def test_every_tensor_starts_aligned_whatever_its_size() -> None:
    named = make_named(seed=0)
    for bucket_bytes in (1 << 10, 1 << 30):
        for bucket in plan_buckets(metas_of(named.items()), bucket_bytes):
            size = named[bucket.tensors[0].name].element_size()
            assert all(m.offset * size % ALIGN_BYTES == 0 for m in bucket.tensors)
            assert bucket.nbytes <= max(bucket_bytes, max(m.numel * size for m in bucket.tensors))


def test_plan_buckets_rejects_duplicates_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        plan_buckets([("a", torch.float32, (1,)), ("a", torch.float32, (2,))], 100)
    with pytest.raises(ValueError, match="positive"):
        plan_buckets([("a", torch.float32, (1,))], 0)
    with pytest.raises(ValueError, match="overlaps"):
        BucketMeta("float32", 4, [_meta("x", 0, 3), _meta("y", 2, 2)])


def _meta(name: str, offset: int, numel: int):
    from weight_sync import TensorMeta

    return TensorMeta(name, "float32", (numel,), offset, numel)
