"""What a caller gets back: SGLang-shaped output dicts, stream chunks, and the sinks that
deliver them from the loop thread (blocking, streaming, or asyncio)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from engine_core.requests.request import Request
from engine_core.tokenizer import stable_prefix, trim_matched_stop


@dataclass(frozen=True)
class FlushCacheOutput:
    """What ``Engine.flush_cache`` returns: SGLang's ``FlushCacheReqOutput`` fields (also
    readable as ``result["success"]``, like the other verbs' dicts)."""

    success: bool
    message: str = ""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


# Output-side meta_info lists an incremental chunk slices to its new tokens (SGLang's
# INCREMENTAL_STREAMING_META_INFO_KEYS, plus our per-token weight_versions).
INCREMENTAL_META_KEYS = {
    "output_token_logprobs",
    "output_top_logprobs",
    "output_token_ids_logprobs",
    "weight_versions",
}


def meta_info(req: Request, weight_version: str, final: bool = True) -> dict[str, Any]:
    """SGLang's meta_info keys (and ``weight_versions``, one per output token);
    ``e2e_latency`` (seconds from submission) only once the request finished, as SGLang."""
    info: dict[str, Any] = {
        "id": req.rid,
        "finish_reason": req.finish_reason,
        "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
        "num_retractions": req.num_retractions,
        "weight_version": weight_version,
        "weight_versions": list(req.output_versions),
    }
    if final:
        info["e2e_latency"] = time.monotonic() - req.created_at
    if req.return_logprob:
        info.update(_logprob_fields(req))
    if req.return_hidden_states:
        info["hidden_states"] = hidden_states_of(req)
    return info


def hidden_states_of(req: Request) -> list:
    """SGLang's ``meta_info["hidden_states"]``: first the prompt's rows (a list of vectors),
    then one vector per token fed since (each generated token but the last, which was never
    run through the model)."""
    computed = req.hidden_states
    prompt = [computed[p] for p in range(len(req.prompt_ids)) if p in computed]
    fed = [computed[p] for p in range(len(req.prompt_ids), req.num_tokens) if p in computed]
    return [prompt, *fed]


def _logprob_fields(req: Request) -> dict[str, Any]:
    start = req.input_logprob_start
    input_ids = req.prompt_ids[start:]
    fields: dict[str, Any] = {
        "input_token_logprobs": [(lp, tok, None) for lp, tok in zip(req.input_logprobs, input_ids)],
        "output_token_logprobs": [
            (lp, tok, None) for lp, tok in zip(req.output_logprobs, req.output_ids)
        ],
    }
    if req.top_logprobs_num > 0:
        fields["input_top_logprobs"] = [
            None if tops is None else [(lp, tok, None) for lp, tok in tops]
            for tops in req.input_top_logprobs
        ]
        fields["output_top_logprobs"] = [
            [(lp, tok, None) for lp, tok in tops] for tops in req.output_top_logprobs
        ]
    if req.token_ids_logprob is not None:  # SGLang's keys for token_ids_logprob
        fields["input_token_ids_logprobs"] = [
            None if got is None else [(lp, tok, None) for lp, tok in got]
            for got in req.input_token_ids_logprobs
        ]
        fields["output_token_ids_logprobs"] = [
            [(lp, tok, None) for lp, tok in got] for got in req.output_token_ids_logprobs
        ]
    return fields


def _stop_matched(req: Request) -> int | str | None:
    """What a stop finish matched (a token id, a stop string or a regex), else None."""
    reason = req.finish_reason
    if not reason or reason.get("type") != "stop":
        return None
    matched = reason.get("matched")
    return None if isinstance(matched, bool) else matched


def final_output(req: Request, text: str, weight_version: str) -> dict[str, Any]:
    return {
        "text": text,
        "output_ids": list(req.output_ids),
        "meta_info": meta_info(req, weight_version),
    }


