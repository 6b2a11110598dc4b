"""The refit helpers in weight_sync: checksums and the staging arena (a sender thread and a
receiver in one process, over a real gloo group)."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch
from ws_workers import bitwise_equal, make_named

from weight_sync import WeightSender, WeightSyncError, create_group, free_port
from weight_sync.checksum import checksums_of, tensor_checksum
from weight_sync.staging import StagingArena, tensor_buckets


def test_tensor_checksum_is_sha256_of_the_bytes():
    t = torch.randn(4, 6)
    assert tensor_checksum(t) == hashlib.sha256(t.numpy().tobytes()).hexdigest()
    assert tensor_checksum(t.t()) == tensor_checksum(t.t().contiguous())  # layout-independent
    flipped = t.clone()
    flipped.view(torch.int32)[2, 3] ^= 1  # one bit
    assert tensor_checksum(flipped) != tensor_checksum(t)
    named = make_named(seed=3)  # bf16, fp16, int64, 0-d and empty tensors
    sums = checksums_of(named)
    assert sums == checksums_of(list(named.items())) and len(set(sums.values())) == len(named)
    assert checksums_of({"x": t.half()}, dtype=torch.float32) != checksums_of({"x": t.half()})


def test_tensor_buckets_accept_sglang_dtype_spellings():
    buckets = tensor_buckets([("a", "torch.bfloat16", [2, 3]), ("b", torch.int64, ())])
    assert [(b.dtype, b.numel) for b in buckets] == [("bfloat16", 6), ("int64", 1)]
    with pytest.raises(ValueError, match="dtype"):
        tensor_buckets([("a", "float", [2])])


def _world():
    port = free_port()
    box: dict = {}
    joiner = threading.Thread(
        target=lambda: box.update(g=create_group("127.0.0.1", port, 0, 2, "t", timeout_s=20))
    )
    joiner.start()
    receiver = create_group("127.0.0.1", port, 1, 2, "t", timeout_s=20)
    joiner.join()
    return box["g"], receiver


def test_arena_receives_whole_updates_and_is_reused():
    send_group, recv_group = _world()
    sender = WeightSender(send_group, bucket_bytes=1024)
    arena = StagingArena()
    try:
        pointers = []
        for seed in (1, 2):
            named = make_named(seed)
            plan = sender.plan(named, seed)
            thread = threading.Thread(target=sender.send, args=(named, plan))
            thread.start()
            pairs = arena.receive(recv_group, plan)
            thread.join()
            assert [n for n, _ in pairs] == plan.names()
            assert all(bitwise_equal(t, named[n]) for n, t in pairs)
            assert all(t.data_ptr() % t.element_size() == 0 for _, t in pairs)
            pointers.append(arena._buffer.data_ptr())
        assert pointers[0] == pointers[1]  # same arena, no new allocation

        # A sender abort (a tensor that does not match the plan) reaches the receiver at once.
        named = make_named(3)
        plan = sender.plan(named, 3)
        named["model.token_ids"] = torch.zeros(8, dtype=torch.int64)
        errors: list = []
        thread = threading.Thread(target=lambda: _capture(errors, sender.send, named, plan))
        thread.start()
        with pytest.raises(WeightSyncError, match="sender aborted"):
            arena.receive(recv_group, plan)
        thread.join()
        assert errors and isinstance(errors[0], ValueError)
    finally:
        arena.close()
        assert arena.nbytes == 0
        send_group.destroy()
        recv_group.destroy()


def _capture(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:
        errors.append(exc)
