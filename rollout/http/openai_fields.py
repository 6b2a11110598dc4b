"""OpenAI-route checks that need more than one field, and engine errors renamed to the OpenAI
field the client sent (the README's promise: a 400 names the OpenAI field, not the engine's
``top_logprobs_num`` or ``prompt[0]``)."""

from __future__ import annotations

import re
from typing import Any

from engine_core.errors import InvalidRequestError
from rollout.http.errors import HTTPError, bad_request


def prompt_count(req: Any) -> int:
    """How many prompts a request carries, known before anything is tokenized."""
    prompt = getattr(req, "prompt", None)
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        return len(prompt)
    return 1


def check_request_count(req: Any, limit: int) -> None:
    """Prompts x ``n`` within the engine's ``max_requests_per_call``, streamed or not (a stream
    opens one engine request per sample): a 400 naming ``n`` before any work."""
    prompts = prompt_count(req)
    if prompts * req.n > limit:
        raise bad_request(
            "n",
            req.n,
            f"{prompts} prompt(s) x n = {prompts * req.n} samples; one call may make at most "
            f"max_requests_per_call={limit}",
        )


def check_text_length(req: Any, limit: int) -> None:
    """Text longer than ``limit`` characters cannot fit the context whatever its tokens
    (``engine_core.requests.item_checks.max_prompt_chars``): a 400 before any tokenizing, which
    for megabytes of text takes seconds of a core."""
    if not limit:
        return  # no tokenizer: text is refused by name later
    if hasattr(req, "messages"):
        total = sum(_content_chars(m.content) for m in req.messages)
        if total > limit:
            raise bad_request("messages", f"<{total} characters>", _too_long(limit))
        return
    prompts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
    for i, item in enumerate(prompts):
        if isinstance(item, str) and len(item) > limit:
            field = f"prompt[{i}]" if isinstance(req.prompt, list) else "prompt"
            raise bad_request(field, f"<{len(item)} characters>", _too_long(limit))


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return 0


def _too_long(limit: int) -> str:
    return f"longer than any prompt that fits the context ({limit} characters)"


def check_chat_logprobs(req: Any) -> None:
    """OpenAI: ``top_logprobs`` needs ``logprobs: true``."""
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request(
            "top_logprobs", req.top_logprobs, "logprobs must be true when top_logprobs is set"
        )


_INDEX = re.compile(r"\[(\d+)\]")


def openai_field(engine_field: str, chat: bool, limit_field: str, batch: bool) -> str:
    """The OpenAI field behind an engine field name (unchanged when there is none)."""
    index = _INDEX.search(engine_field)
    prompt = "messages" if chat else "prompt"
    if batch and index is not None and not chat:
        prompt = f"prompt[{index.group(1)}]"
    if engine_field.endswith("sampling_params.n") or engine_field.endswith(".n"):
        return "n"
    base = _INDEX.sub("", engine_field).removeprefix("sampling_params").lstrip(".")
    renamed = {
        "prompt": prompt,
        "input_ids": prompt,
        "max_new_tokens": limit_field,
        "min_new_tokens": "min_tokens",
        "sampling_seed": "seed",
        "top_logprobs_num": "top_logprobs" if chat else "logprobs",
    }
    return renamed.get(base, base or engine_field)


def renamed(exc: InvalidRequestError, chat: bool, limit_field: str, batch: bool) -> HTTPError:
    """The engine's ``InvalidRequestError`` as a 400 naming the OpenAI field and value."""
    field = openai_field(str(exc.field), chat, limit_field, batch)
    return bad_request(field, exc.value, exc.reason)