class OutputBuilder:
    """Builds outputs of one engine's requests; ``release`` frees a finished request's id."""

    def __init__(
        self,
        tokenizer: Any,
        release: Callable[[Iterable[str]], None],
        weight_version: Callable[[], str],
        incremental: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.release = release
        self.weight_version = weight_version
        self.incremental = incremental

    def decode(self, req: Request) -> str:
        """The request's output text: all of it while running; once finished by a stop, trimmed
        as SGLang's detokenizer does (``tokenizer.trim_matched_stop``; a stop token
        is dropped from the decoded ids unless ``no_stop_trim``)."""
        if self.tokenizer is None:
            return ""
        params = req.params
        ids = req.output_ids
        matched = _stop_matched(req)
        if isinstance(matched, int) and not params.no_stop_trim and ids:
            ids = ids[:-1]  # a stop token (EOS, stop_token_ids) is not part of the text
        text = self.tokenizer.decode(
            ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        if isinstance(matched, str):
            text = trim_matched_stop(text, matched, params.no_stop_trim)
        return text

    def final(self, req: Request, text: str) -> dict[str, Any]:
        self.release([req.rid])
        return final_output(req, text, self.weight_version())

    def delta(self, req: Request, state: StreamState, final: bool, text: str | None):
        """The next stream chunk (None: nothing new yet). As SGLang's offline Engine: each
        chunk holds everything so far (``text``, ``output_ids``, ``meta_info`` logprobs), the
        last one equals the final output; with ``incremental`` (SGLang's
        ``incremental_streaming_output``) only what is new, so chunks concatenate to it."""
        if final:
            self.release([req.rid])
            full = text or ""
        else:
            full = stable_prefix(self.decode(req))
            # may yet become a stop string (or a regex found literally, which trims too)
            texts = req.params.stop + req.params.stop_regex
            hold = max((len(s) for s in texts), default=1) - 1
            full = full[: len(full) - hold] if hold else full
        offset = state.sent_tokens
        new_ids = req.output_ids[offset:]
        new_text = full[len(state.sent_text) :] if len(full) > len(state.sent_text) else ""
        if not final and not new_ids:
            return None
        state.sent_tokens += len(new_ids)
        state.sent_text += new_text
        info = meta_info(req, self.weight_version(), final)
        if not self.incremental:
            shown = full if final else state.sent_text
            return {"text": shown, "output_ids": list(req.output_ids), "meta_info": info}
        for key in INCREMENTAL_META_KEYS & info.keys():
            info[key] = info[key][offset:]
        return {"text": new_text, "output_ids": new_ids, "meta_info": info}


# ---------------------------------------------------------------- sinks (loop thread)
Finalize = Callable[[Request, str], dict[str, Any]]
Delta = Callable[[Request, "StreamState", bool, str | None], dict[str, Any] | None]


class StreamState:
    """How much of a request has already been streamed."""

    def __init__(self) -> None:
        self.sent_tokens = 0
        self.sent_text = ""


class BlockingSink:
    """Collects the final output (or the error that prevented it); the caller waits on
    ``done``."""

    def __init__(self, finalize: Finalize) -> None:
        self.finalize = finalize
        self.done = threading.Event()
        self.output: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def on_progress(self, req: Request) -> None:
        pass

    def on_finish(self, req: Request, text: str) -> None:
        self.output = self.finalize(req, text)
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


class StreamSink:
    """Pushes incremental chunks to a queue; ``None`` marks the end."""

    def __init__(self, delta: Delta, push: Callable[[Any], None]) -> None:
        self.delta = delta
        self.push = push
        self.state = StreamState()

    def on_progress(self, req: Request) -> None:
        chunk = self.delta(req, self.state, False, None)
        if chunk is not None:
            self.push(chunk)

    def on_finish(self, req: Request, text: str) -> None:
        self.push(self.delta(req, self.state, True, text))
        self.push(None)

    def fail(self, error: BaseException) -> None:
        self.push(error)  # the consumer raises it
        self.push(None)


class FutureSink:
    """Resolves an asyncio future on the caller's event loop."""

    def __init__(self, finalize: Finalize, loop: asyncio.AbstractEventLoop) -> None:
        self.finalize = finalize
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()

    def on_progress(self, req: Request) -> None:
        pass

    def on_finish(self, req: Request, text: str) -> None:
        output = self.finalize(req, text)
        self.loop.call_soon_threadsafe(_resolve, self.future, output, None)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.future, None, error)


def _resolve(future: asyncio.Future, output: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(output)
