"""Correctness oracle: HF transformers on the same random weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import load_hf

from engine_core import Engine

PROMPTS = [
    [1, 5, 9],
    [4, 8, 15, 16, 23, 42, 7, 99, 100, 3, 11],
    list(range(30, 63)),  # spans several pages, and several prefill chunks below
    [200, 201, 7, 7, 7, 19, 250],
]
NEW_TOKENS = 12


def hf_greedy(hf, ids: list[int]) -> list[int]:
    out = hf.generate(
        torch.tensor([ids]),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
    )
    return out[0, len(ids) :].tolist()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """logprob of ids[i] given ids[:i], for i >= 1."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    lp = logits.log_softmax(-1)
    return lp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "qwen3", "mistral"])
def test_greedy_tokens_and_logprobs_match_hf(model_dir, kind):
    path = model_dir(kind)
    hf = load_hf(path)
    with Engine(
        path, device="cpu", page_size=4, max_total_tokens=512, max_num_batched_tokens=24
    ) as engine:
        outs = engine.generate(
            input_ids=PROMPTS,
            sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS},
            return_logprob=True,
            logprob_start_len=0,
        )
    for ids, out in zip(PROMPTS, outs):
        assert out["output_ids"] == hf_greedy(hf, ids)
        full = ids + out["output_ids"]
        ref = hf_logprobs(hf, full)
        meta = out["meta_info"]
        got_in = [lp for lp, _, _ in meta["input_token_logprobs"]]
        assert got_in[0] is None and [t for _, t, _ in meta["input_token_logprobs"]] == ids
        torch.testing.assert_close(torch.tensor(got_in[1:]), ref[: len(ids) - 1], atol=1e-4, rtol=0)
        got_out = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]])
        torch.testing.assert_close(got_out, ref[len(ids) - 1 :], atol=1e-4, rtol=0)
        assert meta["prompt_tokens"] == len(ids)
        assert meta["completion_tokens"] == len(out["output_ids"])


def test_text_prompt_matches_hf_tokenization(model_dir):
    path = model_dir("llama")
    hf = load_hf(path)
    with Engine(path, device="cpu") as engine:
        out = engine.generate("the quick brown fox", {"temperature": 0, "max_new_tokens": 8})
        ids = engine.tokenizer.encode("the quick brown fox")
    assert out["output_ids"] == hf_greedy(hf, ids)[:8]
    assert out["text"] == engine.tokenizer.decode(out["output_ids"], skip_special_tokens=True)


def test_logprob_start_len_and_top_logprobs(model_dir):
    path = model_dir("qwen2")
    hf = load_hf(path)
    ids = PROMPTS[1]
    with Engine(path, device="cpu") as engine:
        out = engine.generate(
            input_ids=ids,
            sampling_params={"temperature": 0, "max_new_tokens": 3},
            return_logprob=True,
            logprob_start_len=5,
            top_logprobs_num=3,
        )
    meta = out["meta_info"]
    assert [t for _, t, _ in meta["input_token_logprobs"]] == ids[5:]
    ref = hf_logprobs(hf, ids + out["output_ids"])
    torch.testing.assert_close(
        torch.tensor([lp for lp, _, _ in meta["input_token_logprobs"]]),
        ref[4 : len(ids) - 1],
        atol=1e-4,
        rtol=0,
    )
    tops = meta["output_top_logprobs"]
    assert len(tops) == 3 and all(len(t) == 3 for t in tops)
    # greedy: the chosen token is the top-1 candidate
    assert [t[0][1] for t in tops] == out["output_ids"]
    assert all(t[0][0] >= t[1][0] >= t[2][0] for t in tops)
