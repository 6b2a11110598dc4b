"""Cache-aware vs round-robin vs least-load routing through the real service (default model).

Two workloads, each run once per policy in the same run; each workload on its own engines,
whose KV is sized for it (the prefix caches are flushed between policies, each policy gets its
own ``RolloutDriver``):

- **shared prefix**: ``--systems`` system prompts of ``--system-tokens`` tokens, each followed
  by ``--questions`` questions of ``--question-tokens`` tokens, arriving interleaved (a seeded
  shuffle): one request at a time with ``--in-flight`` per engine (``--arrival stream``, the
  default) or all in one rollout call (``--arrival batch``). Each engine's KV holds
  ``1/engines`` of the system prompts (plus the running tails), so where a prefix is sent
  decides whether it is still cached.
- **conversations**: ``--conversations`` multi-turn conversations of ``--turns`` turns (history
  + the previous answer + ``--turn-tokens`` new tokens each turn), ``session_id`` naming the
  conversation. With ``--arrival stream`` each conversation sends its next turn as soon as its
  last one returns (an agentic rollout); with ``batch`` each turn of every conversation is one
  rollout call. Each engine's KV holds ``1/engines`` of the conversations at their last turn.

Per policy: the hit rate (the engines' ``prefix_cache`` counters: prompt tokens served from
the cache / prompt tokens looked up), the prefill saved (1 - tokens prefilled / prompt tokens),
output tokens/s over the workload's wall time, and the ratios to round robin. With
``--engines 2 4`` both sizes run (a service per size and workload).

    python benchmarks/bench_prefix_routing.py [--engines 2 4] [--systems 8] [--questions 16]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402

from rollout import deploy  # noqa: E402
from rollout.driver import RolloutDriver  # noqa: E402
from rollout.engine_actor import WeightsSource  # noqa: E402

POLICIES = ("round_robin", "least_load", "cache_aware")


def tokens(rng: random.Random, args, count: int) -> list[int]:
    """``count`` random token ids (above the special tokens, below ``--vocab``)."""
    low = min(100, args.vocab // 2)
    return [rng.randrange(low, args.vocab) for _ in range(count)]


def shared_prefix(args, rng: random.Random) -> list[list[int]]:
    systems = [tokens(rng, args, args.system_tokens) for _ in range(args.systems)]
    prompts = [
        system + tokens(rng, args, args.question_tokens)
        for system in systems
        for _ in range(args.questions)
    ]
    rng.shuffle(prompts)
    return prompts


def params(args) -> dict[str, Any]:
    return {"temperature": 0, "max_new_tokens": args.max_new, "ignore_eos": True}


def run_shared(driver, args, prompts, num_engines: int) -> tuple[list[dict], float]:
    """``--arrival batch``: every prompt in one rollout call. ``stream``: one call per prompt,
    in arrival order, ``--in-flight`` per engine at a time (a new one as each finishes), so an
    engine only ever sees what has arrived -- its scheduler cannot regroup the whole workload
    by prefix, and where the router sends each request decides what is still cached."""
    start = time.perf_counter()
    if args.arrival == "batch":
        outs = ray.get(driver.generate.remote(input_ids=prompts, sampling_params=params(args)))
        return outs, time.perf_counter() - start
    outs: list[dict] = [{}] * len(prompts)
    pending: dict[Any, int] = {}
    order = iter(enumerate(prompts))

    def submit() -> None:
        nxt = next(order, None)
        if nxt is not None:
            ref = driver.generate.remote(input_ids=[nxt[1]], sampling_params=params(args))
            pending[ref] = nxt[0]

    for _ in range(args.in_flight * num_engines):
        submit()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            outs[pending.pop(ref)] = ray.get(ref)[0]
            submit()
    return outs, time.perf_counter() - start


def run_conversations(driver, args, seed: int, num_engines: int) -> tuple[list[dict], float]:
    """``--arrival stream`` (default): every conversation runs on its own, as agentic
    rollouts do -- its next turn (history + the answer + ``--turn-tokens`` new tokens) is sent
    as soon as its previous turn returns, at most ``--in-flight`` per engine at a time.
    ``batch``: each turn of every conversation is one rollout call (conversations shuffled every
    turn), so a turn waits for the slowest conversation of the one before. Each conversation's
    tokens come from its own seeded generator: the workload is the same for every policy
    whatever order turns complete in."""
    rngs = [random.Random(seed * 1000 + c) for c in range(args.conversations)]
    histories = [tokens(rngs[c], args, args.first_tokens) for c in range(args.conversations)]
    sessions = [f"conv{c}" for c in range(args.conversations)]
    turns_done = [0] * args.conversations
    outputs: list[dict] = []

    def next_turn(c: int, out: dict) -> None:
        outputs.append(out)
        turns_done[c] += 1
        histories[c] = histories[c] + out["output_ids"] + tokens(rngs[c], args, args.turn_tokens)

    start = time.perf_counter()
    if args.arrival == "batch":
        order_rng = random.Random(seed)
        for _ in range(args.turns):
            # Turns arrive in a different order each round (as conversations finish), so a
            # fixed rotation cannot keep a conversation on one engine by accident.
            order = list(range(args.conversations))
            order_rng.shuffle(order)
            outs = ray.get(
                driver.generate.remote(
                    input_ids=[histories[c] for c in order],
                    sampling_params=params(args),
                    session_id=[sessions[c] for c in order],
                )
            )
            for c, out in zip(order, outs):
                next_turn(c, out)
        return outputs, time.perf_counter() - start

    waiting = list(range(args.conversations))
    pending: dict[Any, int] = {}

    def submit() -> None:
        while waiting and len(pending) < args.in_flight * num_engines:
            c = waiting.pop(0)
            ref = driver.generate.remote(
                input_ids=[histories[c]], sampling_params=params(args), session_id=[sessions[c]]
            )
            pending[ref] = c

    submit()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            c = pending.pop(ref)
            next_turn(c, ray.get(ref)[0])
            if turns_done[c] < args.turns:
                waiting.append(c)
        submit()
    return outputs, time.perf_counter() - start


def cache_counters(engines) -> tuple[int, int, int]:
    """Summed over engines: (prompt tokens looked up, of which hit in the cache, tokens
    prefilled) -- the engines' own counters (``get_server_info``)."""
    infos = ray.get([e.get_server_info.remote() for e in engines])
    looked = sum(i["prefix_cache"]["looked_up_tokens"] for i in infos)
    hit = sum(i["prefix_cache"]["hit_tokens"] for i in infos)
    return looked, hit, sum(i["prefill_tokens"] for i in infos)


