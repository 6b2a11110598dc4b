"""Deterministic vs default mode, TP=2 vs TP=1, and fixed-order vs native all-reduce.

    python benchmarks/bench_determinism.py [--new-tokens 128] [--tp-new-tokens 32]

All comparisons are measured in this one run (issue 3's benchmark).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import write_section  # noqa: E402
from engine_core import Engine  # noqa: E402
from engine_core.default_model import ensure_default_model  # noqa: E402

SIZES = [64 << 10, 1 << 20, 8 << 20, 64 << 20]


def throughput(path: str, batch: int, new_tokens: int, **kwargs) -> float:
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(64)] for _ in range(batch)]
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    with Engine(path, skip_tokenizer_init=True, **kwargs) as engine:
        engine.generate(input_ids=prompts[:2], sampling_params=dict(params, max_new_tokens=4))
        started = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params=params)
        return batch * new_tokens / (time.perf_counter() - started)


def _allreduce_worker(rank: int, port: int, results: dict) -> None:
    from engine_core.parallel import TPContext
    from weight_sync.group import create_group

    torch.set_num_threads(1)
    group = create_group("127.0.0.1", port, rank, 2, "bench-ar", timeout_s=120)
    rows = []
    for nbytes in SIZES:
        x = torch.randn(nbytes // 4)
        for ordered in (True, False):
            tp = TPContext(rank, 2, group.process_group, ordered_all_reduce=ordered)
            tp.all_reduce(x.clone())  # warm-up
            reps = max(3, min(50, (64 << 20) // nbytes))
            started = time.perf_counter()
            for _ in range(reps):
                tp.all_reduce(x.clone())
            rows.append((nbytes, ordered, (time.perf_counter() - started) / reps))
    if rank == 0:
        results["rows"] = rows
    group.destroy()


def allreduce_rows() -> list:
    from weight_sync.group import free_port

    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    port = free_port()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return list(results["rows"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--tp-new-tokens", type=int, default=32)
    args = parser.parse_args()
    path = ensure_default_model()
    default = throughput(path, 32, args.new_tokens)
    determ = throughput(path, 32, args.new_tokens, deterministic=True)
    print(f"default {default:.1f} tok/s, deterministic {determ:.1f} tok/s", flush=True)
    tp1 = throughput(path, 32, args.tp_new_tokens)
    tp2 = throughput(path, 32, args.tp_new_tokens, tp_size=3)
    print(f"tp1 {tp1:.1f}, tp3 {tp2:.1f}", flush=True)
    ar = allreduce_rows()
    lines = [
        f"SmolLM2-135M fp32, batch 32, 64-token prompts, greedy, {args.new_tokens} new tokens.",
        "",
        "| mode | tok/s | vs default |",
        "|---|---|---|",
        f"| default | {default:.1f} | 1.00x |",
        f"| deterministic | {determ:.1f} | {determ / default:.2f}x |",
        "",
        f"Tensor parallelism ({args.tp_new_tokens} new tokens; 9 heads / 3 KV heads need a "
        "TP size dividing 3, so TP=3 on this 2-core machine: expect a slowdown, it runs 3 "
        "processes of 1 thread):",
        "",
        "| TP | tok/s | vs TP=1 |",
        "|---|---|---|",
        f"| 1 | {tp1:.1f} | 1.00x |",
        f"| 3 | {tp2:.1f} | {tp2 / tp1:.2f}x |",
        "",
        "All-reduce between 2 processes (gloo, 1 thread each), mean time per call:",
        "",
        "| message | fixed-order (all-gather + rank-order sum) | native all-reduce | ratio |",
        "|---|---|---|---|",
    ]
    by = {(n, o): t for n, o, t in ar}
    for n in SIZES:
        fixed, native = by[(n, True)], by[(n, False)]
        lines.append(
            f"| {n >> 10} KiB | {fixed * 1e3:.2f} ms | {native * 1e3:.2f} ms | "
            f"{fixed / native:.2f}x |"
        )
    write_section("Determinism and tensor parallelism", "\n".join(lines))


if __name__ == "__main__":
    main()
