"""Checks of one generate item's fields that need no engine state beyond sizes: token ids,
logprob arguments, request ids, cache salts, the per-call request count, and the longest text
that can still fit the context. The checks raise ``InvalidRequestError`` naming the field."""

from __future__ import annotations

from typing import Any

from engine_core.errors import InvalidRequestError


def check_salt(salt: Any, field: str) -> str | None:
    if salt is not None and not isinstance(salt, str):
        raise InvalidRequestError(field, salt, "must be a str or None")
    return salt


def check_ids(ids: Any, field: str, vocab_size: int) -> list[int]:
    if not isinstance(ids, list) or not ids:
        raise InvalidRequestError(field, ids, "must be a non-empty list of token ids")
    for tok in ids:
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise InvalidRequestError(field, tok, "a token id must be an int")
        if not 0 <= tok < vocab_size:
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


def max_prompt_chars(tokenizer: Any, context_length: int) -> int:
    """Characters beyond which a text cannot fit ``context_length`` tokens. Every character
    of a text is at least one character of the token strings it becomes (byte-level BPE and
    SentencePiece alike), so a text longer than context x the longest token string has too
    many tokens; doubled for normalizers that shorten text (none of the supported ones)."""
    if tokenizer is None:
        return 0
    vocab = tokenizer.get_vocab()
    longest = max((len(token) for token in vocab), default=1)
    return 2 * context_length * max(longest, 1)
