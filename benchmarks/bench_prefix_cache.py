"""The radix prefix cache on a GRPO-shaped rollout (issue 13), side by side in one run:
our engine with the cache off and on, and vLLM-CPU with prefix caching (if its venv exists).

Workload: ``--prompts`` distinct prompts of ``--prompt-len`` random tokens, ``n`` samples each,
exactly ``--new-tokens`` new tokens, greedy. Reports throughput (generated tok/s), prompt tokens
computed (prefill), cache hit rate and retractions.

    python benchmarks/bench_prefix_cache.py [--prompts 8] [--n 8] [--prompt-len 256]
        [--new-tokens 128] [--vllm-venv DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._peers import run_vllm, vllm_python  # noqa: E402
from benchmarks._report import write_section  # noqa: E402
from engine_core import Engine  # noqa: E402
from engine_core.default_model import ensure_default_model  # noqa: E402


def workload(num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(num)]


def run_ours(path: str, prompts, n: int, new_tokens: int, cache: bool) -> dict:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True, "n": n}
    with Engine(path, skip_tokenizer_init=True, enable_prefix_cache=cache) as engine:
        engine.generate(input_ids=[[11, 12, 13]], sampling_params={"max_new_tokens": 4})
        before = engine.get_server_info()
        engine.flush_cache()
        started = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        elapsed = time.perf_counter() - started
        info = engine.get_server_info()
    assert all(len(o["output_ids"]) == new_tokens for o in outs)
    computed_prompt = sum(len(p) for p in prompts) * n - sum(
        o["meta_info"]["cached_tokens"] for o in outs
    )
    return {
        "tok_s": len(outs) * new_tokens / elapsed,
        "prefill": computed_prompt,
        "hit_rate": 1 - computed_prompt / (sum(len(p) for p in prompts) * n),
        "retractions": info["num_retractions"] - before["num_retractions"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--vllm-venv", default=None)
    args = parser.parse_args()
    path = ensure_default_model()
    prompts = workload(args.prompts, args.prompt_len)
    rows = {}
    for cache in (False, True):
        rows[cache] = run_ours(path, prompts, args.n, args.new_tokens, cache)
        print(f"ours cache={cache}: {rows[cache]}", flush=True)
    peer = vllm_python(args.vllm_venv)
    vllm = None
    if peer is None:
        print("vLLM-CPU venv not found: run ../shared/peers/setup_vllm_cpu.sh to compare")
    else:
        job = {
            "model": path,
            "prefix_caching": True,
            "workloads": [
                {  # vLLM refuses greedy with n > 1: n copies of each prompt, same work
                    "name": "grpo",
                    "prompts": [p for p in prompts for _ in range(args.n)],
                    "n": 1,
                    "max_tokens": args.new_tokens,
                    "temperature": 0,
                }
            ],
        }
        vllm = run_vllm(peer, job, threads=torch.get_num_threads())
        print(f"vLLM-CPU: {vllm}", flush=True)
    off, on = rows[False], rows[True]
    table = [
        "| engine | tok/s | prompt tokens computed | hit rate | retractions | tok/s vs cache off |",
        "|---|---|---|---|---|---|",
        f"| rl-rollout, prefix cache off | {off['tok_s']:.1f} | {off['prefill']} | "
        f"{off['hit_rate']:.2f} | {off['retractions']} | 1.00x |",
        f"| rl-rollout, prefix cache on | {on['tok_s']:.1f} | {on['prefill']} | "
        f"{on['hit_rate']:.2f} | {on['retractions']} | {on['tok_s'] / off['tok_s']:.2f}x |",
    ]
    if vllm is not None:
        table.append(
            f"| vLLM-CPU 0.32, prefix caching, eager | {vllm['grpo']:.1f} | — | — | — | "
            f"{vllm['grpo'] / off['tok_s']:.2f}x |"
        )
    ratio = on["prefill"] / off["prefill"]
    body = (
        f"SmolLM2-135M fp32; {args.prompts} prompts x n={args.n} of {args.prompt_len} random "
        f"tokens, exactly {args.new_tokens} new tokens, greedy; all rows measured in this run. "
        f"Prompt tokens computed with the cache: {ratio:.3f} of the uncached run.\n\n"
        + "\n".join(table)
    )
    if vllm is not None:
        body += f"\n\nOurs with the cache vs vLLM-CPU: {on['tok_s'] / vllm['grpo']:.2f}x."
    write_section("Prefix cache: GRPO rollout", body)


if __name__ == "__main__":
    main()
