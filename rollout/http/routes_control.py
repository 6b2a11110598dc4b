"""SGLang's native control endpoints: cache, pause, memory (sleep / wake) and weights.

Every verb's outcome goes through ``results.verb_result`` (a returned ``(success, message)``
tuple, a dict, or a raised typed error) and answers ``{success, message, ...}``: 200 on success,
400 on failure, as SGLang's ``http_server.py``. ``/flush_cache`` answers SGLang's plain text.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request, Response

from rollout.http import native_protocol as p
from rollout.http.errors import parse_body, read_json
from rollout.http.jsonresp import json_response
from rollout.http.results import VerbResult, verb_result
from rollout.http.tensor_payload import named_tensors_of

router = APIRouter()
FLUSHED = (
    "Cache flushed.\nPlease check backend logs for more details. (When there are running or "
    "waiting requests, the operation will not be performed.)\n"
)


def answer(result: VerbResult) -> Response:
    return json_response(result.body(), 200 if result.success else 400)


async def _body(request: Request, model):
    return parse_body(model, await read_json(request))


async def timed(request: Request, kind: str, call: Awaitable[Any]) -> VerbResult:
    """``verb_result`` of ``call``, its duration recorded under ``kind`` (``/metrics``)."""
    started = time.perf_counter()
    result = await verb_result(call)
    request.app.state.metrics.record_duration(kind, time.perf_counter() - started, result.success)
    return result


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request) -> Response:
    result = await verb_result(request.app.state.backend.flush_cache())
    return Response(FLUSHED, status_code=200 if result.success else 400)


@router.post("/pause_generation")
async def pause_generation(request: Request):
    body = await _body(request, p.PauseGenerationReq)
    result = await verb_result(request.app.state.backend.pause_generation(body.mode))
    if not result.success:
        return answer(result)
    return {"message": "Generation paused successfully.", "status": "ok"}


@router.post("/continue_generation")
async def continue_generation(request: Request):
    result = await verb_result(request.app.state.backend.continue_generation())
    if not result.success:
        return answer(result)
    return {"message": "Generation continued successfully.", "status": "ok"}


@router.api_route("/release_memory_occupation", methods=["GET", "POST"])
async def release_memory_occupation(request: Request):
    body = await _body(request, p.MemoryReq)
    call = request.app.state.backend.release_memory_occupation(body.tags)
    return answer(await timed(request, "release_memory", call))


@router.api_route("/resume_memory_occupation", methods=["GET", "POST"])
async def resume_memory_occupation(request: Request):
    body = await _body(request, p.MemoryReq)
    call = request.app.state.backend.resume_memory_occupation(body.tags)
    return answer(await timed(request, "resume_memory", call))


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(request: Request):
    body = await _body(request, p.UpdateWeightFromDiskReq)
    call = request.app.state.backend.update_weights_from_disk(
        body.model_path, body.load_format, body.weight_version, body.abort_all_requests
    )
    result = await timed(request, "refit", call)
    result.extra.setdefault("num_paused_requests", 0)
    return answer(result)


@router.post("/update_weights_from_tensor")
async def update_weights_from_tensor(request: Request):
    body = await _body(request, p.UpdateWeightsFromTensorReq)
    backend = request.app.state.backend
    if body.abort_all_requests:
        await backend.abort_request(None, True)
    tensors = named_tensors_of(body.serialized_named_tensors)
    call = backend.update_weights_from_tensor(
        tensors, body.load_format, body.weight_version, body.flush_cache
    )
    return answer(await timed(request, "refit", call))


@router.post("/init_weights_update_group")
async def init_weights_update_group(request: Request):
    body = await _body(request, p.InitWeightsUpdateGroupReq)
    call = request.app.state.backend.init_weights_update_group(
        body.master_address,
        body.master_port,
        body.rank_offset,
        body.world_size,
        body.group_name,
        body.backend,
    )
    return answer(await verb_result(call))


@router.post("/update_weights_from_distributed")
async def update_weights_from_distributed(request: Request):
    body = await _body(request, p.UpdateWeightsFromDistributedReq)
    backend = request.app.state.backend
    if body.abort_all_requests:
        await backend.abort_request(None, True)
    call = backend.update_weights_from_distributed(
        body.names, body.dtypes, body.shapes, body.group_name, body.weight_version
    )
    return answer(await timed(request, "refit", call))


@router.post("/destroy_weights_update_group")
async def destroy_weights_update_group(request: Request):
    body = await _body(request, p.DestroyWeightsUpdateGroupReq)
    call = request.app.state.backend.destroy_weights_update_group(body.group_name)
    return answer(await verb_result(call))


@router.api_route("/get_weights_by_name", methods=["GET", "POST"])
async def get_weights_by_name(request: Request):
    """The body (or, for a GET, the query ``?name=...&truncate_size=...``) names the weight."""
    raw = dict(request.query_params) if request.method == "GET" else {}
    raw |= await read_json(request)
    if isinstance(raw.get("truncate_size"), str) and raw["truncate_size"].isdigit():
        raw["truncate_size"] = int(raw["truncate_size"])
    body = parse_body(p.GetWeightsByNameReq, raw)
    state = request.app.state
    values = await state.backend.get_weights_by_name(body.name, body.truncate_size)
    return state.json(values)


@router.post("/update_weight_version")
async def update_weight_version(request: Request):
    body = await _body(request, p.UpdateWeightVersionReq)
    call = request.app.state.backend.update_weight_version(
        body.new_version, body.abort_all_requests
    )
    return answer(await verb_result(call))
