"""``build_app``: the FastAPI app over a ``Backend``, composed of one router per area.

``app.state`` holds what the routes share: ``backend``, ``config`` (``HTTPConfig``),
``metrics`` (``ServerMetrics``), ``served_model_name``, ``started`` (epoch seconds),
``shutting_down`` (set by the server on SIGINT/SIGTERM) and ``json`` (an orjson response)."""

from __future__ import annotations

import time

from fastapi import FastAPI

from rollout.http import errors, routes_control, routes_generate, routes_info, routes_openai
from rollout.http.auth import APIKeyMiddleware
from rollout.http.backend import Backend
from rollout.http.config import HTTPConfig
from rollout.http.jsonresp import json_response
from rollout.http.metrics import ServerMetrics


def build_app(backend: Backend, config: HTTPConfig | None = None) -> FastAPI:
    config = config or HTTPConfig()
    app = FastAPI(title="rl-rollout", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.backend = backend
    app.state.config = config
    app.state.metrics = ServerMetrics()
    app.state.served_model_name = config.served_model_name or backend.model_path
    app.state.started = time.time()
    app.state.shutting_down = False
    app.state.json = json_response
    errors.install(app)
    for module in (routes_generate, routes_control, routes_info, routes_openai):
        app.include_router(module.router)
    if config.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    return app
