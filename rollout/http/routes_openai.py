"""The OpenAI API: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streaming
too: ``chat.completion.chunk`` / ``text_completion`` SSE events, a usage event with
``stream_options.include_usage``, then ``data: [DONE]``)."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, Request

from engine_core.errors import InvalidRequestError
from rollout.http import openai_adapter as adapt
from rollout.http import openai_fields as fields
from rollout.http import openai_responses as build
from rollout.http.errors import bad_request, parse_body, read_json
from rollout.http.openai_protocol import ChatCompletionRequest, CompletionRequest
from rollout.http.routes_generate import refuse_when_stopping
from rollout.http.sse import DONE, error_event, event, sse_response
from rollout.http.streams import Deltas, merged, open_all

router = APIRouter()


def _card(state: Any) -> dict[str, Any]:
    name = state.served_model_name
    return {
        "id": name,
        "object": "model",
        "created": int(state.started),
        "owned_by": "rl-rollout",
        "root": name,
        "max_model_len": state.backend.context_length,
    }


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_card(request.app.state)]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(request: Request, model: str):
    state = request.app.state
    adapt.check_model(model, (state.served_model_name,))
    return _card(state)


async def _prepare(request: Request, kind: type) -> tuple[Any, Any, list[list[int]], dict]:
    """Parse and validate; the prompts as ids and the sampling params. The cheap checks come
    first (a bad request costs no tokenization); the prompts are tokenized in a worker thread
    so a huge one does not stall the event loop (other clients, ``/health``)."""
    state = request.app.state
    refuse_when_stopping(state)
    req = parse_body(kind, await read_json(request))
    adapt.check_model(req.model, (state.served_model_name,))
    adapt.check_neutral(req)
    if req.n < 1:
        raise bad_request("n", req.n, "must be >= 1")
    fields.check_request_count(req, state.backend.max_requests_per_call)
    fields.check_text_length(req, state.backend.max_prompt_chars)
    tokenizer = state.backend.tokenizer
    if kind is ChatCompletionRequest:
        fields.check_chat_logprobs(req)
        adapt.check_template_kwargs(req.chat_template_kwargs)
        prompts = [await asyncio.to_thread(adapt.chat_prompt, req, tokenizer)]
    else:
        prompts = await asyncio.to_thread(adapt.completion_prompts, req, tokenizer)
    field = _limit_field(req)
    longest = max(len(p) for p in prompts)
    limit = getattr(req, field)
    params = adapt.sampling_params(req, adapt.max_new_tokens(limit, field, longest, state.backend))
    return state, req, prompts, params


def _limit_field(req: Any) -> str:
    """The OpenAI field that bounds the output (chat: ``max_completion_tokens`` when given)."""
    if getattr(req, "max_completion_tokens", None) is not None:
        return "max_completion_tokens"
    return "max_tokens"


def _top(req: Any, chat: bool) -> int | None:
    if chat:
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


@router.post("/v1/completions")
async def completions(request: Request):
    return await _serve(request, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _serve(request, chat=True)


async def _serve(request: Request, chat: bool):
    kind = ChatCompletionRequest if chat else CompletionRequest
    state, req, prompts, params = await _prepare(request, kind)
    rid = req.rid or ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    model = req.model or state.served_model_name
    top = _top(req, chat)
    if req.stream:
        calls = adapt.stream_requests(prompts, params, top, rid)
        with _openai_names(req, chat, len(prompts) > 1):
            streams = await open_all(state.backend, calls)
        return sse_response(_events(state, req, chat, rid, model, prompts, streams))
    with _openai_names(req, chat, len(prompts) > 1):
        outputs = await state.backend.generate(adapt.generate_request(prompts, params, top))
    outputs = outputs if isinstance(outputs, list) else [outputs]
    text_of = build.TokenText(state.backend.tokenizer)
    choice = build.chat_choice if chat else build.completion_choice
    choices = []
    for i, out in enumerate(outputs):
        state.metrics.count_output(out)
        choices.append(choice(i, out, prompts[i // req.n], req, text_of))
    version = outputs[0]["meta_info"]["weight_version"]
    kind_name = "chat.completion" if chat else "text_completion"
    body = build.envelope(kind_name, rid, model, version, choices, build.usage(outputs, req.n))
    return state.json(body)


@contextmanager
def _openai_names(req: Any, chat: bool, batch: bool):
    """The engine's ``InvalidRequestError`` becomes a 400 naming the OpenAI field."""
    try:
        yield
    except InvalidRequestError as exc:
        raise fields.renamed(exc, chat, _limit_field(req), batch) from None


async def _events(state, req, chat: bool, rid: str, model: str, prompts, streams):
    text_of = build.TokenText(state.backend.tokenizer)
    kind = "chat.completion.chunk" if chat else "text_completion"
    ids: list[list[int]] = [[] for _ in streams]  # tokens streamed so far, per choice
    deltas = [Deltas() for _ in streams]
    finals: dict[int, dict] = {}
    created = int(time.time())
    want_logprobs = req.logprobs if chat else req.logprobs is not None
    try:
        async for index, chunk in merged(streams):
            chunk = deltas[index](chunk)
            meta = chunk["meta_info"]
            choice: dict[str, Any] = {"index": index, "logprobs": None}
            if want_logprobs:
                of = build.chat_logprobs if chat else build.completion_logprobs
                choice["logprobs"] = of(meta, text_of, len(ids[index]))
            if chat:
                delta = {"content": chunk["text"]}
                if not ids[index] and index not in finals:
                    delta = {"role": "assistant", **delta}
                choice["delta"] = delta
            else:
                choice["text"] = chunk["text"]
            ids[index] += chunk["output_ids"]
            choice["finish_reason"] = build.finish_reason(meta)
            if choice["finish_reason"] is not None:
                final = {"output_ids": ids[index], "meta_info": meta}
                finals[index] = final
                state.metrics.count_output(final)
                choice |= build.token_fields(final, prompts[index // req.n], req)
            body = build.envelope(kind, rid, model, meta["weight_version"], [choice], None)
            body["created"] = created
            yield event(body)
        if req.stream_options is not None and req.stream_options.include_usage:
            outs = [finals[i] for i in sorted(finals)]
            version = outs[-1]["meta_info"]["weight_version"] if outs else None
            body = build.envelope(kind, rid, model, version, [], build.usage(outs, req.n))
            yield event(body)
    except Exception as exc:
        yield error_event(exc)
    yield DONE
