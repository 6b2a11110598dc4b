"""SGLang's ``Engine(server_args=...)``: a whole configuration object instead of keywords.

SGLang's ``Engine.__init__`` takes ``server_args`` (a ``ServerArgs``) in place of every other
keyword. Here it may be a dict, our ``EngineConfig``, or any dataclass shaped like SGLang's
``ServerArgs``. Its fields become ``Engine`` keywords: a dataclass field still at its declared
default is left out (it asks for nothing: SGLang's defaults are this engine's behaviour), every
other one goes through the usual translation (``engine_core.sglang_args``), so a field this
engine does not know raises ``InvalidConfigError`` naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from engine_core.errors import InvalidConfigError


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def server_args_kwargs(server_args: Any) -> dict[str, Any]:
    """``server_args`` as ``Engine`` keywords (``model_path`` included)."""
    if isinstance(server_args, Mapping):
        return dict(server_args)
    if not dataclasses.is_dataclass(server_args) or isinstance(server_args, type):
        raise InvalidConfigError(
            "server_args", server_args, "must be a ServerArgs-like dataclass, EngineConfig or dict"
        )
    kwargs = {}
    for f in dataclasses.fields(server_args):
        value = getattr(server_args, f.name)
        if f.name == "model_path" or value != _default(f):
            kwargs[f.name] = value
    return kwargs


def resolve(model_path: str | None, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``Engine(model_path, **kwargs)`` or ``Engine(server_args=...)`` -> (model_path, kwargs).
    As SGLang, ``server_args`` replaces the keywords; giving both raises (nothing is ignored)."""
    if "server_args" in kwargs:
        server_args = kwargs.pop("server_args")
        if model_path is not None or kwargs:
            given = (["model_path"] if model_path is not None else []) + sorted(kwargs)
            raise InvalidConfigError(
                "server_args",
                type(server_args).__name__,
                f"replaces every option; also got {given}",
            )
        kwargs = server_args_kwargs(server_args)
        model_path = kwargs.pop("model_path", None)
    if not isinstance(model_path, str) or not model_path:
        raise InvalidConfigError("model_path", model_path, "a local HF model directory is required")
    return model_path, kwargs
