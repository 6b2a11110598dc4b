"""Error answers: every failure a client can cause is a 4xx JSON naming the field and value.

The body is SGLang's ``ErrorResponse`` shape, which the ``openai`` client also reads:
``{"object": "error", "message", "type", "param", "code"}`` (``param``: the field). Typed engine
errors map by kind: bad input 400, an unknown model 404, a released engine or a stopped one
503. Anything else is a 500 with its type and message (logged), and the server keeps serving.

``read_json`` refuses a non-JSON ``Content-Type`` (415) before reading anything and counts the
bytes as they arrive, so an oversize body -- declared (``Content-Length``) or chunked (no
length) -- is a 413 as soon as it crosses ``HTTPConfig.max_body_bytes``, never buffered whole.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from engine_core.errors import EngineReleasedError, EngineStoppedError, MemoryStateError
from rollout.http.jsonresp import json_response

log = logging.getLogger(__name__)


class HTTPError(Exception):
    """An error answer a route raises: status, message and the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: Any = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def bad_request(field: str, value: Any, reason: str) -> HTTPError:
    shown = repr(value)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    return HTTPError(400, f"invalid {field}={shown}: {reason}", field)


def error_response(status: int, message: str, param: str | None = None, code: Any = None):
    body = {
        "object": "error",
        "message": message,
        "type": HTTPStatus(status).phrase.replace(" ", ""),
        "param": param,
        "code": status if code is None else code,
    }
    return json_response(body, status)


def status_of(exc: BaseException) -> int:
    """The HTTP status of an engine error (400 for what the caller can fix)."""
    if isinstance(exc, EngineStoppedError):
        return 503
    if isinstance(exc, EngineReleasedError):
        return 503
    if isinstance(exc, MemoryStateError | ValueError | TypeError):
        return 400
    return 500


def response_for(exc: BaseException):
    status = status_of(exc)
    if status == 500:
        log.exception("request failed", exc_info=exc)
    message = str(exc) if status != 500 else f"{type(exc).__name__}: {exc}"
    return error_response(status, message, getattr(exc, "field", None))


def check_content_type(request: Request) -> None:
    """A body must be JSON (``application/json`` or ``application/*+json``, any parameters).

    No ``Content-Type`` at all is accepted (curl-style clients send none); an empty body too,
    whatever its type (``POST /flush_cache`` with nothing to say)."""
    given = request.headers.get("content-type")
    if given is None or request.headers.get("content-length") == "0":
        return
    media = given.split(";", 1)[0].strip().lower()
    kind, _, sub = media.partition("/")
    if media == "application/json" or (kind == "application" and sub.endswith("+json")):
        return
    shown = given if len(given) <= 100 else given[:100] + "..."
    raise HTTPError(
        415,
        f"invalid content-type={shown!r}: the body must be JSON (send application/json)",
        "content-type",
    )


def too_large(what: str, limit: int) -> HTTPError:
    return HTTPError(413, f"invalid body: {what}, more than the limit of {limit} bytes", "body")


async def read_bounded(request: Request, limit: int) -> bytes:
    """The body's bytes; a 413 as soon as more than ``limit`` arrived (the rest is not read:
    the server answers and closes the connection)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"{declared} bytes declared", limit)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large(f"{size} bytes read and more arriving", limit)
        parts.append(part)
    return b"".join(parts)


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (empty body: ``{}``); 415 for a non-JSON content
    type, 413 over the body limit, 400 naming ``body`` for anything but a JSON object."""
    check_content_type(request)
    raw = await read_bounded(request, request.app.state.config.max_body_bytes)
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        shown = raw[:80].decode("utf-8", "replace")
        raise bad_request("body", shown, f"malformed JSON ({exc})") from None
    if not isinstance(body, dict):
        raise bad_request("body", body, "must be a JSON object")
    return body


def from_validation(errors: list[dict[str, Any]]) -> HTTPError:
    """One 400 naming every bad field and its value (pydantic's or FastAPI's errors)."""
    parts, params = [], []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        params.append(loc)
        if err.get("type") == "missing":
            parts.append(f"missing {loc}: a required field")
            continue
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        parts.append(f"invalid {loc}={shown}: {err.get('msg')}")
    return HTTPError(400, "; ".join(parts) or "invalid body", params[0] if params else None)


def parse_body(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation(exc.errors()) from None


def install(app: FastAPI) -> None:
    """Register the handlers that turn errors into the JSON answers above."""

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        # FastAPI's 422 becomes SGLang's 400, naming each field and value.
        err = from_validation(list(exc.errors()))
        return error_response(err.status, err.message, err.param)

    @app.exception_handler(HTTPException)
    async def _starlette(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    async def _engine_error(request: Request, exc: Exception):
        return response_for(exc)

    # By class, not one ``Exception`` handler: Starlette re-raises what reaches its last-resort
    # handler (after answering), which would log every bad request as a crash.
    for kind in (ValueError, TypeError, RuntimeError, TimeoutError, LookupError, Exception):
        app.add_exception_handler(kind, _engine_error)
