"""Our engine vs vLLM-CPU vs HF ``generate`` on issue 15's workloads, side by side in one run.

Workloads (SmolLM2-135M fp32, greedy, exactly ``--new-tokens`` new tokens, distinct random
prompts): batch 1 and batch 32 of 96-token prompts, and GRPO: 8 prompts x n=8 of 256 tokens.
Each system is timed after a warm-up; vLLM runs as a subprocess in its own venv
(``../shared/peers/setup_vllm_cpu.sh``; skipped with a message when absent). Also reports our
load-to-first-token time, peak RSS and, with ``--deterministic``, deterministic mode; with
``--sampled``, every workload again sampled at temperature 1.0 (what an RL rollout does).

    python benchmarks/bench_vs_vllm.py [--new-tokens 128] [--deterministic] [--bf16-weights]
        [--int8-weights] [--sampled] [--rounds N] [--vllm-venv DIR]
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
from benchmarks._report import load_note, write_section  # noqa: E402
from engine_core import Engine  # noqa: E402
from engine_core.default_model import ensure_default_model  # noqa: E402


def prompts(num: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(num)]


GREEDY_KEYS = ("batch 1", "batch 32", "GRPO 8x n8")
SAMPLED = " T=1"  # suffix of the sampled copies' names
WORKLOAD_KEYS = GREEDY_KEYS + tuple(k + SAMPLED for k in GREEDY_KEYS)


def workloads(new_tokens: int, sampled: bool = False) -> list[dict]:
    """The greedy workloads; with ``sampled`` also their copies at temperature 1.0 (the RL
    setting: GRPO draws its n samples at T=1)."""

    def work(name, batch, n, temperature=0.0):
        return {
            "name": name,
            "prompts": batch,
            "n": n,
            "max_tokens": new_tokens,
            "temperature": temperature,
        }

    greedy = [
        work("batch 1", prompts(1, 96, 1), 1),
        work("batch 32", prompts(32, 96, 32), 1),
        work("GRPO 8x n8", prompts(8, 256, 8), 8),
    ]
    if not sampled:
        return greedy
    return greedy + [w | {"name": w["name"] + SAMPLED, "temperature": 1.0} for w in greedy]


def expanded(work: dict) -> dict:
    """A greedy rollout with n > 1 as ``n`` copies of each prompt with n=1: vLLM and HF refuse
    greedy sampling with n > 1 (vLLM's prefix cache still prefills each prompt once)."""
    if work["temperature"] > 0:
        return work
    prompts_n = [ids for ids in work["prompts"] for _ in range(work["n"])]
    return work | {"prompts": prompts_n, "n": 1}


def run_ours(path: str, works: list[dict], deterministic: bool, weight_dtype: str = "auto") -> dict:
    started = time.perf_counter()
    kwargs = {"deterministic": deterministic, "weight_dtype": weight_dtype}
    with Engine(path, skip_tokenizer_init=True, **kwargs) as engine:
        engine.generate(input_ids=[[11, 12, 13]], sampling_params={"max_new_tokens": 1})
        out: dict = {"load_s": time.perf_counter() - started}
        for work in works:
            params = {"temperature": work["temperature"], "max_new_tokens": work["max_tokens"]}
            params |= {"ignore_eos": True, "n": work["n"]}
            engine.flush_cache()
            begin = time.perf_counter()
            outs = engine.generate(input_ids=work["prompts"], sampling_params=params)
            elapsed = time.perf_counter() - begin
            out[work["name"]] = sum(len(o["output_ids"]) for o in outs) / elapsed
        info = engine.get_server_info()
        out["peak_rss_gib"] = info["peak_rss_bytes"] / 2**30
        out["retractions"] = info["num_retractions"]
    return out


def best_of(kept: dict | None, new: dict) -> dict:
    """Per workload the higher throughput; load time and RSS from the first round."""
    if kept is None:
        return new
    return kept | {k: max(v, new[k]) for k, v in kept.items() if k in WORKLOAD_KEYS and k in new}


@torch.inference_mode()
def run_hf(path: str, works: list[dict]) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}
    for work in map(expanded, works):
        if work["temperature"] > 0:
            continue  # HF's sampled speed is its greedy speed; the baseline is timed greedy only
        ids = torch.tensor(work["prompts"])
        new = work["max_tokens"]
        begin = time.perf_counter()
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
        )
        elapsed = time.perf_counter() - begin
        out[work["name"]] = (gen.shape[0] * (gen.shape[1] - ids.shape[1])) / elapsed
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument(
        "--bf16-weights", action="store_true", help="also our engine with weight_dtype=bfloat16"
    )
    parser.add_argument(
        "--int8-weights", action="store_true", help="also our engine with weight_dtype=int8"
    )
    parser.add_argument("--rounds", type=int, default=1, help="best of this many rounds")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument(
        "--sampled", action="store_true", help="also every workload sampled at temperature 1.0"
    )
    parser.add_argument("--vllm-venv", default=None)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    path = ensure_default_model()
    works = workloads(args.new_tokens, args.sampled)
    python = vllm_python(args.vllm_venv)
    note = ""
    if python is None:
        note = "vLLM-CPU skipped: no venv (run ../shared/peers/setup_vllm_cpu.sh).\n\n"
        print(note, flush=True)
    systems = {"rl-rollout Engine": lambda: run_ours(path, works, False)}
    if args.deterministic:
        systems["Engine deterministic"] = lambda: run_ours(path, works, True)
    if args.bf16_weights:
        systems["Engine bf16 weights"] = lambda: run_ours(path, works, False, "bfloat16")
    if args.int8_weights:
        systems["Engine int8 weights"] = lambda: run_ours(path, works, False, "int8")
    if python is not None:
        job = {
            "model": path,
            "workloads": [expanded(w) for w in works],
            "prefix_caching": True,
            "kv_gib": 2,
        }
        systems["vLLM-CPU"] = lambda: run_vllm(python, job, threads=os.cpu_count() or 1)
    # Rounds: every system once per round, in turn; each cell keeps its best round (the host's
    # memory bandwidth drifts over minutes, and a system measured in a slow spell would
    # otherwise carry it).
    columns: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, run in systems.items():
            columns[name] = best_of(columns.get(name), run())
            print(name, columns[name], flush=True)
    if not args.no_hf:
        columns["HF generate"] = run_hf(path, works)
    print(columns, flush=True)
    write_section(
        "Engine vs vLLM-CPU vs HF (issue 15)", report(columns, works, args, note, load_start)
    )


