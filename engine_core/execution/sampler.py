"""Sampling and logprobs for one step: the logits rows of a StepPlan -> a StepResult.

Tokens: greedy when every sample is greedy, else ``kernels.sample_tokens`` (temperature, top-k,
top-p, min-p, with counter-based noise per (seed, position), so a sample does not depend on its
batch partners). Logprobs: ``log_softmax(logits / T)`` over the full vocabulary, T = 1 for greedy.

Penalties (``kernels.apply_penalties``: repetition, frequency, presence, min_new_tokens) are
applied to a sampled row's logits first, so -- as in SGLang, whose penalizers modify the logits
before its sampler divides by the temperature and takes the logprobs -- a penalized row's
token, logprob and top logprobs all come from the penalized logits. Rows scoring prompt tokens
(input logprobs) are never penalized.
"""

from __future__ import annotations

import torch

from engine_core.scheduling.step_plan import PenaltySpec, StepPlan, StepResult


def sample_step(logits: torch.Tensor, plan: StepPlan) -> StepResult:
    """Sample the plan's tokens from ``logits`` (one row per ``plan.logit_rows`` entry) and,
    if asked, their logprobs and top logprobs."""
    logits = penalized_logits(logits, plan)
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


def penalized_logits(logits: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """``logits`` with every sampled row that has a ``PenaltySpec`` penalized (a new tensor;
    ``logits`` itself when no row has one). Ids outside the logits' columns (a stop id past
    the vocabulary) are ignored."""
    specs = [(s.logit_row, s.penalty) for s in plan.samples if s.penalty is not None]
    if not specs:
        return logits
    import kernels

    dev = logits.device
    vocab = logits.shape[1]
    n = len(specs)
    counts = torch.zeros((n, vocab), dtype=torch.float32, device=dev)
    banned = torch.zeros((n, vocab), dtype=torch.bool, device=dev)
    count_at, banned_at = _scatter_index(specs, vocab)
    if count_at[0]:
        index = (_long(count_at[0], dev), _long(count_at[1], dev))
        counts.index_put_(index, torch.tensor(count_at[2], dtype=torch.float32, device=dev))
    if banned_at[0]:
        banned[_long(banned_at[0], dev), _long(banned_at[1], dev)] = True

    def col(name: str) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for _, p in specs], dtype=torch.float32, device=dev)

    rows = _long([row for row, _ in specs], dev)
    penalized = kernels.apply_penalties(
        logits.index_select(0, rows).float(),
        counts,
        col("frequency"),
        col("presence"),
        col("repetition"),
        banned,
    )
    return logits.float().index_copy(0, rows, penalized)


def _scatter_index(
    specs: list[tuple[int, PenaltySpec]], vocab: int
) -> tuple[tuple[list, list, list], tuple[list, list]]:
    """(rows, ids, counts) of the counted tokens and (rows, ids) of the banned ones."""
    c_rows: list[int] = []
    c_ids: list[int] = []
    c_vals: list[int] = []
    b_rows: list[int] = []
    b_ids: list[int] = []
    for i, (_, p) in enumerate(specs):
        for tok, n in zip(p.token_ids, p.counts):
            if tok < vocab:
                c_rows.append(i)
                c_ids.append(tok)
                c_vals.append(n)
        for tok in p.banned_ids:
            if tok < vocab:
                b_rows.append(i)
                b_ids.append(tok)
    return (c_rows, c_ids, c_vals), (b_rows, b_ids)


def _long(values: list[int], dev: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=dev)


def sample_tokens(logits: torch.Tensor, plan: StepPlan) -> list[int]:
    if not plan.samples:
        return []
    import kernels

    dev = logits.device
    rows = [s.logit_row for s in plan.samples]
    sample_logits = logits
    if rows != list(range(logits.shape[0])):  # decode steps sample every row, in order
        sample_logits = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=dev))
    if all(s.temperature == 0.0 for s in plan.samples):
        return kernels.greedy_tokens(sample_logits).tolist()

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
