"""Batch-32 throughput over HTTP vs in-process, same model, same workload, one run (issue 16).

- in-process: ``Engine.generate`` of 32 prompts in this process;
- HTTP batch: one ``POST /generate`` of the same 32 prompts to ``rollout serve`` (a child
  process with its own engine, same engine arguments);
- HTTP concurrent: 32 concurrent ``POST /generate`` of one prompt each (how agentic rollouts
  call a server).

Greedy, exactly ``--new-tokens`` new tokens, distinct ``--prompt-len``-token prompts. Rounds
alternate in-process / HTTP batch / HTTP concurrent (the idle side uses no CPU), the first
round of each is dropped as warm-up, and the ratios are medians of per-round ratios.

    python benchmarks/bench_http.py [--model-path DIR] [--rounds 5] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "http"))

from server_process import ServerProcess  # noqa: E402

from benchmarks._report import load_note, write_section  # noqa: E402
from engine_core import Engine  # noqa: E402
from engine_core.default_model import ensure_default_model  # noqa: E402

BATCH = 32


def prompts(length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 300) for _ in range(length)] for _ in range(BATCH)]


def in_process(engine: Engine, batch, params) -> float:
    started = time.perf_counter()
    outs = engine.generate(input_ids=batch, sampling_params=params)
    elapsed = time.perf_counter() - started
    assert all(len(o["output_ids"]) == params["max_new_tokens"] for o in outs)
    return BATCH * params["max_new_tokens"] / elapsed


def http_batch(client: httpx.Client, batch, params) -> float:
    started = time.perf_counter()
    outs = client.post("/generate", json={"input_ids": batch, "sampling_params": params}).json()
    elapsed = time.perf_counter() - started
    assert all(len(o["output_ids"]) == params["max_new_tokens"] for o in outs)
    return BATCH * params["max_new_tokens"] / elapsed


def http_concurrent(url: str, batch, params) -> float:
    async def main() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            started = time.perf_counter()
            responses = await asyncio.gather(
                *(
                    client.post("/generate", json={"input_ids": p, "sampling_params": params})
                    for p in batch
                )
            )
            elapsed = time.perf_counter() - started
        assert all(len(r.json()["output_ids"]) == params["max_new_tokens"] for r in responses)
        return BATCH * params["max_new_tokens"] / elapsed

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default=None, help="default: the embedded default model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each engine")
    parser.add_argument("--note", default="", help="a line written next to the numbers")
    args = parser.parse_args()
    model = args.model_path or ensure_default_model()
    load_start = os.getloadavg()[0]
    kwargs = {"device": "cpu", "num_threads": args.threads, "max_total_tokens": 16384}
    params = {"temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
    batch = prompts(args.prompt_len)
    server = ServerProcess(
        ["--model-path", model] + [x for k, v in kwargs.items() for x in ("--engine", f"{k}={v}")]
    )
    rows: dict[str, list[float]] = {"in-process": [], "HTTP batch": [], "HTTP concurrent": []}
    try:
        with Engine(model, **kwargs) as engine, httpx.Client(base_url=server.url, timeout=600) as c:
            for _ in range(args.rounds + 1):
                rows["in-process"].append(in_process(engine, batch, params))
                rows["HTTP batch"].append(http_batch(c, batch, params))
                rows["HTTP concurrent"].append(http_concurrent(server.url, batch, params))
    finally:
        server.stop()
    rows = {k: v[1:] for k, v in rows.items()}  # drop the warm-up round
    base = rows["in-process"]
    lines = [
        f"Model `{os.path.basename(model.rstrip('/'))}`, batch {BATCH}, {args.prompt_len}-token "
        f"prompts, {args.new_tokens} new tokens (greedy), {args.threads} torch threads per "
        f"engine, {args.rounds} rounds (median; first round dropped). " + load_note(load_start),
        "",
        "| path | output tok/s (median) | vs in-process (median of per-round ratios) |",
        "|---|---|---|",
    ]
    for name, values in rows.items():
        ratio = statistics.median(v / b for v, b in zip(values, base))
        lines.append(f"| {name} | {statistics.median(values):.0f} | {ratio:.3f} |")
    if args.note:
        lines += ["", args.note]
    write_section("HTTP server overhead (issue 16)", "\n".join(lines))


if __name__ == "__main__":
    main()
