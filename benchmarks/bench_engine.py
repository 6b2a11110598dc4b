"""Engine vs HF ``generate`` on the default model, same workload, same process.

Workload (issue 2): distinct 64-token prompts, exactly 128 new tokens, greedy, batch 1 / 8 / 32.

    python benchmarks/bench_engine.py [--batches 1 8 32] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import write_section  # noqa: E402
from engine_core import Engine  # noqa: E402
from engine_core.default_model import ensure_default_model  # noqa: E402


def prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(batch)]


def time_engine(engine: Engine, batch: list[list[int]], new_tokens: int) -> float:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    started = time.perf_counter()
    outs = engine.generate(input_ids=batch, sampling_params=params)
    elapsed = time.perf_counter() - started
    assert all(len(o["output_ids"]) == new_tokens for o in outs)
    return len(batch) * new_tokens / elapsed


@torch.inference_mode()
def time_hf(model, batch: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(batch)
    started = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )
    elapsed = time.perf_counter() - started
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(batch) * new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    path = ensure_default_model()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    with Engine(path, skip_tokenizer_init=True) as engine:
        time_engine(engine, prompts(2, args.prompt_len, 99), 8)  # warm-up
        for batch_size in args.batches:
            batch = prompts(batch_size, args.prompt_len, batch_size)
            ours = time_engine(engine, batch, args.new_tokens)
            theirs = time_hf(hf, batch, args.new_tokens)
            rows.append((batch_size, ours, theirs))
            print(f"batch {batch_size}: engine {ours:.1f} tok/s, HF {theirs:.1f} tok/s", flush=True)
    table = [
        "| batch | rl-rollout Engine (tok/s) | HF generate (tok/s) | ratio |",
        "|---|---|---|---|",
    ]
    table += [f"| {b} | {o:.1f} | {h:.1f} | {o / h:.2f}x |" for b, o, h in rows]
    body = (
        f"SmolLM2-135M fp32, distinct {args.prompt_len}-token prompts, exactly "
        f"{args.new_tokens} new tokens, greedy; both measured in this run.\n\n" + "\n".join(table)
    )
    write_section("Engine vs HF generate", body)


if __name__ == "__main__":
    main()
