"""SGLang's native generation endpoints: ``/generate``, ``/health``, ``/health_generate``,
``/abort_request``.

``/generate`` takes ``GenerateReqInput``'s JSON: ``text`` (or ``input_ids``), ``sampling_params``,
``return_logprob``, ``logprob_start_len``, ``top_logprobs_num``, ``token_ids_logprob``, ``rid``,
``return_text_in_logprobs``, ``stream``; one prompt or a batch. It answers the engine's output
dicts (``text``, ``output_ids``, ``meta_info``). With ``stream`` it answers SSE: each chunk is
cumulative (SGLang's default; ``HTTPConfig.incremental_streaming_output`` sends only what is
new), then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response

from engine_core.errors import InvalidRequestError
from engine_core.requests.generate_request import GenerateRequest
from engine_core.requests.item_checks import check_request_count
from rollout.http.errors import HTTPError, bad_request, parse_body, read_json
from rollout.http.native_protocol import AbortReq
from rollout.http.sse import DONE, error_event, event, sse_response
from rollout.http.streams import Deltas, OpenStream, merged, open_all

router = APIRouter()
HEALTH_TIMEOUT_S = 20.0
# GenerateReqInput fields with nothing to do here (SGLang's defaults are what happens).
NO_EFFECT = ("log_metrics", "return_bytes", "no_logs", "custom_labels")


def parse_generate(body: dict[str, Any]) -> tuple[GenerateRequest, bool]:
    """``GenerateRequest`` of a ``/generate`` body and its ``return_text_in_logprobs``."""
    body = dict(body)
    if "text" in body:
        if "prompt" in body:
            raise bad_request("prompt", body["prompt"], "give text (SGLang's name), not both")
        body["prompt"] = body.pop("text")
    for name in ("input_embeds", "modalities"):
        if body.get(name) is not None:
            raise bad_request(name, body[name], "not supported by this server: text only")
        body.pop(name, None)
    for name in NO_EFFECT:
        body.pop(name, None)
    with_text = body.pop("return_text_in_logprobs", False)
    if not isinstance(with_text, bool):
        raise bad_request("return_text_in_logprobs", with_text, "must be a bool")
    check_session_id(body.get("session_id"))
    return GenerateRequest.of(**body), with_text


def check_session_id(value: Any) -> None:
    """SGLang's ``GenerateReqInput.session_id`` is ``Optional[str]``; a batch may give one per
    prompt (a list of str or None, as the service's router reads it)."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
        return
    raise bad_request("session_id", value, "must be a str (or a list of str for a batch)")


LOGPROB_KEYS = ("input_token_logprobs", "output_token_logprobs")
TOP_KEYS = ("input_top_logprobs", "output_top_logprobs")


def add_token_text(out: dict[str, Any], tokenizer: Any) -> None:
    """SGLang's ``return_text_in_logprobs``: the third slot of each logprob row is the token's
    text."""
    if tokenizer is None:
        return
    meta = out["meta_info"]

    def with_text(row):
        return None if row is None else (row[0], row[1], tokenizer.decode([row[1]]))

    for key in LOGPROB_KEYS:
        if key in meta:
            meta[key] = [with_text(r) for r in meta[key]]
    for key in TOP_KEYS:
        if key in meta:
            meta[key] = [None if rs is None else [with_text(r) for r in rs] for rs in meta[key]]


def incremental(chunk: dict[str, Any], sent: list[int]) -> dict[str, Any]:
    """Only the new rows of the per-token ``meta_info`` lists (SGLang's incremental mode)."""
    meta = dict(chunk["meta_info"])
    start = sent[0]
    for key in ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs"):
        if key in meta:
            meta[key] = meta[key][start:]
    meta["weight_versions"] = meta.get("weight_versions", [])[start:]
    sent[0] = meta["completion_tokens"]
    return {**chunk, "meta_info": meta}


def refuse_when_stopping(state) -> None:
    if state.shutting_down:
        raise HTTPError(503, "the server is shutting down")


@router.api_route("/generate", methods=["POST", "PUT"])
async def generate(request: Request):
    state = request.app.state
    refuse_when_stopping(state)
    req, with_text = parse_generate(await read_json(request))
    tokenizer = state.backend.tokenizer
    if not req.stream:
        outputs = await state.backend.generate(req)
        for out in outputs if isinstance(outputs, list) else [outputs]:
            state.metrics.count_output(out)
            if with_text:
                add_token_text(out, tokenizer)
        return state.json(outputs)
    streams = await open_streams(state.backend, req)
    batch = req.batch_size is not None
    deltas = [Deltas() for _ in streams]
    sent = [[0] for _ in streams]

    async def events():
        try:
            async for index, chunk in merged(streams):
                if state.config.incremental_streaming_output:  # else: as the engine sent it
                    chunk = incremental(deltas[index](chunk), sent[index])
                if batch:  # SGLang tags a batch's stream chunks with the prompt's index
                    chunk["index"] = index
                if with_text:
                    add_token_text(chunk, tokenizer)
                if chunk["meta_info"].get("finish_reason") is not None:
                    state.metrics.count_output(chunk)
                yield event(chunk)
        except Exception as exc:  # after the 200: SGLang's in-stream error line
            yield error_event(exc)
        yield DONE

    return sse_response(events())


async def open_streams(backend, req: GenerateRequest) -> list[OpenStream]:
    """One engine stream per prompt (a batch streams every prompt, interleaved), each opened
    before the answer so bad input is still a 400; if one fails, those opened are aborted. A
    batch is bounded by ``max_requests_per_call`` as a non-streamed call is (400 at once)."""
    if req.batch_size is None:
        singles = [req if req.rid is not None else dataclasses.replace(req, rid=_new_rid())]
    else:
        check_stream_batch(req, backend.max_requests_per_call)
        base = _new_rid()
        singles = [
            _single(req, item, item.rid or f"{base}-{i}") for i, item in enumerate(req.items())
        ]
    return await open_all(backend, singles)


def check_stream_batch(req: GenerateRequest, limit: int) -> None:
    field = "prompt" if req.is_text else "input_ids"
    count = req.batch_size or 1
    try:  # the engine's own bound, checked here before one stream per prompt is opened
        check_request_count(count, limit, field, f"<{count} prompts>")
    except InvalidRequestError as exc:
        raise bad_request(exc.field, exc.value, exc.reason) from None


def _single(req: GenerateRequest, item, rid: str) -> GenerateRequest:
    """The streaming request of one prompt of a batch."""
    return dataclasses.replace(
        req,
        **{"prompt" if req.is_text else "input_ids": item.input},
        sampling_params=item.sampling_params,
        return_logprob=item.return_logprob,
        logprob_start_len=item.logprob_start_len,
        top_logprobs_num=item.top_logprobs_num,
        rid=rid,
        token_ids_logprob=item.token_ids_logprob,
        return_hidden_states=item.return_hidden_states,
        cache_salt=item.cache_salt,
    )


def _new_rid() -> str:
    return uuid.uuid4().hex


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while serving; 503 once shutting down."""
    return Response(status_code=503 if request.app.state.shutting_down else 200)


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    """200 when a one-token generation answers within 20 s (SGLang's probe), else 503."""
    state = request.app.state
    if state.shutting_down:
        return Response(status_code=503)
    probe = GenerateRequest(
        input_ids=[0],
        sampling_params={"max_new_tokens": 1, "temperature": 0.0},
    )
    try:
        await asyncio.wait_for(state.backend.generate(probe), HEALTH_TIMEOUT_S)
    except Exception:
        return Response(status_code=503)
    return Response(status_code=200)


@router.post("/abort_request")
async def abort_request(request: Request) -> Response:
    body = parse_body(AbortReq, await read_json(request))
    await request.app.state.backend.abort_request(body.rid or None, body.abort_all)
    return Response(status_code=200)