def measure(outs: list[dict], wall: float, before, after) -> dict[str, float]:
    looked, hit, prefilled = (b - a for a, b in zip(before, after))
    prompt = sum(o["meta_info"]["prompt_tokens"] for o in outs)
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {
        "hit": hit / looked,  # the engines' cache_hit_rate over this workload
        "saved": 1 - prefilled / prompt,  # prompt tokens never prefilled (retractions count)
        "tok_s": completion / wall,
        "wall": wall,
    }


def kv_tokens(args, num_engines: int, workload: str) -> int:
    """KV tokens per engine (or ``--kv-tokens``): ``1/num_engines`` of the workload's reusable
    context plus room for what runs -- for the shared prefix, the system prompts plus the
    running tails; for conversations, the conversations at their last turn. It fits only
    when each engine keeps its own share, so the steady-state hit-rate bound over round robin
    is ``num_engines``x (the issue's "2x with 2 engines")."""
    if args.kv_tokens is not None:
        return args.kv_tokens
    if workload == "conversations":
        last = args.first_tokens + (args.turns - 1) * (args.max_new + args.turn_tokens)
        per_engine = -(-args.conversations // num_engines)
        return per_engine * (last + args.max_new + 16)  # + a partial page each
    tail = args.question_tokens + args.max_new + 16
    running = args.max_running if args.arrival == "batch" else args.in_flight
    return args.systems * args.system_tokens // num_engines + running * tail


def run_workload(num_engines: int, workload: str, args) -> dict[str, dict]:
    """Every policy on one workload, on one set of engines sized for it (caches flushed
    between policies, each policy with its own ``RolloutDriver``)."""
    engine = {
        "device": "cpu",
        "max_total_tokens": kv_tokens(args, num_engines, workload),
        "max_running_requests": args.max_running,
        "num_threads": max(1, (os.cpu_count() or 1) // num_engines),
    }
    config = {
        "model_path": args.model_path,
        "num_engines": num_engines,
        "engine": engine,
        "cpus_per_rank": 1,
        "num_cpus": num_engines + 1,
        "policy": "round_robin",
        "ready_timeout_s": 900,
    }
    results = {}
    with deploy(config) as service:
        weights = WeightsSource(service.model_path, service.config.weight_version)
        warm = [tokens(random.Random(0), args, 32)]  # first call: kernels, allocations
        ray.get(
            [
                e.generate.remote(input_ids=warm, sampling_params={"max_new_tokens": 2})
                for e in service.engines
            ]
        )
        for policy in POLICIES:
            flushed = ray.get([e.flush_cache.remote() for e in service.engines])
            assert all(r.success for r in flushed)
            driver = RolloutDriver.options(num_cpus=0).remote(
                service.engines, policy, weights, 60.0, {}
            )
            before = cache_counters(service.engines)
            if workload == "shared prefix":
                prompts = shared_prefix(args, random.Random(1))
                outs, wall = run_shared(driver, args, prompts, num_engines)
            else:
                outs, wall = run_conversations(driver, args, 2, num_engines)
            results[policy] = measure(outs, wall, before, cache_counters(service.engines))
            results[policy]["stats"] = ray.get(driver.routing_stats.remote()).get("decisions")
            ray.kill(driver)
            print(num_engines, workload, policy, results[policy], flush=True)
    return results


def one_size(num_engines: int, args) -> list[dict[str, Any]]:
    rows = []
    for workload in ("shared prefix", "conversations"):
        results = run_workload(num_engines, workload, args)
        base = results["round_robin"]
        for policy, r in results.items():
            rows.append(
                {
                    "engines": num_engines,
                    "workload": workload,
                    "policy": policy,
                    **r,
                    "hit_x": r["hit"] / base["hit"] if base["hit"] else float("inf"),
                    "tok_x": r["tok_s"] / base["tok_s"],
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| engines | workload | policy | hit rate | vs RR | prefill saved | output tok/s "
        "| vs RR | wall (s) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engines']} | {r['workload']} | {r['policy']} | {r['hit']:.3f} | "
            f"{r['hit_x']:.2f}x | {r['saved']:.3f} | {r['tok_s']:.1f} | {r['tok_x']:.2f}x | "
            f"{r['wall']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--engines", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--systems", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=256)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--question-tokens", type=int, default=16)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--first-tokens", type=int, default=256)
    ap.add_argument("--turn-tokens", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--max-running", type=int, default=16)
    ap.add_argument(
        "--kv-tokens",
        type=int,
        default=None,
        help="KV tokens per engine (default: 1/engines of the system prompts + running tails)",
    )
    ap.add_argument("--arrival", choices=("stream", "batch"), default="stream")
    ap.add_argument("--in-flight", type=int, default=8, help="stream: requests per engine")
    ap.add_argument("--model-path", default=None, help="default: the embedded default model")
    ap.add_argument("--vocab", type=int, default=40000, help="token ids drawn below this")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    from benchmarks._report import load_note

    load_start = os.getloadavg()[0]
    rows = [row for n in args.engines for row in one_size(n, args)]
    kv = "; ".join(
        f"{n} engines: {kv_tokens(args, n, 'shared prefix')} / "
        f"{kv_tokens(args, n, 'conversations')}"
        for n in args.engines
    )
    arrival = (
        "arriving shuffled in one rollout call"
        if args.arrival == "batch"
        else f"arriving shuffled one request at a time, {args.in_flight} in flight per engine"
    )
    body = (
        f"Default model (SmolLM2-135M fp32) on CPU, greedy, {args.max_new} new tokens per "
        f"prompt, KV tokens per engine, shared prefix / conversations ({kv}) = 1/engines of "
        f"the {args.systems} system prompts + the running tails / of the conversations at "
        f"their last turn (a deployment per workload), max_running_requests "
        f"{args.max_running}. Shared prefix: "
        f"{args.systems} system prompts x {args.system_tokens} tokens x {args.questions} "
        f"questions of {args.question_tokens} tokens, {arrival}. "
        f"Conversations: {args.conversations} x {args.turns} turns ({args.first_tokens}-token "
        f"start, +{args.turn_tokens} tokens a turn, session_id per conversation, "
        + (
            "each turn of all conversations one call"
            if args.arrival == "batch"
            else "each conversation sending its next turn as soon as its last one returns"
        )
        + "). Hit rate = "
        "the engines' own `prefix_cache` counters over the workload (hit / looked-up prompt "
        "tokens, per admission); prefill saved = 1 - tokens prefilled / prompt tokens (a "
        "retracted request's recomputation counts against it). Same engines for every "
        "policy of a workload (caches flushed between), one run each. "
        + load_note(load_start)
        + "\n\n"
        + table(rows)
    )
    print(body)
    if not args.no_report:
        from benchmarks._report import write_section

        write_section("Cache-aware routing (prefix hit rate and throughput)", body)


if __name__ == "__main__":
    main()
