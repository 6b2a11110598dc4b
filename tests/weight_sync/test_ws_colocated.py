"""Colocated shared-memory transport: cross-process bitwise round trip and no leaks."""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path

import pytest
import torch
from ws_workers import Collector, big_named, make_named, mismatches, run_world

from weight_sync import (
    ColocatedBuckets,
    SegmentPool,
    iter_colocated,
    list_segments,
    load_colocated,
    open_bucket,
    push_colocated,
    remove_segments,
)


def _named() -> dict[str, torch.Tensor]:
    named = make_named(seed=21)
    named.update(big_named(seed=22, n=2, numel=1 << 18))  # 1 MiB each
    return named


def _engine(rank: int, workdir: str, handles_blob: bytes) -> dict:
    """Child process: map the buckets, copy the tensors out, compare with the expected data."""
    handles = pickle.loads(handles_blob)
    collector = Collector()
    loaded = load_colocated(handles, collector)
    bad = mismatches(collector.tensors, _named())
    return {"loaded": loaded, "calls": collector.calls, "bad": bad}


def test_colocated_roundtrip_in_a_second_process_leaves_no_shm(tmp_path: Path) -> None:
    prefix = f"rlr-test-{uuid.uuid4().hex[:12]}"
    named = _named()
    with ColocatedBuckets(named, prefix, bucket_bytes=64 << 10, weight_version=5) as buckets:
        assert len(buckets.handles) >= 4
        assert list_segments(prefix) == sorted(buckets.segment_names)
        blob = pickle.dumps(buckets.handles)
        data_bytes = sum(t.numel() * t.element_size() for t in named.values())
        assert len(blob) < data_bytes / 50  # handles carry metadata, not the tensors
        (result,) = run_world(_engine, 1, tmp_path, (blob,), timeout_s=60)
    assert result["ok"], result
    assert result["data"] == {"loaded": len(named), "calls": len(buckets.handles), "bad": []}
    assert list_segments(prefix) == []


def test_views_stay_valid_after_the_owner_closes() -> None:
    prefix = f"rlr-test-{uuid.uuid4().hex[:12]}"
    named = {"w": torch.arange(6.0).reshape(2, 3)}
    buckets = ColocatedBuckets(named, prefix)
    (pairs,) = [open_bucket(h) for h in buckets.handles]
    buckets.close()
    buckets.close()  # idempotent
    assert list_segments(prefix) == []
    assert torch.equal(pairs[0][1], named["w"])  # mapping lives as long as the view


def test_push_colocated_releases_segments_when_apply_fn_raises() -> None:
    prefix = f"rlr-test-{uuid.uuid4().hex[:12]}"
    seen: list[str] = []

    def apply_fn(handles) -> None:
        seen.extend(list_segments(prefix))
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError, match="engine died"):
        push_colocated(make_named(seed=2), prefix, apply_fn, bucket_bytes=1024)
    assert len(seen) >= 2 and list_segments(prefix) == []


def test_push_colocated_in_process_roundtrip() -> None:
    prefix = f"rlr-test-{uuid.uuid4().hex[:12]}"
    named = make_named(seed=3)
    collector = Collector()
    loaded = push_colocated(named, prefix, lambda h: load_colocated(h, collector), 2048)
    assert loaded == len(named) and mismatches(collector.tensors, named) == []
    assert list_segments(prefix) == []


def test_name_collision_fails_cleanly_and_stale_segments_can_be_removed() -> None:
    prefix = f"rlr-test-{uuid.uuid4().hex[:12]}"
    stale = Path("/dev/shm") / f"{prefix}-1"
    stale.write_bytes(b"old")
    try:
        with pytest.raises(FileExistsError):
            ColocatedBuckets(make_named(seed=4), prefix, bucket_bytes=1024)
        assert list_segments(prefix) == [stale.name]  # bucket 0 was created then released
    finally:
        assert remove_segments(prefix) == [stale.name]
    assert list_segments(prefix) == []


def test_invalid_prefix_is_rejected() -> None:
    with pytest.raises(ValueError, match="invalid shared-memory name"):
        ColocatedBuckets({"w": torch.ones(1)}, "../etc/evil")


def test_iter_colocated_views_survive_across_buckets_and_close() -> None:
    prefix = f"rlr-test-{uuid.uuid4().hex[:12]}"
    named = make_named(seed=5)
    with ColocatedBuckets(named, prefix, bucket_bytes=512, weight_version="v5") as buckets:
        assert len(buckets.handles) >= 3 and buckets.handles[0].weight_version == "v5"
        got = dict(iter_colocated(buckets.handles))  # keeps every view past its bucket
    assert list_segments(prefix) == []
    assert mismatches(got, named) == []


def test_pool_reuses_segments_across_updates_and_unlinks_at_close() -> None:
    prefix = f"rlr-test-{uuid.uuid4().hex[:12]}"
    pool = SegmentPool()
    inodes = []
    for seed in (1, 2, 3):
        named = make_named(seed=seed)
        with ColocatedBuckets(named, prefix, bucket_bytes=1 << 10, pool=pool) as buckets:
            got = dict(iter_colocated(buckets.handles))
            assert mismatches(got, named) == []
            inodes.append(sorted(os.stat(f"/dev/shm/{n}").st_ino for n in buckets.segment_names))
            del got
        assert list_segments(prefix) == pool.segment_names != []  # kept for the next update
    assert inodes[0] == inodes[1] == inodes[2]  # the same files, not recreated
    pool.close()
    pool.close()  # idempotent
    assert list_segments(prefix) == []


def test_pool_drops_segments_of_a_failed_update_and_of_old_layouts() -> None:
    prefix = f"rlr-test-{uuid.uuid4().hex[:12]}"
    pool = SegmentPool()
    named = make_named(seed=1)
    with ColocatedBuckets(named, prefix, bucket_bytes=1 << 10, pool=pool) as buckets:
        many = buckets.segment_names
    with pytest.raises(RuntimeError, match="no ack"):
        with ColocatedBuckets(named, prefix, bucket_bytes=1 << 10, pool=pool) as buckets:
            raise RuntimeError("no ack")  # an engine may still read: never refill these pages
    assert list_segments(prefix) == [] and pool.segment_names == []
    with ColocatedBuckets(named, prefix, bucket_bytes=1 << 30, pool=pool) as buckets:
        assert len(buckets.segment_names) < len(many)
    assert list_segments(prefix) == sorted(buckets.segment_names)  # the larger layout is gone
    pool.close()
    assert list_segments(prefix) == []
