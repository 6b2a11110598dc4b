"""The refit helpers in weight_sync: checksums and the staging arena (a sender thread and a
receiver in one process, over a real gloo group)."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch
from ws_workers import bitwise_equal, make_named

from weight_sync import WeightReceiver, WeightSender, WeightSyncError, create_group, free_port
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

        def receive(seed: int, in_use=frozenset()) -> int:
            named = make_named(seed)
            plan = sender.plan(named, seed)
            thread = threading.Thread(target=sender.send, args=(named, plan))
            thread.start()
            pairs = arena.receive(recv_group, plan, in_use=in_use)
            thread.join()
            assert [n for n, _ in pairs] == plan.names()
            assert all(bitwise_equal(t, named[n]) for n, t in pairs)
            assert all(t.data_ptr() % t.element_size() == 0 for _, t in pairs)
            return pairs[0][1].untyped_storage().data_ptr()

        pointers = [receive(1), receive(2)]
        assert pointers[0] == pointers[1]  # same buffer, no new allocation
        assert len(arena.buffers()) == 1
        # A buffer still in use (e.g. adopted as parameters) is never received into again:
        # the other one is, and the two alternate (double buffering).
        second = receive(4, in_use={pointers[0]})
        assert second != pointers[0] and len(arena.buffers()) == 2
        assert receive(5, in_use={second}) == pointers[0]
        one_off = receive(6, in_use={pointers[0], second})  # both busy: a one-off buffer
        assert one_off not in (pointers[0], second) and len(arena.buffers()) == 2
        held = arena.nbytes
        assert arena.release_unused({second}) == held // 2 and arena.buffers()[0][0] == second

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


class FailingSender(WeightSender):
    """Packing bucket ``fail_at`` raises once, as if a tensor changed under the sender."""

    fail_at = 2

    def _materialize(self, named, bucket, index):
        if index == self.fail_at:
            self.fail_at = -1
            raise RuntimeError("tensor changed while packing")
        return super()._materialize(named, bucket, index)


@pytest.mark.parametrize("receiver", ["arena", "stream"])
def test_abort_mid_update_keeps_the_stream_in_sync(receiver):
    """Buckets 0-1 went out, bucket 2 fails: receivers raise 'sender aborted' (not a timeout),
    and the very next update over the same group arrives intact."""
    send_group, recv_group = _world()
    sender = FailingSender(send_group, bucket_bytes=256)
    arena, rx = StagingArena(), WeightReceiver(recv_group)
    try:
        for seed, fails in ((1, True), (2, False)):
            named = make_named(seed)
            plan = sender.plan(named, seed)
            assert len(plan.buckets) > 3
            errors: list = []
            args = (errors, sender.send, named, plan)
            thread = threading.Thread(target=_capture, args=args)
            thread.start()
            try:
                if receiver == "arena":
                    pairs = arena.receive(recv_group, plan)
                else:
                    pairs = [(n, t.clone()) for b in rx.stream(plan) for n, t in b]
            except WeightSyncError as exc:
                assert fails and "sender aborted" in str(exc) and "bucket 2/" in str(exc)
            else:
                assert not fails
                assert all(bitwise_equal(t, named[n]) for n, t in pairs)
            thread.join()
            assert bool(errors) == fails
    finally:
        arena.close()
        send_group.destroy()
        recv_group.destroy()
