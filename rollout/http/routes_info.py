"""SGLang's state endpoints: ``/get_model_info``, ``/get_weight_version``,
``/get_server_info`` (and ``/server_info``), ``/get_load``, ``/v1/loads``, ``/metrics``.

With several engines, ``get_server_info`` is engine 0's with every engine's state in
``internal_states`` (one per engine, as SGLang lists one per data-parallel rank) and
``engines`` (each engine's own answer); behind the Ray service it adds ``router``, the
driver's routing counters (``RolloutDriver.routing_stats``: policy, decisions per rule)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response

from rollout.http.metrics import CONTENT_TYPE, render

router = APIRouter()


@router.get("/get_model_info")
@router.get("/model_info")
async def get_model_info(request: Request):
    state = request.app.state
    info = await state.backend.model_info()
    return state.json(info | {"served_model_name": state.served_model_name})


@router.get("/get_weight_version")
async def get_weight_version(request: Request):
    versions = await request.app.state.backend.weight_versions()
    return {"weight_version": versions[0], "weight_versions": versions}


@router.get("/get_server_info")
@router.get("/server_info")
async def get_server_info(request: Request):
    state = request.app.state
    infos = await state.backend.server_infos()
    merged = dict(infos[0])
    if len(infos) > 1:
        merged["internal_states"] = [s for info in infos for s in info.get("internal_states", [])]
        merged["engines"] = infos
    merged["num_engines"] = len(infos)
    router = await state.backend.routing_stats()
    if router is not None:
        merged["router"] = router
    return state.json(merged)


def _load(index: int, info: dict[str, Any]) -> dict[str, Any]:
    capacity = info.get("max_total_num_tokens") or 0
    page_tokens = capacity / info["num_total_pages"] if info.get("num_total_pages") else 0
    used = int((info.get("num_total_pages", 0) - info.get("num_free_pages", 0)) * page_tokens)
    return {
        "dp_rank": index,
        "num_reqs": info.get("num_running_requests", 0) + info.get("num_waiting_requests", 0),
        "num_running_reqs": info.get("num_running_requests", 0),
        "num_waiting_reqs": info.get("num_waiting_requests", 0),
        "num_tokens": used,
        "max_total_num_tokens": capacity,
        "token_usage": used / capacity if capacity else 0.0,
        "weight_version": info.get("weight_version"),
    }


@router.get("/get_load")
async def get_load(request: Request):
    """One row per engine (SGLang: per data-parallel rank)."""
    infos = await request.app.state.backend.server_infos()
    return [_load(i, info) for i, info in enumerate(infos)]


@router.get("/v1/loads")
async def v1_loads(request: Request):
    infos = await request.app.state.backend.server_infos()
    return {"timestamp": time.time(), "loads": [_load(i, info) for i, info in enumerate(infos)]}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = request.app.state
    infos = await state.backend.server_infos()
    return Response(render(infos, state.metrics), media_type=CONTENT_TYPE)
