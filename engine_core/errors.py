"""Typed errors raised at the engine's boundaries.

Every error a caller can cause is a ``ValueError`` subclass whose message names the offending
field and value; the engine keeps serving after raising it.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A generate call carried a bad argument (names the field and the value)."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        super().__init__(f"invalid {field}={shown}: {reason}")
        self.field = field
        self.value = value


class InvalidConfigError(ValueError):
    """An engine configuration field is out of range or inconsistent."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"invalid config {field}={value!r}: {reason}")
        self.field = field
        self.value = value


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded (unknown architecture, missing/corrupt/bad tensor)."""


class EngineStoppedError(RuntimeError):
    """The engine was shut down (or its loop died) before the request could be served."""
