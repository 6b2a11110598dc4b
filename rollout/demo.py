"""The README's main job: a local rollout on the embedded default model.

Converts SmolLM2-135M-Instruct once (see ``engine_core.default_model``), starts an engine, runs
a small GRPO-style rollout (n samples per prompt, with logprobs) and prints the samples and
throughput.
"""

from __future__ import annotations

import time
from typing import Any

PROMPTS = [
    "What is the capital of France?",
    "Give me one tip for writing clean Python code.",
    "Explain reinforcement learning in one sentence.",
    "Name three prime numbers.",
]


def chat_prompts(tokenizer: Any, questions: list[str]) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]


def run_demo(model_path: str | None = None, n: int = 2, max_new_tokens: int = 48) -> dict:
    """Run the rollout and return a summary (also printed)."""
    from engine_core import Engine
    from engine_core.default_model import ensure_default_model

    path = model_path or ensure_default_model()
    print(f"model: {path}")
    with Engine(path) as engine:
        prompts = chat_prompts(engine.tokenizer, PROMPTS)
        params = {
            "temperature": 0.8,
            "top_p": 0.95,
            "max_new_tokens": max_new_tokens,
            "n": n,
            "sampling_seed": 1234,
        }
        started = time.perf_counter()
        outputs = engine.generate(prompts, params, return_logprob=True)
        elapsed = time.perf_counter() - started
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    for i, out in enumerate(outputs):
        meta = out["meta_info"]
        logprob = sum(lp for lp, _, _ in meta["output_token_logprobs"])
        print(
            f"\n[{PROMPTS[i // n]!r} sample {i % n}] {meta['finish_reason']['type']}, "
            f"{meta['completion_tokens']} tokens, sum logprob {logprob:.2f}"
        )
        print("  " + out["text"].strip().replace("\n", "\n  "))
    print(
        f"\n{len(outputs)} samples, {tokens} tokens in {elapsed:.1f}s: {tokens / elapsed:.1f} tok/s"
    )
    return {"samples": len(outputs), "tokens": tokens, "seconds": elapsed}
