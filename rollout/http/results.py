"""The one mapping of an engine verb's outcome onto SGLang's ``{success, message}`` answer.

Verbs report success three ways, and all of them land here: SGLang's ``(success, message,
...)`` tuple, this engine's dict with ``success`` (and maybe ``message``), or a raised typed
error (weights and version unchanged). ``verb_result`` turns any of them into one
``VerbResult``; routes only choose the HTTP status from ``success``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from engine_core.errors import EngineStoppedError


@dataclass
class VerbResult:
    """``success``/``message`` as SGLang answers them, plus what else the verb returned."""

    success: bool
    message: str
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"success": self.success, "message": self.message, **self.extra}


def from_value(value: Any) -> VerbResult:
    """A verb's returned value: a tuple, a dict or an object with ``success`` (or None: ok)."""
    if isinstance(value, tuple) and value and isinstance(value[0], bool):
        message = str(value[1]) if len(value) > 1 else ""
        extra = {"num_paused_requests": value[2]} if len(value) > 2 else {}
        return VerbResult(value[0], message, extra)
    if isinstance(value, dict):
        rest = {k: v for k, v in value.items() if k not in ("success", "message")}
        return VerbResult(bool(value.get("success", True)), str(value.get("message", "")), rest)
    if value is None:
        return VerbResult(True, "")
    success = getattr(value, "success", True)
    return VerbResult(bool(success), str(getattr(value, "message", "")))


async def verb_result(call: Awaitable[Any]) -> VerbResult:
    """Await a verb; its value or its (typed) error as a ``VerbResult``. Errors a caller can
    cause are ``ValueError``s, runtime failures (a dead peer, a released engine) are
    ``RuntimeError``s: both become ``success=False`` naming the error. A stopped engine is not
    a verb's failure and propagates (503)."""
    try:
        value = await call
    except EngineStoppedError:
        raise
    except (ValueError, RuntimeError, TimeoutError) as exc:
        return VerbResult(False, f"{type(exc).__name__}: {exc}")
    return from_value(value)
