"""API-key check (SGLang's rule): with a key set, every request but ``OPTIONS``, ``/health*``
and ``/metrics`` needs ``Authorization: Bearer <key>``; anything else gets 401."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from rollout.http.errors import error_response

OPEN_PREFIXES = ("/health", "/metrics")


class APIKeyMiddleware:
    """Pure ASGI middleware (no per-request task: streams keep their backpressure)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(401, "Unauthorized: a wrong or missing API key", "api_key")
        await response(scope, receive, send)

    @staticmethod
    def _open(scope: Scope) -> bool:
        return scope["method"] == "OPTIONS" or scope["path"].startswith(OPEN_PREFIXES)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self.expected)
        return False
