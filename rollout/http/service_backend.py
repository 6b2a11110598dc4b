"""``ServiceBackend``: the HTTP server in front of the Ray rollout service.

Generation goes through the ``RolloutDriver``, whose routing policy (``ServiceConfig.policy``)
picks the engine per prompt group; streams too (``RolloutDriver.generate_stream``). Control
verbs fan out to every engine. A distributed refit is all or none, as ``WeightSyncActor`` does
it: every engine stages the update (``commit=False``) while the trainer broadcasts, then every
engine commits -- or, if any failed, every engine discards and the error is answered. The
weight-update group spans every engine rank: engine ``i``'s ranks start at ``rank_offset +
i * tp_size``, so a trainer sizes ``world_size = 1 + num_engines * tp_size``. A tensor refit
(``/update_weights_from_tensor``) is all or none the same way: every engine validates and holds
a copy (``commit=False``), then all commit or all discard. SGLang's serialized payloads go to one
engine only (their shared tensors can be fetched once), so with more than one engine they are a
400: such servers take base64 safetensors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from engine_core.requests.generate_request import GenerateRequest
from engine_core.requests.item_checks import max_prompt_chars
from engine_core.weights.sglang_payloads import is_serialized
from rollout.http.backend import Backend
from rollout.http.errors import bad_request
from rollout.http.results import from_value
from rollout.service import RolloutService


async def _all(refs: list[Any]) -> list[Any]:
    return list(await asyncio.gather(*refs))


def _first_failure(outcomes: list[Any]) -> Any:
    """The first engine's failure among a fan-out's outcomes (a raised error or SGLang's
    ``(False, message)`` tuple); None when every engine succeeded."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException) or not from_value(outcome).success:
            return outcome
    return None


def _answer(failure: Any) -> Any:
    if isinstance(failure, BaseException):
        raise failure
    return failure


async def commit_everywhere(
    engines: list[Any], staging: list[Any], weight_version, flush_cache
) -> tuple[Any, str | None]:
    """All or none: ``staging`` holds one staged (``commit=False``) update per engine; commit on
    every engine once all staged, else discard the held updates everywhere and answer the first
    failure. Returns the answer and the version switched to (None when nothing switched)."""
    failed = _first_failure(await asyncio.gather(*staging, return_exceptions=True))
    if failed is not None:
        await _all([e.discard_staged_weights.remote() for e in engines])
        return _answer(failed), None
    results = await _all(
        [e.commit_staged_weights.remote(weight_version, flush_cache) for e in engines]
    )
    version = results[0].get("weight_version", weight_version)
    return {"success": True, "message": f"{len(results)} engines updated"}, version