def ratio_columns(columns: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(header, numerator column, denominator column) of the ratios this run can give."""
    out = []
    if "vLLM-CPU" in columns:
        out.append(("ours / vLLM", "rl-rollout Engine", "vLLM-CPU"))
        if "Engine bf16 weights" in columns:
            out.append(("bf16 weights / vLLM", "Engine bf16 weights", "vLLM-CPU"))
        if "Engine int8 weights" in columns:
            out.append(("int8 weights / vLLM", "Engine int8 weights", "vLLM-CPU"))
    if "Engine deterministic" in columns:
        out.append(("deterministic / default", "Engine deterministic", "rl-rollout Engine"))
    return out


def report(columns: dict[str, dict], works: list[dict], args, note: str, load_start) -> str:
    names = list(columns)
    ratios = ratio_columns(columns)
    head = "| workload | " + " | ".join(f"{n} (tok/s)" for n in names)
    rows = [head + "".join(f" | {h}" for h, _, _ in ratios) + " |"]
    rows.append("|---" * (len(names) + 1 + len(ratios)) + "|")
    for work in works:
        key = work["name"]
        cells = [f"{columns[n][key]:.1f}" if key in columns[n] else "-" for n in names]
        cells += [
            f"{columns[a][key] / columns[b][key]:.2f}x"
            if key in columns[a] and key in columns[b]
            else "-"
            for _, a, b in ratios
        ]
        rows.append(f"| {work['name']} | " + " | ".join(cells) + " |")
    ours = columns["rl-rollout Engine"]
    load = " / ".join(f"{n} {c['load_s']:.1f} s" for n, c in columns.items() if "load_s" in c)
    return (
        f"{note}SmolLM2-135M fp32, greedy (and, rows marked T=1, sampled at temperature 1.0, "
        f"top-p/top-k off), exactly {args.new_tokens} new tokens, distinct "
        "prompts (96 tokens; GRPO = 8 prompts x n=8 of 256), every system measured in this "
        f"run, one after the other, best of {args.rounds} round(s) per cell. "
        + load_note(load_start)
        + "\n\n"
        + "\n".join(rows)
        + f"\n\nLoad to first token: {load}. Our peak RSS: {ours['peak_rss_gib']:.2f} GiB; "
        f"retractions: {ours['retractions']}."
    )


if __name__ == "__main__":
    main()
