"""Server-sent events as SGLang writes them: ``data: <json>\\n\\n`` lines, ``data: [DONE]`` last;
a failure mid-stream is one ``data: {"error": {"message": ...}}`` line before ``[DONE]``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi.responses import StreamingResponse

DONE = b"data: [DONE]\n\n"


def event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS) + b"\n\n"


def error_event(exc: BaseException) -> bytes:
    return event({"error": {"message": f"{type(exc).__name__}: {exc}", "code": 400}})


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
