"""Typed errors raised at the engine's boundaries.

Every error a caller can cause is a ``ValueError`` subclass whose message names the offending
field and value; the engine keeps serving after raising it.
"""

from __future__ import annotations


class _FieldError(ValueError):
    """Base of the errors that name a field; picklable (they cross Ray and process pipes)."""

    prefix = "invalid"

    def __init__(self, field: str, value: object, reason: str) -> None:
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        super().__init__(f"{self.prefix} {field}={shown}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.field, self.value, self.reason))


class InvalidRequestError(_FieldError):
    """A generate call carried a bad argument (names the field and the value)."""


class InvalidConfigError(_FieldError):
    """An engine configuration field is out of range or inconsistent."""

    prefix = "invalid config"


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded (unknown architecture, missing/corrupt/bad tensor)."""


class EngineReleasedError(RuntimeError):
    """The engine's memory is released (``release_memory_occupation``) or its weights await a
    refit; resume it (or refit) before generating."""


class MemoryStateError(ValueError):
    """``release_memory_occupation`` of memory already released by the caller, or
    ``resume_memory_occupation`` of memory that is not released (nothing changed)."""


class EngineStoppedError(RuntimeError):
    """The engine was shut down (or its loop died) before the request could be served."""


class RefitStateError(ValueError):
    """A refit verb called in the wrong state: an update is held (commit or discard it first),
    or there is none to commit (nothing changed)."""
