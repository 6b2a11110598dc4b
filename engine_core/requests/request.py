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

    @property
    def input_logprob_start(self) -> int:
        """First prompt position whose logprob is reported (SGLang: -1 means none)."""
        if not self.return_logprob or self.logprob_start_len < 0:
            return len(self.prompt_ids)
        return min(self.logprob_start_len, len(self.prompt_ids))

    def wants_input_logprob_at(self, position: int) -> bool:
        """Whether the logits row at ``position`` scores a prompt token still to be reported.

        Row ``p`` predicts token ``p + 1``; ``input_logprobs[j]`` is prompt position
        ``input_logprob_start + j`` (position 0 has no logprob: None). Rows already reported are
        skipped, so a retracted-and-recomputed prefill never reports twice.
        """
        target = position + 1
        start = self.input_logprob_start
        return start <= target < len(self.prompt_ids) and target - start >= len(self.input_logprobs)
