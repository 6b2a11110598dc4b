"""Microbenchmark: the cache-aware router's decision cost with 10k cached prefixes.

The index is filled from events as engines would publish them: ``--prefixes`` distinct cached
prompts of ``--prompt-tokens`` tokens spread over ``--engines`` engines (``page_size`` 16), on
top of shared system prompts. Then ``--decisions`` routing decisions are timed, one
``CacheAwarePolicy.choose`` each (block hashing of the prompt, the index walk, the balance check,
the provisional insert): half repeat a cached prompt with a new question, half are new prompts.
Prints µs per decision (median, p99, mean) and writes a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core.scheduling.cache_events import ROOT_HASH, BlocksStored, block_hashes  # noqa: E402
from rollout.policies import EngineLoad, GroupInfo  # noqa: E402
from rollout.routing.cache_aware import CacheAwarePolicy  # noqa: E402
from rollout.routing.config import RouterConfig  # noqa: E402

PAGE = 16


def build(args, rng: random.Random) -> tuple[CacheAwarePolicy, list[list[int]]]:
    policy = CacheAwarePolicy(RouterConfig(max_entries=args.prefixes * 40))
    policy.page_size = PAGE
    systems = [[rng.randrange(50_000) for _ in range(128)] for _ in range(64)]
    prompts = []
    for i in range(args.prefixes):
        tail = [rng.randrange(50_000) for _ in range(args.prompt_tokens - 128)]
        prompt = systems[i % len(systems)] + tail
        prompts.append(prompt)
        hashes = block_hashes(prompt, PAGE)
        policy.index.apply(i % args.engines, [BlocksStored(tuple(hashes), ROOT_HASH)])
    return policy, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prefixes", type=int, default=10_000)
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decisions", type=int, default=5000)
    ap.add_argument("--no-report", action="store_true", help="print only")
    args = ap.parse_args()
    rng = random.Random(0)
    policy, prompts = build(args, rng)
    loads = [EngineLoad(i, 0, 0) for i in range(args.engines)]
    groups = []
    for i in range(args.decisions):
        if i % 2:
            ids = prompts[rng.randrange(len(prompts))][:-16] + [rng.randrange(50_000)] * 16
        else:
            ids = [rng.randrange(50_000) for _ in range(args.prompt_tokens)]
        groups.append(GroupInfo(i, None, tuple(ids), 4, len(ids) + 4 * 128))
    times, cpu = [], []
    for g in groups:
        start, start_cpu = time.perf_counter(), time.thread_time()
        pick = policy.choose(g, loads)
        cpu.append(time.thread_time() - start_cpu)
        times.append(time.perf_counter() - start)
        loads[pick] = EngineLoad(pick, loads[pick].outstanding_tokens + g.est_tokens, 0)
        if len(times) % 64 == 0:  # requests finish: keep the engines balanced and loaded
            loads = [EngineLoad(i, 0, 0) for i in range(args.engines)]
    hashing = []
    for g in groups[:1000]:
        start = time.perf_counter()
        block_hashes(g.input_ids, PAGE)
        hashing.append(time.perf_counter() - start)
    us = sorted(t * 1e6 for t in times)
    median, p99, mean = statistics.median(us), us[int(0.99 * len(us))], statistics.fmean(us)
    cpu_us = sorted(t * 1e6 for t in cpu)
    cpu_median, cpu_p99 = statistics.median(cpu_us), cpu_us[int(0.99 * len(cpu_us))]
    cpu_mean = statistics.fmean(cpu_us)
    hash_us = statistics.median(hashing) * 1e6
    print(
        f"{len(policy.index)} indexed page hashes ({args.prefixes} cached prompts), "
        f"{args.engines} engines, {args.prompt_tokens}-token prompts: wall median {median:.1f} "
        f"us, p99 {p99:.1f} us, mean {mean:.1f} us per decision; CPU median {cpu_median:.1f} "
        f"us, p99 {cpu_p99:.1f} us, mean {cpu_mean:.1f} us (of which hashing the prompt's "
        f"pages: {hash_us:.1f} us); {dict(policy.decisions)}"
    )
    if args.no_report:
        return
    from benchmarks._report import write_section

    body = (
        f"`CacheAwarePolicy.choose` over an index filled from events: {args.prefixes} cached "
        f"prompts of {args.prompt_tokens} tokens (64 shared 128-token system prompts) on "
        f"{args.engines} engines, page size {PAGE} = {len(policy.index)} indexed page hashes; "
        f"{args.decisions} decisions, half a cached prompt with a new tail, half new prompts. "
        "Includes hashing the prompt's pages (blake2b per page), the index walk, the balance "
        "check and the provisional insert; not the tokenization of text prompts.\n\n"
        "| clock | median (µs) | p99 (µs) | mean (µs) |\n"
        "|---|---:|---:|---:|\n"
        f"| wall | {median:.1f} | {p99:.1f} | {mean:.1f} |\n"
        f"| this thread's CPU | {cpu_median:.1f} | {cpu_p99:.1f} | {cpu_mean:.1f} |\n\n"
        f"Of which hashing the prompt's pages: {hash_us:.1f} µs (median). Target: < 1000 µs "
        f"per decision at 10k cached prefixes. Decisions: {dict(policy.decisions)}. Load "
        f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: under load the wall-clock "
        "tail is preemption, the CPU column is not."
    )
    write_section("Cache-aware router decision cost", body)


if __name__ == "__main__":
    main()
