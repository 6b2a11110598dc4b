"""Tensor parallelism on CPU (gloo, one process per rank) against TP=1."""

from __future__ import annotations

import pytest
import torch

from engine_core import Engine

PROMPTS = [[5, 9, 13, 2, 7], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111], [42]]
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}


def run(path: str, **kwargs) -> list:
    with Engine(path, device="cpu", **kwargs) as engine:
        outs = engine.generate(
            input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0
        )
    return [
        (
            o["output_ids"],
            [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]],
            [lp for lp, _, _ in o["meta_info"]["input_token_logprobs"][1:]],
        )
        for o in outs
    ]


def assert_close_outputs(got: list, ref: list) -> None:
    for (ids, out_lp, in_lp), (ref_ids, ref_out, ref_in) in zip(got, ref):
        assert ids == ref_ids
        torch.testing.assert_close(torch.tensor(out_lp), torch.tensor(ref_out), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(in_lp), torch.tensor(ref_in), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tp_size", [2, 3])
def test_tp_matches_tp1(model_dir, tp_size):
    # 6 heads / 6 kv heads / intermediate 96 / vocab 320: divisible by 2 and 3 (vocab padded)
    path = model_dir(
        "qwen2", num_attention_heads=6, num_key_value_heads=6, hidden_size=48, intermediate_size=96
    )
    assert_close_outputs(run(path, tp_size=tp_size), run(path))


def test_tp2_replicates_single_kv_head(model_dir):
    path = model_dir("llama3")  # 4 heads, 1 kv head, tied embeddings
    assert_close_outputs(run(path, tp_size=2), run(path))


def test_tp_refit_from_disk(model_dir):
    path, new = model_dir("llama"), model_dir("llama", seed=3)
    with Engine(path, device="cpu", tp_size=2) as engine:
        engine.update_weights_from_disk(new, weight_version="v1")
        out = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
        assert out["meta_info"]["weight_version"] == "v1"
    with Engine(new, device="cpu") as fresh:
        assert (
            fresh.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["output_ids"]
            == out["output_ids"]
        )


def test_tp_size_not_dividing_heads_fails_fast(model_dir):
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tp_size=3"):
        Engine(model_dir("llama"), device="cpu", tp_size=3)
