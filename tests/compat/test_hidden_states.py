"""``generate(return_hidden_states=True)`` as SGLang returns it: ``meta_info["hidden_states"]``
= ``[prompt rows, then one vector per generated token fed back]`` (SGLang's scheduler appends
the prefill's rows as one list, then one row per decode step), the final-norm hidden states
HF reports as ``output_hidden_states[-1]``. Refused unless ``enable_return_hidden_states``."""

from __future__ import annotations

import pytest
import torch
from tiny_models import load_hf

from engine_core import Engine, InvalidRequestError

PROMPTS = [[4, 8, 15, 16, 23, 42, 7, 99, 100, 3, 11, 5, 9, 30, 31, 32, 33, 34], [1, 5, 9]]
GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


def hf_last_hidden(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]


@pytest.fixture(scope="module")
def qwen2(model_dir):
    return model_dir("qwen2")


@pytest.mark.parametrize("chunk", [2048, 8])  # 8: the long prompt prefills in three chunks
def test_hidden_states_match_hf(qwen2, chunk):
    hf = load_hf(qwen2)
    kwargs = dict(device="cpu", enable_return_hidden_states=True, chunked_prefill_size=chunk)
    with Engine(qwen2, **kwargs) as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_hidden_states=True)
    for ids, out in zip(PROMPTS, outs):
        hs = out["meta_info"]["hidden_states"]
        fed = ids + out["output_ids"][:-1]  # the last token is never run through the model
        assert len(hs) == 1 + GREEDY["max_new_tokens"] - 1 and len(hs[0]) == len(ids)
        got = torch.tensor([*hs[0], *hs[1:]])
        assert got.shape == (len(fed), hf.config.hidden_size)
        torch.testing.assert_close(got, hf_last_hidden(hf, fed), atol=1e-4, rtol=1e-4)


def test_hidden_states_in_the_last_stream_chunk(qwen2):
    with Engine(qwen2, device="cpu", enable_return_hidden_states=True) as engine:
        full = engine.generate(
            input_ids=PROMPTS[1], sampling_params=GREEDY, return_hidden_states=True
        )
        chunks = list(
            engine.generate(
                input_ids=PROMPTS[1], sampling_params=GREEDY, return_hidden_states=True, stream=True
            )
        )
        plain = engine.generate(input_ids=PROMPTS[1], sampling_params=GREEDY)
    assert chunks[-1]["meta_info"]["hidden_states"] == full["meta_info"]["hidden_states"]
    assert "hidden_states" not in plain["meta_info"]


def test_hidden_states_need_the_engine_option(qwen2):
    with Engine(qwen2, device="cpu") as engine:
        with pytest.raises(InvalidRequestError, match="return_hidden_states.*enable_return_hidden"):
            engine.generate(input_ids=PROMPTS[1], sampling_params=GREEDY, return_hidden_states=True)
        with pytest.raises(InvalidRequestError, match="return_hidden_states='yes'"):
            engine.generate(
                input_ids=PROMPTS[1], sampling_params=GREEDY, return_hidden_states="yes"
            )
        assert engine.generate(input_ids=PROMPTS[1], sampling_params=GREEDY)["output_ids"]


def test_hidden_states_per_prompt(qwen2):
    with Engine(qwen2, device="cpu", enable_return_hidden_states=True) as engine:
        outs = engine.generate(
            input_ids=PROMPTS, sampling_params=GREEDY, return_hidden_states=[False, True]
        )
    assert "hidden_states" not in outs[0]["meta_info"]
    assert len(outs[1]["meta_info"]["hidden_states"][0]) == len(PROMPTS[1])
