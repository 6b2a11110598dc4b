"""A request's bookkeeping: tokens, KV pages, progress, outputs. Pure Python, no torch."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine_core.requests.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence being generated.

    Invariant: ``num_computed`` tokens of ``all_ids`` have their KV in ``pages``; the tokens after
    that still need a forward pass. After a decode step the newly sampled token is the only one
    not computed. A retracted request keeps ``output_ids`` and recomputes its KV on readmission.
    """

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: int
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None  # ids whose logprobs every position reports
    max_new_tokens: int = 0  # params.max_new_tokens clipped to the context length
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0
    pages: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    cache_salt: str | None = None  # SGLang's: shares cached prefixes only within one salt
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_token_ids_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    input_token_ids_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_versions: list[str] = field(default_factory=list)
    return_hidden_states: bool = False
    # position -> final-norm hidden state of the token there (rows recomputed after a
    # retraction overwrite theirs); meta_info["hidden_states"] is built from it.
    hidden_states: dict[int, list[float]] = field(default_factory=dict)
    finish_reason: dict | None = None
    num_retractions: int = 0
    created_at: float = field(default_factory=time.monotonic)  # submission (e2e_latency)
    # output token -> count, for the penalties; a cache of output_ids (see output_counts)
    _counts: dict[int, int] = field(default_factory=dict, repr=False)
    _counted: int = field(default=0, repr=False)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def output_counts(self) -> dict[int, int]:
        """How often each token occurs in ``output_ids`` (the prompt is not counted, as in
        SGLang's penalizers). Derived from ``output_ids`` alone, so a retracted and recomputed
        request keeps its penalty state; updated incrementally (each token is counted once)."""
        if self._counted > len(self.output_ids):  # never shrinks today; recount if it does
            self._counts, self._counted = {}, 0
        for tok in self.output_ids[self._counted :]:
            self._counts[tok] = self._counts.get(tok, 0) + 1
        self._counted = len(self.output_ids)
        return self._counts

    @property
    def input_logprob_start(self) -> int:
        """First prompt position whose logprob is reported (SGLang: -1 means none)."""
        if not self.return_logprob or self.logprob_start_len < 0:
            return len(self.prompt_ids)
        return min(self.logprob_start_len, len(self.prompt_ids))

    def cacheable_prefix(self) -> int:
        """How many leading tokens may take their KV from the prefix cache: never the last
        (its logits sample the next token), nor the row before the first prompt token whose
        input logprob is still to be reported (that row's logits must be computed), nor any
        row when hidden states are returned."""
        limit = self.num_tokens - 1
        if self.return_hidden_states:
            return 0  # every row's hidden state is reported: each must be computed
        if self.return_logprob:
            first_target = self.input_logprob_start + len(self.input_logprobs)
            if first_target < len(self.prompt_ids):
                limit = min(limit, first_target - 1)
        return max(limit, 0)

    def wants_input_logprob_at(self, position: int) -> bool:
        """Whether the logits row at ``position`` scores a prompt token still to be reported.

        Row ``p`` predicts token ``p + 1``; ``input_logprobs[j]`` is prompt position
        ``input_logprob_start + j`` (position 0 has no logprob: None). Rows already reported are
        skipped, so a retracted-and-recomputed prefill never reports twice.
        """
        target = position + 1
        start = self.input_logprob_start
        return start <= target < len(self.prompt_ids) and target - start >= len(self.input_logprobs)
