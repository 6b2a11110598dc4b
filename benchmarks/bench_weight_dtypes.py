"""How far the opt-in narrow weight modes move logprobs on the default model, and their decode
speed, against fp32 weights in the same run.

The fp32 engine generates greedy completions of distinct random prompts; every engine then
scores those exact sequences (teacher-forced: prompt + completion as input, logprobs of the
completion tokens), so the gaps compare the same tokens. Reported: max and mean |logprob gap|,
the share of positions whose greedy (argmax) token differs, and batch-1 / batch-32 decode tok/s.

    python benchmarks/bench_weight_dtypes.py [--prompts 16] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import load_note, write_section  # noqa: E402
from engine_core import Engine  # noqa: E402
from engine_core.default_model import ensure_default_model  # noqa: E402

MODES = ("auto", "bfloat16", "int8")


def prompts(num: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(num)]


def scored(engine: Engine, seqs: list[list[int]], start: int) -> list[list[tuple[float, int]]]:
    """Per sequence, (logprob of the given token, greedy token) at every position >= start."""
    outs = engine.generate(
        input_ids=seqs,
        sampling_params={"max_new_tokens": 1, "temperature": 0},
        return_logprob=True,
        logprob_start_len=start,
        top_logprobs_num=1,
    )
    rows = []
    for out in outs:
        meta = out["meta_info"]
        given = [lp for lp, _, _ in meta["input_token_logprobs"]]  # token i given < i
        top = [t[0][1] for t in meta["input_top_logprobs"]]  # the argmax at the same i
        rows.append(list(zip(given, top)))
    return rows


def decode_rate(engine: Engine, batch: list[list[int]], new_tokens: int) -> float:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    engine.flush_cache()
    begin = time.perf_counter()
    outs = engine.generate(input_ids=batch, sampling_params=params)
    return sum(len(o["output_ids"]) for o in outs) / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    path = ensure_default_model()
    plen = 64
    batch = prompts(args.prompts, plen, 5)
    greedy = {"temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
    results: dict[str, dict] = {}
    reference = None
    for mode in MODES:
        with Engine(path, skip_tokenizer_init=True, weight_dtype=mode) as engine:
            if reference is None:
                outs = engine.generate(input_ids=batch, sampling_params=greedy)
                seqs = [p + o["output_ids"] for p, o in zip(batch, outs)]
            scores = scored(engine, seqs, plen)
            rates = {b: decode_rate(engine, prompts(b, 96, b), 48) for b in (1, 32)}
        if reference is None:
            reference = scores
        gaps = [abs(a[0] - b[0]) for ra, rb in zip(scores, reference) for a, b in zip(ra, rb)]
        flips = [a[1] != b[1] for ra, rb in zip(scores, reference) for a, b in zip(ra, rb)]
        results[mode] = {
            "max": max(gaps),
            "mean": sum(gaps) / len(gaps),
            "flips": sum(flips) / len(flips),
            "positions": len(gaps),
            **rates,
        }
        print(mode, results[mode], flush=True)
    rows = [
        "| weights | max abs logprob gap | mean abs gap | greedy token differs | "
        "batch 1 (tok/s) | batch 32 (tok/s) | batch 1 vs fp32 | batch 32 vs fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = results["auto"]
    for mode, r in results.items():
        name = {"auto": "fp32 (default)", "bfloat16": "bf16", "int8": "int8"}[mode]
        rows.append(
            f"| {name} | {r['max']:.4f} | {r['mean']:.5f} | {100 * r['flips']:.1f} % | "
            f"{r[1]:.1f} | {r[32]:.1f} | {r[1] / base[1]:.2f}x | {r[32] / base[32]:.2f}x |"
        )
    body = (
        f"SmolLM2-135M, fp32 compute; {args.prompts} random 64-token prompts, their fp32 greedy "
        f"completions ({args.new_tokens} tokens) scored teacher-forced by each mode "
        f"({results['auto']['positions']} positions); decode: 48 new tokens of 96-token "
        "prompts. " + load_note(load_start) + "\n\n" + "\n".join(rows)
    )
    write_section("Narrow weight modes: logprob gap and speed (issue 15)", body)


if __name__ == "__main__":
    main()
