"""What one forward step computes, as plain Python data (picklable, so rank 0 can send it to
the other TP ranks). Built from scheduler chunks; turned into tensors only by the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine_core.requests.request import Request
from engine_core.scheduling.scheduler import Chunk


@dataclass
class SeqPlan:
    """``token_ids`` at absolute positions ``start..`` of a request whose KV lives in ``pages``."""

    token_ids: list[int]
    start: int
    pages: list[int]


@dataclass
class SampleSpec:
    logit_row: int  # index into StepPlan.logit_rows
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    position: int  # position of the token being sampled; with the seed it fixes the draw


@dataclass
class StepPlan:
    seqs: list[SeqPlan] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)  # flattened token rows needing logits
    target_ids: list[int] = field(
        default_factory=list
    )  # token scored at each logit row; -1: sampled
    logprob_temps: list[float] = field(default_factory=list)
    top_logprobs: list[int] = field(default_factory=list)
    token_ids: list[list[int] | None] = field(default_factory=list)  # token_ids_logprob per row
    samples: list[SampleSpec] = field(default_factory=list)
    want_logprobs: bool = False
    hidden_rows: list[int] = field(default_factory=list)  # rows whose hidden states return


@dataclass
class StepResult:
    tokens: list[int]  # one per SampleSpec
    logprobs: list[float] | None  # one per logit row (None if not requested)
    top_logprobs: list[list[tuple[float, int]]]  # per logit row, empty when not requested
    # per logit row: (logprob, id) of the request's token_ids_logprob (None: not asked)
    token_ids_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    hidden_states: list[list[float]] = field(default_factory=list)  # one per hidden row


def build_plan(chunks: list[Chunk]) -> StepPlan:
    """Flatten chunks into a StepPlan; records which rows score prompt tokens or sample."""
    plan = StepPlan()
    row = 0
    for chunk in chunks:
        req = chunk.req
        ids = req.all_ids
        plan.seqs.append(
            SeqPlan(ids[chunk.start : chunk.start + chunk.length], chunk.start, req.pages)
        )
        if req.return_hidden_states:
            plan.hidden_rows.extend(range(row, row + chunk.length))
        if req.return_logprob:
            for pos in range(chunk.start, chunk.start + chunk.length):
                if req.wants_input_logprob_at(pos):
                    _add_logit_row(plan, req, row + pos - chunk.start, ids[pos + 1])
        if chunk.samples:
            _add_logit_row(plan, req, row + chunk.length - 1, -1)
            p = req.params
            plan.samples.append(
                SampleSpec(
                    len(plan.logit_rows) - 1,
                    p.temperature,
                    p.top_k,
                    p.top_p,
                    p.min_p,
                    req.seed,
                    req.num_tokens,
                )
            )
        row += chunk.length
    return plan


def _add_logit_row(plan: StepPlan, req: Request, row: int, target: int) -> None:
    plan.logit_rows.append(row)
    plan.target_ids.append(target)
    plan.logprob_temps.append(req.params.logprob_temperature)
    plan.top_logprobs.append(req.top_logprobs_num if req.return_logprob else 0)
    plan.token_ids.append(req.token_ids_logprob if req.return_logprob else None)
    plan.want_logprobs = plan.want_logprobs or req.return_logprob