class ServiceBackend(Backend):
    """Owns ``service`` (``close`` shuts it down)."""

    def __init__(self, service: RolloutService) -> None:
        from engine_core.model_config import load_model_config
        from engine_core.tokenizer import load_tokenizer

        self.service = service
        self.engines = service.engines
        self.driver = service.driver
        self.model_path = service.model_path
        self.num_engines = len(self.engines)
        self.tp_size = service.config.tp_size
        engine_kwargs = service.config.engine
        skip = engine_kwargs.get("skip_tokenizer_init", False)
        self.tokenizer = None if skip else load_tokenizer(self.model_path)
        mc = load_model_config(self.model_path)
        self.context_length = engine_kwargs.get("context_length") or mc.max_position_embeddings
        infos = service.server_info()
        self.kv_capacity = min(i["max_total_num_tokens"] for i in infos)
        self.max_requests_per_call = min(i["config"]["max_requests_per_call"] for i in infos)
        self.max_prompt_chars = max_prompt_chars(self.tokenizer, self.context_length)
        self._closed = False

    # ------------------------------------------------------------------ generation
    async def generate(self, request: GenerateRequest) -> dict | list[dict]:
        return await self.driver.generate.remote(request)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[dict]:
        async for ref in self.driver.generate_stream.remote(request):
            yield await ref

    async def abort_request(self, rid: str | None, abort_all: bool) -> None:
        await _all([e.abort_request.remote(rid=rid, abort_all=abort_all) for e in self.engines])

    # ------------------------------------------------------------------ control
    async def flush_cache(self) -> Any:
        results = await _all([e.flush_cache.remote() for e in self.engines])
        failed = [r for r in results if not r.success]
        return failed[0] if failed else results[0]

    async def pause_generation(self, mode: str) -> Any:
        return (await _all([e.pause_generation.remote(mode) for e in self.engines]))[0]

    async def continue_generation(self) -> Any:
        return (await _all([e.continue_generation.remote() for e in self.engines]))[0]

    async def release_memory_occupation(self, tags: list[str] | None) -> Any:
        return await _all([e.release_memory_occupation.remote(tags) for e in self.engines])

    async def resume_memory_occupation(self, tags: list[str] | None) -> Any:
        return await _all([e.resume_memory_occupation.remote(tags) for e in self.engines])

    # ------------------------------------------------------------------ weights
    async def update_weights_from_disk(
        self, model_path, load_format, weight_version, abort_all_requests
    ) -> Any:
        if abort_all_requests:
            await self.abort_request(None, True)
        # The driver records the checkpoint, so engines Ray restarts come up on it too.
        results = await self.driver.update_weights_from_disk.remote(model_path, weight_version)
        return {"success": True, "message": f"{len(results)} engines updated"}

    async def update_weights_from_tensor(
        self, named_tensors, load_format, weight_version, flush_cache=True
    ) -> Any:
        if self.num_engines > 1 and is_serialized(named_tensors):
            # A shared-memory descriptor in such a payload can be fetched once: the second
            # engine would fail after the first had switched (weights out of step).
            raise bad_request(
                "serialized_named_tensors",
                "<payloads>",
                f"SGLang's serialized payloads reach one engine only; this server has "
                f"{self.num_engines}: send base64 safetensors or refit over a weights group",
            )
        if self.num_engines == 1:
            ref = self.engines[0].update_weights_from_tensor.remote(
                named_tensors, load_format, flush_cache=flush_cache, weight_version=weight_version
            )
            return await ref
        refs = [
            e.update_weights_from_tensor.remote(
                named_tensors, load_format, weight_version=weight_version, commit=False
            )
            for e in self.engines
        ]
        return await self._refit_everywhere(refs, weight_version, flush_cache)

    async def _refit_everywhere(self, staging: list[Any], weight_version, flush_cache) -> Any:
        answer, version = await commit_everywhere(
            self.engines, staging, weight_version, flush_cache
        )
        if version is not None:
            await self.driver.note_refit.remote(version)
        return answer

    async def init_weights_update_group(
        self, master_address, master_port, rank_offset, world_size, group_name, backend
    ) -> Any:
        refs = [
            engine.init_weights_update_group.remote(
                master_address,
                master_port,
                rank_offset + i * self.tp_size,
                world_size,
                group_name,
                backend,
            )
            for i, engine in enumerate(self.engines)
        ]
        failed = _first_failure(await asyncio.gather(*refs, return_exceptions=True))
        if failed is not None:
            return _answer(failed)
        ranks = list(range(rank_offset, rank_offset + self.num_engines * self.tp_size))
        return {"success": True, "message": f"joined as ranks {ranks}", "ranks": ranks}

    async def update_weights_from_distributed(
        self, names, dtypes, shapes, group_name, weight_version
    ) -> Any:
        refs = [
            e.update_weights_from_distributed.remote(
                names, dtypes, shapes, group_name, weight_version=weight_version, commit=False
            )
            for e in self.engines
        ]
        return await self._refit_everywhere(refs, weight_version, None)

    async def destroy_weights_update_group(self, group_name: str) -> Any:
        refs = [e.destroy_weights_update_group.remote(group_name) for e in self.engines]
        return (await _all(refs))[0]

    async def get_weights_by_name(self, name: str, truncate_size: int) -> Any:
        return await self.engines[0].get_weights_by_name.remote(name, truncate_size)

    async def update_weight_version(self, new_version: str, abort_all_requests: bool) -> Any:
        refs = [
            e.update_weight_version.remote(new_version, abort_all_requests) for e in self.engines
        ]
        return (await _all(refs))[0]

    # ------------------------------------------------------------------ state
    async def server_infos(self) -> list[dict[str, Any]]:
        return await _all([e.get_server_info.remote() for e in self.engines])

    async def routing_stats(self) -> dict[str, Any] | None:
        return await self.driver.routing_stats.remote()

    async def model_info(self) -> dict[str, Any]:
        return await self.engines[0].get_model_info.remote()

    async def weight_versions(self) -> list[str]:
        health = await self.driver.health.remote()
        return [h["weight_version"] if h else None for h in health]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.abort_request(None, True)
        finally:
            await asyncio.to_thread(self.service.shutdown)
