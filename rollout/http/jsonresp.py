"""JSON answers written with orjson (fast; logprob tuples become arrays, NaN/inf null)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Response


def json_response(content: Any, status_code: int = 200) -> Response:
    body = orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status_code, media_type="application/json")
