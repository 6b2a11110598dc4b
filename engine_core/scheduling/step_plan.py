"""What one forward step computes, as plain Python data (picklable, so rank 0 can send it to
the other TP ranks). Built from scheduler chunks; turned into tensors only by the model runner."""

from __future__ import annotations

from collections.abc import Iterable
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
class PenaltySpec:
    """What a sampled row's logits are penalized by this step (SGLang's penalizers), derived
    from the request's output tokens: ``token_ids`` / ``counts`` are its distinct output
    tokens and their counts (only when a frequency / presence / repetition penalty is set);
    ``banned_ids`` get -inf while ``min_new_tokens`` is not reached (EOS and stop ids).
    Carried in the plan so every TP rank (rank 0 samples) sees the same, small per step."""

    frequency: float = 0.0
    presence: float = 0.0
    repetition: float = 1.0
    token_ids: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    banned_ids: list[int] = field(default_factory=list)


@dataclass
class SampleSpec:
    logit_row: int  # index into StepPlan.logit_rows
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    position: int  # position of the token being sampled; with the seed it fixes the draw
    penalty: PenaltySpec | None = None  # None: the logits are sampled as they are


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
    # (source, destination) KV pages every rank copies before the forward (prefix cache).
    page_copies: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class StepResult:
    tokens: list[int]  # one per SampleSpec
    logprobs: list[float] | None  # one per logit row (None if not requested)
    top_logprobs: list[list[tuple[float, int]]]  # per logit row, empty when not requested
    # per logit row: (logprob, id) of the request's token_ids_logprob (None: not asked)
    token_ids_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    hidden_states: list[list[float]] = field(default_factory=list)  # one per hidden row


def build_plan(chunks: list[Chunk], eos_ids: Iterable[int] = ()) -> StepPlan:
    """Flatten chunks into a StepPlan; records which rows score prompt tokens or sample.
    ``eos_ids`` (the model's) are banned with the stop ids while ``min_new_tokens`` is not
    reached."""
    eos = sorted(set(eos_ids))
    plan = StepPlan()
    row = 0
    for chunk in chunks:
        req = chunk.req
        ids = req.all_ids
        if chunk.copy_page is not None:
            plan.page_copies.append(chunk.copy_page)
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
                    penalty_spec(req, eos),
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


def penalty_spec(req: Request, eos_ids: list[int]) -> PenaltySpec | None:
    """The row's penalties this step, or None when none applies (the common case: nothing
    extra is pickled). ``min_new_tokens`` bans EOS even with ``ignore_eos``, as SGLang."""
    p = req.params
    banned: list[int] = []
    if len(req.output_ids) < p.min_new_tokens:
        banned = sorted(set(eos_ids) | set(p.stop_token_ids))
    if not p.penalized and not banned:
        return None
    ids: list[int] = []
    counts: list[int] = []
    if p.penalized:
        items = sorted(req.output_counts().items())
        ids = [tok for tok, _ in items]
        counts = [n for _, n in items]
    return PenaltySpec(
        p.frequency_penalty, p.presence_penalty, p.repetition_penalty, ids, counts, banned
    )
