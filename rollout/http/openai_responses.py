"""Engine outputs -> OpenAI response bodies (completion, chat, their stream chunks, usage).

Every response carries ``weight_version`` (the version the engine serves now) and each choice
its ``weight_versions`` (one per completion token); with ``return_prompt_token_ids`` /
``return_token_ids`` a choice has ``prompt_token_ids`` (and ``token_ids``: the completion), and
with ``return_meta_info`` the engine's whole ``meta_info``, so an agentic rollout records the
exact tokens it trains on."""

from __future__ import annotations

import time
from typing import Any


def finish_reason(meta: dict[str, Any]) -> str | None:
    reason = meta.get("finish_reason")
    return None if reason is None else reason.get("type")


def matched_stop(meta: dict[str, Any]) -> Any:
    reason = meta.get("finish_reason") or {}
    return reason.get("matched")


def usage(outputs: list[dict[str, Any]], n: int) -> dict[str, int]:
    """Prompt tokens once per prompt (its ``n`` samples share it), completion tokens of all."""
    prompt = sum(o["meta_info"]["prompt_tokens"] for o in outputs[::n])
    completion = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class TokenText:
    """Token id -> its text (cached; the tokenizer may be None: then ``""``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = "" if self.tokenizer is None else self.tokenizer.decode([token])
        return self.cache[token]


def completion_logprobs(meta: dict[str, Any], text_of: TokenText, start: int = 0) -> dict:
    rows = meta.get("output_token_logprobs", [])[start:]
    tops = meta.get("output_top_logprobs", [])[start:]
    tokens = [text_of(tok) for _, tok, _ in rows]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for lp, _, _ in rows],
        "top_logprobs": [{text_of(tok): lp for lp, tok, _ in top} for top in tops] or None,
        "text_offset": offsets,
    }


def chat_logprobs(meta: dict[str, Any], text_of: TokenText, start: int = 0) -> dict:
    rows = meta.get("output_token_logprobs", [])[start:]
    tops = meta.get("output_top_logprobs", [])[start:] or [[] for _ in rows]
    content = []
    for (lp, tok, _), top in zip(rows, tops):
        text = text_of(tok)
        content.append(
            {
                "token": text,
                "logprob": lp,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": text_of(t), "logprob": v, "bytes": list(text_of(t).encode())}
                    for v, t, _ in top
                ],
            }
        )
    return {"content": content}


def token_fields(out: dict[str, Any], prompt_ids: list[int], req: Any) -> dict[str, Any]:
    """The per-choice extras a trainer asks for (and always the tokens' weight versions)."""
    meta = out["meta_info"]
    extra: dict[str, Any] = {"weight_versions": meta.get("weight_versions", [])}
    if req.return_prompt_token_ids or req.return_token_ids:
        extra["prompt_token_ids"] = prompt_ids
    if req.return_token_ids:
        extra["token_ids"] = out["output_ids"]
    if req.return_meta_info:
        extra["meta_info"] = meta
    if matched_stop(meta) is not None:
        extra["matched_stop"] = matched_stop(meta)
    return extra


def envelope(kind: str, rid: str, model: str, version: str, choices: list, use: Any) -> dict:
    body = {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "weight_version": version,
    }
    if use is not None:
        body["usage"] = use
    return body


def completion_choice(index: int, out: dict, prompt_ids: list[int], req: Any, text_of) -> dict:
    meta = out["meta_info"]
    logprobs = completion_logprobs(meta, text_of) if req.logprobs is not None else None
    return {
        "index": index,
        "text": out["text"],
        "logprobs": logprobs,
        "finish_reason": finish_reason(meta),
        **token_fields(out, prompt_ids, req),
    }


def chat_choice(index: int, out: dict, prompt_ids: list[int], req: Any, text_of) -> dict:
    meta = out["meta_info"]
    logprobs = chat_logprobs(meta, text_of) if req.logprobs else None
    return {
        "index": index,
        "message": {"role": "assistant", "content": out["text"]},
        "logprobs": logprobs,
        "finish_reason": finish_reason(meta),
        **token_fields(out, prompt_ids, req),
    }
