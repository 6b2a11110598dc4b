"""Refit over a weight-update group from a sender in another process (no Ray): the engine ends
up bitwise equal to a fresh engine on the new weights, for both wire protocols and TP 1/2."""

from __future__ import annotations

import pytest
from refit_workers import GROUP, SenderProcess, Step, tensors_for

from engine_core import Engine
from engine_core.errors import RefitStateError
from weight_sync import free_port
from weight_sync.checksum import checksums_of

GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 4, 3]]


def run(engine: Engine) -> list:
    # Drop the prefix cache: in default mode a cache hit changes the last bits of logprobs
    # (another batch computed the shared KV); these tests compare weights through outputs.
    engine.flush_cache()
    outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    return [
        (o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]])
        for o in outs
    ]


@pytest.mark.parametrize("tp_size", [1, 2])
def test_distributed_refit_equals_fresh_engine(model_dir, tmp_path, tp_size):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    with Engine(new, device="cpu", refit_errors="raise", tp_size=tp_size) as fresh:
        expected = run(fresh)
    world = 1 + tp_size
    port = free_port()
    steps = [Step(new, "step-1"), Step(old, "step-2", mode="sglang")]
    sender = SenderProcess(tmp_path, port, world, steps)
    try:
        with Engine(old, device="cpu", refit_errors="raise", tp_size=tp_size) as engine:
            before = run(engine)
            joined = engine.init_weights_update_group("127.0.0.1", port, 1, world, GROUP)
            assert joined == (True, "Succeeded to initialize custom process group.")

            # Our protocol: the plan is one RPC; the version defaults to the plan's.
            result = engine.update_weights_from_distributed(sender.plan(0), group_name=GROUP)
            assert result[0] is True and engine.weight_version == "step-1"
            assert run(engine) == expected and expected != before
            out = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
            assert out["meta_info"]["weight_version"] == "step-1"
            assert out["meta_info"]["weight_versions"] == ["step-1"] * 10
            assert engine.get_weights_checksum() == checksums_of(tensors_for(steps[0]))

            # SGLang's protocol: names/dtypes/shapes, one broadcast per tensor.
            named = tensors_for(steps[1])
            engine.update_weights_from_distributed(
                list(named),
                [t.dtype for t in named.values()],
                [list(t.shape) for t in named.values()],
                group_name=GROUP,
                weight_version="step-2",
            )
            assert engine.weight_version == "step-2"
            assert run(engine) == before
            assert engine.destroy_weights_update_group(GROUP)[0] is True
    finally:
        result = sender.close()
    assert result["ok"], result


def test_held_update_commits_only_when_asked(model_dir, tmp_path):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    port = free_port()
    sender = SenderProcess(tmp_path, port, 2, [Step(new, "v1"), Step(new, "v2")])
    try:
        with Engine(old, device="cpu", refit_errors="raise") as engine:
            before = run(engine)
            engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP)
            held = engine.update_weights_from_distributed(
                sender.plan(0), group_name=GROUP, commit=False
            )
            assert held[0] is True
            # Staged, not committed: same weights, same version, still serving.
            assert engine.weight_version == "default" and run(engine) == before
            with pytest.raises(RefitStateError, match="held"):
                engine.update_weights_from_distributed(sender.plan(1), group_name=GROUP)
            assert engine.discard_staged_weights()["discarded"]
            assert engine.weight_version == "default" and run(engine) == before
            engine.update_weights_from_distributed(sender.plan(1), group_name=GROUP, commit=False)
            assert engine.commit_staged_weights()["weight_version"] == "v2"
            after = run(engine)
    finally:
        result = sender.close()
    assert result["ok"], result
    with Engine(new, device="cpu", refit_errors="raise") as fresh:
        assert after == run(fresh)
