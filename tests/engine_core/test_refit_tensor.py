"""Colocated refit (``update_weights_from_tensor``): in-process pairs, and shared-memory bucket
handles made by the trainer; TP ranks map the same buckets. Equal to a fresh engine."""

from __future__ import annotations

import pytest
import torch
from refit_workers import Step, tensors_for

from engine_core import Engine
from weight_sync import ColocatedBuckets, list_segments
from weight_sync.checksum import checksums_of, tensor_checksum

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
def test_tensor_refit_equals_fresh_engine(model_dir, tp_size):
    # Tied embeddings + a single KV head replicated across TP ranks: the hardest sharding.
    old, new = model_dir("llama3"), model_dir("llama3", seed=1)
    named = tensors_for(Step(new, "x"))
    with Engine(new, device="cpu", tp_size=tp_size) as fresh:
        expected = run(fresh)
    with Engine(old, device="cpu", tp_size=tp_size) as engine:
        before = run(engine)
        # (a) (name, tensor) pairs
        result = engine.update_weights_from_tensor(list(named.items()), weight_version="v1")
        assert result == (True, "Success Weight version updated to v1.")
        assert run(engine) == expected != before
        out = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
        assert out["meta_info"]["weight_versions"] == ["v1"] * 10
        assert engine.get_weights_checksum() == checksums_of(named)

        # (b) the trainer's shared buckets; small buckets so there are several
        back = tensors_for(Step(old, "x"))
        with ColocatedBuckets(back, f"rlr-test-{tp_size}", bucket_bytes=16 << 10) as buckets:
            assert len(buckets.handles) > 3
            engine.update_weights_from_tensor(
                buckets.handles, load_format="flattened_bucket", weight_version="v2"
            )
        assert engine.weight_version == "v2" and run(engine) == before
        # No version given: the refit count is appended.
        engine.update_weights_from_tensor(named)
        assert engine.weight_version == "v2+1" and run(engine) == expected
        # With TP the pairs went through the engine's pool of shared segments, kept for the
        # next refit; releasing the weights unlinks them too.
        assert bool(list_segments("rlr-refit")) == (tp_size > 1)
        engine.release_memory_occupation(["weights"])
        assert list_segments("rlr-refit") == []
    assert list_segments("rlr-") == []


def test_partial_update_and_checksum_of_one_tensor(model_dir):
    path = model_dir("llama")
    name = "model.layers.0.self_attn.k_proj.weight"
    with Engine(path, device="cpu") as engine:
        old = engine.get_weights_checksum()
        new = torch.randn(engine.runner.get_weight(name).shape)
        engine.update_weights_from_tensor([(name, new)], weight_version="partial")
        got = engine.get_weights_checksum([name])
        assert got == {name: tensor_checksum(new)}
        changed = {n for n, c in engine.get_weights_checksum().items() if old[n] != c}
        assert changed == {name}
