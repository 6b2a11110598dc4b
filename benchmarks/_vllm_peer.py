"""Runs inside vLLM-CPU's own virtualenv (``../shared/peers/setup_vllm_cpu.sh``), as a peer in
side-by-side benchmarks: reads a JSON job on stdin, prints one JSON line of results.

Job: ``{"model": DIR, "workloads": [{"name", "prompts": [[ids]], "n", "max_tokens",
"temperature"}], "prefix_caching": bool, "kv_gib": float}``. Each workload is timed after one
warm-up call; the result is ``{"name": tok/s}`` plus ``"load_s"``. Not imported by the project.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    job = json.loads(sys.stdin.read())
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=job["model"],
        dtype="float32",
        max_model_len=job.get("max_model_len", 2048),
        enforce_eager=True,
        enable_prefix_caching=job["prefix_caching"],
        seed=0,
    )
    results: dict = {"load_s": time.perf_counter() - started}
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [11, 12, 13]}], warm, use_tqdm=False)
    for work in job["workloads"]:
        params = SamplingParams(
            n=work["n"],
            max_tokens=work["max_tokens"],
            temperature=work["temperature"],
            ignore_eos=True,
            # no per-request seed: vLLM-CPU's seeded sampler fails ("CPU Generator does not
            # use offset"); the engine's own seed (above) makes runs repeat
        )
        prompts = [{"prompt_token_ids": ids} for ids in work["prompts"]]
        if job["prefix_caching"]:
            llm.reset_prefix_cache()
        begin = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        results[work["name"]] = tokens / elapsed
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
