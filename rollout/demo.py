"""The README's main job: GRPO on the embedded default model (``rollout demo``).

``run_rl_demo`` trains SmolLM2-135M-Instruct (converted once, see ``engine_core.default_model``)
with the loop in ``rollout.rl.loop``: engines and a trainer actor on Ray, rollouts with zero-KL
logprobs, sleep/wake, a refit per step; one row per step and a PNG plot at the end.
``run_demo`` (``rollout demo --sample-only``) only samples: a rollout through the service (or
one in-process ``Engine``) with its samples and throughput.
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


def chat_prompts(model_path: str, questions: list[str]) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]


def _rollout_in_process(path: str, prompts: list[str], params: dict) -> list[dict]:
    from engine_core import Engine

    with Engine(path) as engine:
        return engine.generate(prompts, params, return_logprob=True)


def _rollout_service(path: str, prompts: list[str], params: dict, engines: int) -> list[dict]:
    import rollout

    config = {
        "mode": "local",
        "model_path": path,
        "num_engines": engines,
        "cpus_per_rank": 2.0 / engines,
        "engine": {"kv_cache_memory_bytes": 128 << 20},
    }
    with rollout.deploy(config) as service:
        return service.generate(prompts, sampling_params=params, return_logprob=True)


def run_demo(
    model_path: str | None = None,
    n: int = 2,
    max_new_tokens: int = 48,
    in_process: bool = False,
    engines: int = 2,
) -> dict[str, Any]:
    """Run the rollout and return a summary (also printed)."""
    from engine_core.default_model import ensure_default_model

    path = model_path or ensure_default_model()
    print(f"model: {path}")
    prompts = chat_prompts(path, PROMPTS)
    params = {
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": max_new_tokens,
        "n": n,
        "sampling_seed": 1234,
    }
    started = time.perf_counter()
    if in_process:
        outputs = _rollout_in_process(path, prompts, params)
    else:
        outputs = _rollout_service(path, prompts, params, engines)
    elapsed = time.perf_counter() - started
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    for i, out in enumerate(outputs):
        meta = out["meta_info"]
        logprob = sum(lp for lp, _, _ in meta["output_token_logprobs"])
        print(
            f"\n[{PROMPTS[i // n]!r} sample {i % n}] {meta['finish_reason']['type']}, "
            f"{meta['completion_tokens']} tokens, sum logprob {logprob:.2f}, "
            f"weights {meta['weight_version']}"
        )
        print("  " + out["text"].strip().replace("\n", "\n  "))
    where = "one in-process engine" if in_process else f"{engines} engine actors"
    print(
        f"\n{len(outputs)} samples, {tokens} tokens in {elapsed:.1f}s on {where} "
        f"(including start-up): {tokens / elapsed:.1f} tok/s"
    )
    return {"samples": len(outputs), "tokens": tokens, "seconds": elapsed}


def run_rl_demo(
    model_path: str | None = None,
    steps: int = 10,
    disaggregated: bool = False,
    seed: int = 0,
    plot_path: str = "grpo_demo.png",
) -> dict[str, Any]:
    """GRPO on the rollout service; prints a row per step and the plot's path."""
    import os

    from rollout.rl.loop import GRPOConfig, run_grpo

    cfg = GRPOConfig(
        model_path=model_path,
        steps=steps,
        disaggregated=disaggregated,
        seed=seed,
        plot_path=plot_path,
    )
    result = run_grpo(cfg, report=lambda line: print(line, flush=True))
    rows = result["rows"]
    first, last = rows[0]["reward"], sum(r["reward"] for r in rows[-3:]) / len(rows[-3:])
    worst = max(r["logprob_diff"] for r in rows)
    print(
        f"\nreward {first:.3f} -> {last:.3f} (mean of the last 3 steps); "
        f"max |rollout - trainer logprob| over every token of every step: {worst}; "
        f"{result['seconds']:.0f} s in all"
    )
    if result["plot"]:
        print(f"plot: {os.path.abspath(result['plot'])}")
    return result
