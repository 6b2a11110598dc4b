"""The one verb-result mapping: SGLang tuples, dicts, raised typed errors -> {success, message}."""

from __future__ import annotations

import asyncio

import pytest

from engine_core.errors import EngineStoppedError, InvalidRequestError, ModelLoadError
from engine_core.requests.outputs import FlushCacheOutput
from rollout.http.results import VerbResult, verb_result


def _run(value=None, error=None) -> VerbResult:
    async def verb():
        if error is not None:
            raise error
        return value

    return asyncio.run(verb_result(verb()))


def test_sglang_tuples():
    assert _run((True, "ok")).body() == {"success": True, "message": "ok"}
    assert _run((False, "bad", 2)).body() == {
        "success": False,
        "message": "bad",
        "num_paused_requests": 2,
    }


def test_dicts_objects_and_none():
    got = _run({"success": True, "num_tensors": 3})
    assert got.body() == {"success": True, "message": "", "num_tensors": 3}
    assert _run(FlushCacheOutput(False, "busy")).body() == {"success": False, "message": "busy"}
    assert _run(None).success is True


def test_raised_typed_errors_are_failures_naming_them():
    got = _run(error=ModelLoadError("no such weight x"))
    assert got.success is False and "ModelLoadError: no such weight x" in got.message
    got = _run(error=InvalidRequestError("master_port", "x", "must be an int"))
    assert got.success is False and "master_port='x'" in got.message
    assert _run(error=RuntimeError("peer died")).success is False


def test_a_stopped_engine_propagates():
    with pytest.raises(EngineStoppedError):
        _run(error=EngineStoppedError("down"))
