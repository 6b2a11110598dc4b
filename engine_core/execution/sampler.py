"""Sampling and logprobs for one step: the logits rows of a StepPlan -> a StepResult.

Tokens: greedy when every sample is greedy, else ``kernels.sample_tokens`` (temperature, top-k,
top-p, min-p, with counter-based noise per (seed, position), so a sample does not depend on its
batch partners). Logprobs: ``log_softmax(logits / T)`` over the full vocabulary, T = 1 for greedy.
"""

from __future__ import annotations

import torch

from engine_core.scheduling.step_plan import StepPlan, StepResult


def sample_step(logits: torch.Tensor, plan: StepPlan) -> StepResult:
    """Sample the plan's tokens from ``logits`` (one row per ``plan.logit_rows`` entry) and,
    if asked, their logprobs and top logprobs."""
    tokens = sample_tokens(logits, plan)
    if not plan.want_logprobs:
        return StepResult(tokens, None, [])
    targets = list(plan.target_ids)
    for spec, token in zip(plan.samples, tokens):
        targets[spec.logit_row] = token
    dev = logits.device
    temps = torch.tensor(plan.logprob_temps, dtype=torch.float32, device=dev).unsqueeze(1)
    logprobs = torch.log_softmax(logits / temps, dim=-1)
    target_t = torch.tensor(targets, dtype=torch.long, device=dev).unsqueeze(1)
    chosen = logprobs.gather(1, target_t).squeeze(1).tolist()
    tops = top_logprobs(logprobs, plan.top_logprobs)
    return StepResult(tokens, chosen, tops, token_ids_logprobs(logprobs, plan.token_ids))


def sample_tokens(logits: torch.Tensor, plan: StepPlan) -> list[int]:
    if not plan.samples:
        return []
    dev = logits.device
    rows = torch.tensor([s.logit_row for s in plan.samples], dtype=torch.long, device=dev)
    sample_logits = logits.index_select(0, rows)
    if all(s.temperature == 0.0 for s in plan.samples):
        return sample_logits.argmax(dim=-1).tolist()
    import kernels

    def col(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([getattr(s, name) for s in plan.samples], dtype=dtype, device=dev)

    return kernels.sample_tokens(
        sample_logits,
        col("temperature", torch.float32),
        col("top_k", torch.long),
        col("top_p", torch.float32),
        col("min_p", torch.float32),
        col("seed", torch.long),
        col("position", torch.long),
    ).tolist()


def top_logprobs(logprobs: torch.Tensor, nums: list[int]) -> list[list[tuple[float, int]]]:
    k = max(nums, default=0)
    if k <= 0:
        return [[] for _ in nums]
    values, indices = logprobs.topk(k, dim=-1)
    values, indices = values.tolist(), indices.tolist()
    return [list(zip(values[i][:n], indices[i][:n])) for i, n in enumerate(nums)]


def token_ids_logprobs(
    logprobs: torch.Tensor, ids_per_row: list[list[int] | None]
) -> list[list[tuple[float, int]] | None]:
    """SGLang's ``token_ids_logprob``: the logprobs of given token ids at each row."""
    out: list[list[tuple[float, int]] | None] = []
    for row, ids in enumerate(ids_per_row):
        if ids is None:
            out.append(None)
            continue
        index = torch.tensor(ids, dtype=torch.long, device=logprobs.device)
        out.append(list(zip(logprobs[row].index_select(0, index).tolist(), ids)))
    return out
