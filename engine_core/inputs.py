"""Normalize and validate ``generate`` arguments into per-sequence specs (before any is queued)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine_core.errors import InvalidRequestError
from engine_core.sampling_params import SamplingParams


@dataclass
class SeqSpec:
    """One prompt after validation; ``n`` samples of it become ``n`` requests."""

    prompt_ids: list[int]
    params: SamplingParams
    rid: str | None
    return_logprob: bool
    logprob_start_len: int
    top_logprobs_num: int


def _is_batch_of_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], list)


def looks_like_sampling_params(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def batch_size_of(prompt: Any, input_ids: Any) -> int | None:
    """None for a single prompt, else the batch length."""
    if (prompt is None) == (input_ids is None):
        raise InvalidRequestError(
            "prompt/input_ids",
            (prompt is not None, input_ids is not None),
            "give exactly one of prompt or input_ids",
        )
    if prompt is not None:
        if isinstance(prompt, str):
            return None
        if not isinstance(prompt, list) or not prompt:
            raise InvalidRequestError("prompt", prompt, "must be a non-empty str or list of str")
        for i, item in enumerate(prompt):
            if not isinstance(item, str):
                raise InvalidRequestError(
                    f"prompt[{i}]", item, "must be a str (token ids go in input_ids)"
                )
        return len(prompt)
    if not isinstance(input_ids, list) or not input_ids:
        raise InvalidRequestError("input_ids", input_ids, "must be a non-empty list of ints")
    return len(input_ids) if _is_batch_of_ids(input_ids) else None


def per_item(value: Any, batch: int | None, field: str, list_ok: bool = False) -> list[Any]:
    """Broadcast a scalar argument to the batch, or check a per-item list's length."""
    if batch is None:
        return [value]
    if isinstance(value, list) and not list_ok:
        if len(value) != batch:
            raise InvalidRequestError(
                field, value, f"has {len(value)} items for a batch of {batch}"
            )
        return value
    return [value] * batch


def check_ids(ids: Any, field: str, vocab_size: int) -> list[int]:
    if not isinstance(ids, list) or not ids:
        raise InvalidRequestError(field, ids, "must be a non-empty list of token ids")
    for tok in ids:
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab_size:
            raise InvalidRequestError(
                field, tok, f"token id outside the vocabulary [0, {vocab_size})"
            )
    return ids


def check_logprob_args(
    return_logprob: Any, start: Any, top_n: Any, field: str, vocab_size: int
) -> None:
    """``logprob_start_len`` past the prompt just reports no input logprobs; more top
    logprobs than the vocabulary has tokens cannot be reported."""
    if not isinstance(return_logprob, bool):
        raise InvalidRequestError(f"{field}return_logprob", return_logprob, "must be a bool")
    if isinstance(start, bool) or not isinstance(start, int) or start < -1:
        raise InvalidRequestError(f"{field}logprob_start_len", start, "must be an int >= -1")
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= vocab_size:
        raise InvalidRequestError(
            f"{field}top_logprobs_num", top_n, f"must be an int in [0, vocab size {vocab_size}]"
        )


def check_rid(rid: Any, field: str) -> None:
    if rid is not None and not isinstance(rid, str):
        raise InvalidRequestError(field, rid, "must be a str (or None)")


def check_request_count(total: int, limit: int, field: str, value: Any) -> None:
    """Reject a call that would expand to more than ``limit`` requests (batch size x n)."""
    if total > limit:
        raise InvalidRequestError(
            field,
            value,
            f"one generate call may make at most max_requests_per_call={limit} requests "
            f"(batch size x n; an EngineConfig option), this one makes {total}",
        )
