"""torch.compile (inductor, weight freezing) on the default model's decode step, against HF
eager and our engine, side by side in one run.

The issue's lever "a compiled decode step": HF's Llama with a static KV cache (the gpt-fast
recipe: fixed shapes, so one graph per batch size) compiled with inductor and
``freezing=True`` (constant-folded, prepacked weights), timed per decode step after the
compile, with the compile's own time (the first call) reported against the 10 s
load-to-first-token budget. Our engine's decode step is measured on the same prompts as the
difference between a 1-token and a (1 + steps)-token generate, divided by the steps.

    python benchmarks/bench_torch_compile.py [--batches 1 32] [--steps 24]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import load_note, write_section  # noqa: E402
from engine_core import Engine  # noqa: E402
from engine_core.default_model import ensure_default_model  # noqa: E402

PROMPT_LEN = 96


def prompts(batch: int) -> list[list[int]]:
    rng = random.Random(batch)
    return [[rng.randrange(100, 40000) for _ in range(PROMPT_LEN)] for _ in range(batch)]


def ours_step_ms(path: str, batch: list[list[int]], steps: int) -> float:
    params = {"temperature": 0, "ignore_eos": True}
    with Engine(path, skip_tokenizer_init=True) as engine:
        engine.generate(input_ids=batch, sampling_params=params | {"max_new_tokens": 2})
        spent = {}
        for new in (1, 1 + steps):
            engine.flush_cache()
            begin = time.perf_counter()
            engine.generate(input_ids=batch, sampling_params=params | {"max_new_tokens": new})
            spent[new] = time.perf_counter() - begin
    return 1e3 * (spent[1 + steps] - spent[1]) / steps


def hf_step_ms(
    path: str, batch: list[list[int]], steps: int, compiled: bool
) -> tuple[float, float]:
    """(median decode step ms, first decode call s: the compile when ``compiled``)."""
    from transformers import AutoModelForCausalLM, StaticCache

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(batch)
    cache = StaticCache(
        config=model.config, max_batch_size=len(batch), max_cache_len=ids.shape[1] + steps + 2
    )

    def step(tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = model(
            input_ids=tokens, cache_position=position, past_key_values=cache, use_cache=True
        )
        return out.logits[:, -1]

    decode = step
    if compiled:
        torch._dynamo.reset()
        torch._inductor.config.freezing = True
        decode = torch.compile(step, dynamic=False)
    times = []
    with torch.no_grad():
        token = step(ids, torch.arange(ids.shape[1])).argmax(-1, keepdim=True)  # eager prefill
        for i in range(steps + 1):
            begin = time.perf_counter()
            token = decode(token, torch.tensor([ids.shape[1] + i])).argmax(-1, keepdim=True)
            times.append(time.perf_counter() - begin)
    first, rest = times[0], sorted(times[1:])
    return 1e3 * rest[len(rest) // 2], first


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    path = ensure_default_model()
    rows = [
        "| batch | ours (ms/step) | HF eager | HF + inductor (freezing) | inductor compile (s) | "
        "inductor step / ours |",
        "|---|---|---|---|---|---|",
    ]
    for size in args.batches:
        batch = prompts(size)
        ours = ours_step_ms(path, batch, args.steps)
        eager, _ = hf_step_ms(path, batch, args.steps, compiled=False)
        compiled, compile_s = hf_step_ms(path, batch, args.steps, compiled=True)
        print(size, ours, eager, compiled, compile_s, flush=True)
        rows.append(
            f"| {size} | {ours:.1f} | {eager:.1f} | {compiled:.1f} | {compile_s:.1f} | "
            f"{compiled / ours:.2f}x |"
        )
    body = (
        f"SmolLM2-135M fp32, {PROMPT_LEN}-token random prompts, greedy; HF: static KV cache "
        f"(one graph per batch size, `dynamic=False`), median of {args.steps} decode steps "
        "after the first (the compile); ours: (generate of 1 + steps tokens - generate of 1) / "
        "steps, sampling and scheduling included. "
        + load_note(load_start)
        + "\n\n"
        + "\n".join(rows)
    )
    write_section("torch.compile on the decode step (issue 15)", body)


if __name__ == "__main__":
    main()
