"""Failed refits: a bad name/shape/dtype, a sender that dies mid-update, a timeout. Each raises,
leaves the weights bitwise intact and the version unchanged, and the engine keeps serving."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from refit_workers import GROUP, SenderProcess, Step, tensors_for

from engine_core import Engine, ModelLoadError
from weight_sync import (
    ColocatedBuckets,
    WeightSyncError,
    WeightSyncTimeout,
    free_port,
    list_segments,
)

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
LAST = "model.layers.1.mlp.down_proj.weight"
# (mutation of one tensor, which is sent last; the message that must name it)
BAD = [
    (("rename", LAST), "unexpected weight 'model.layers.7.mlp.down_proj.weight'"),
    (("reshape", LAST), "down_proj.weight.*shape"),
    (("dtype", LAST), "down_proj.weight.*dtype torch.bfloat16"),
]


def run(engine: Engine) -> list:
    # Drop the prefix cache: in default mode a cache hit changes the last bits of logprobs
    # (another batch computed the shared KV); these tests compare weights through outputs.
    engine.flush_cache()
    outs = engine.generate(input_ids=[[3, 1, 4, 1, 5], [2, 7]], sampling_params=GREEDY)
    return [o["output_ids"] for o in outs]


def snapshot(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.runner.model.state_dict().items()}


def assert_unchanged(engine: Engine, snap: dict, before: list, version: str = "default"):
    assert engine.weight_version == version
    state = engine.runner.model.state_dict()
    assert state.keys() == snap.keys()
    for key, value in state.items():  # bitwise, not value equality
        assert torch.equal(value.view(torch.uint8), snap[key].view(torch.uint8)), key
    assert run(engine) == before


@pytest.mark.parametrize(("mutate", "message"), BAD)
def test_bad_tensor_refit_changes_nothing(model_dir, mutate, message):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    named = tensors_for(Step(new, "bad", mutate=mutate))
    assert list(named)[-1].endswith("mlp.down_proj.weight")  # every good tensor staged first
    with Engine(old, device="cpu", refit_errors="raise") as engine:
        before, snap = run(engine), snapshot(engine)
        with pytest.raises(ModelLoadError, match=message):
            engine.update_weights_from_tensor(list(named.items()), weight_version="bad")
        assert_unchanged(engine, snap, before)


def test_bad_tensor_across_tp_ranks_changes_nothing(model_dir):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    named = tensors_for(Step(new, "bad", mutate=("reshape", LAST)))
    with Engine(old, device="cpu", refit_errors="raise", tp_size=2) as engine:
        before, sums = run(engine), engine.get_weights_checksum()
        with pytest.raises(RuntimeError, match="ModelLoadError.*down_proj"):
            engine.update_weights_from_tensor(named, weight_version="bad")
        with ColocatedBuckets(named, "rlr-test-bad", bucket_bytes=16 << 10) as buckets:
            with pytest.raises(RuntimeError, match="ModelLoadError.*down_proj"):
                engine.update_weights_from_tensor(buckets.handles, load_format="flattened_bucket")
        assert engine.weight_version == "default"
        assert engine.get_weights_checksum() == sums and run(engine) == before
    assert list_segments("rlr-") == []


def test_bad_tensors_over_the_group_then_a_good_update(model_dir, tmp_path):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    steps = [Step(new, f"bad-{i}", mutate=m) for i, (m, _) in enumerate(BAD)]
    steps.append(Step(new, "good"))
    port = free_port()
    sender = SenderProcess(tmp_path, port, 2, steps)
    try:
        with Engine(old, device="cpu", refit_errors="raise") as engine:
            before, snap = run(engine), snapshot(engine)
            engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP)
            for k, (_, message) in enumerate(BAD):
                with pytest.raises(ModelLoadError, match=message):
                    engine.update_weights_from_distributed(sender.plan(k), group_name=GROUP)
                assert_unchanged(engine, snap, before)
            # The whole stream was received every time, so the group is still in sync.
            engine.update_weights_from_distributed(sender.plan(len(BAD)), group_name=GROUP)
            assert engine.weight_version == "good" and run(engine) != before
    finally:
        result = sender.close()
    assert result["ok"], result


def test_sender_dies_mid_update(model_dir, tmp_path):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    port = free_port()
    sender = SenderProcess(tmp_path, port, 2, [Step(new, "v1", mode="die")])
    with Engine(old, device="cpu", refit_errors="raise") as engine:
        before, snap = run(engine), snapshot(engine)
        engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP, timeout_s=30)
        with pytest.raises(WeightSyncError, match="bucket 1/.*Connection closed"):
            engine.update_weights_from_distributed(sender.plan(0), group_name=GROUP)
        sender.close()
        assert sender.proc.exitcode == 17
        assert_unchanged(engine, snap, before)
        with pytest.raises(WeightSyncError, match="failed earlier"):
            engine.update_weights_from_distributed(sender.plan(0), group_name=GROUP)
        engine.destroy_weights_update_group(GROUP)

        # A new group (a restarted trainer) works.
        port = free_port()
        (tmp_path / "retry").mkdir()
        retry = SenderProcess(tmp_path / "retry", port, 2, [Step(new, "v2")])
        try:
            engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP)
            engine.update_weights_from_distributed(retry.plan(0), group_name=GROUP)
            assert engine.weight_version == "v2" and run(engine) != before
        finally:
            assert retry.close()["ok"]


def test_silent_sender_times_out(model_dir, tmp_path):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    port = free_port()
    sender = SenderProcess(tmp_path, port, 2, [Step(new, "v1", mode="silent", sleep_s=4.0)])
    try:
        with Engine(old, device="cpu", refit_errors="raise") as engine:
            before, snap = run(engine), snapshot(engine)
            sender.wait_listening(port)
            engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP, timeout_s=2.0)
            started = time.monotonic()
            with pytest.raises(WeightSyncTimeout, match="timed out"):
                engine.update_weights_from_distributed(sender.plan(0), group_name=GROUP)
            assert time.monotonic() - started < 5.0
            assert_unchanged(engine, snap, before)
    finally:
        sender.close()


def test_engine_keeps_serving_while_a_refit_waits_for_its_sender(model_dir, tmp_path):
    """tp_size 1: the update is received beside the loop thread, so a slow (here: silent)
    sender does not stall generation; the refit still times out and changes nothing."""
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    port = free_port()
    sender = SenderProcess(tmp_path, port, 2, [Step(new, "v1", mode="silent", sleep_s=8.0)])
    errors: list = []

    def refit(engine: Engine) -> None:
        try:
            engine.update_weights_from_distributed(sender.plan(0), group_name=GROUP)
        except Exception as exc:
            errors.append(exc)

    try:
        with Engine(old, device="cpu", refit_errors="raise") as engine:
            before, snap = run(engine), snapshot(engine)
            sender.wait_listening(port)
            engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP, timeout_s=5.0)
            waiting = threading.Thread(target=refit, args=(engine,))
            waiting.start()
            time.sleep(0.5)  # the refit now waits inside the receive
            assert run(engine) == before and waiting.is_alive()  # served meanwhile
            waiting.join(30)
            assert len(errors) == 1 and isinstance(errors[0], WeightSyncTimeout), errors
            assert_unchanged(engine, snap, before)
    finally:
        sender.close()
