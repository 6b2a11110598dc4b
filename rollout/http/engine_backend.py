"""``EngineBackend``: the HTTP server over one in-process ``engine_core.Engine`` (no Ray).

Generation is ``Engine.async_generate`` (concurrent requests share batches; it validates and
tokenizes prompts in a worker thread, so a huge prompt does not stall the event loop). Blocking
verbs (refits, memory, pause) run in a worker thread too, so the server keeps
answering health checks and aborts meanwhile."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from engine_core import Engine
from engine_core.requests.generate_request import GenerateRequest
from rollout.http.backend import Backend


class EngineBackend(Backend):
    """Owns ``engine`` (``close`` shuts it down)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_path = engine.config.model_path
        self.context_length = engine.context_length
        self.num_engines = 1
        self.kv_capacity = engine.pool.capacity_tokens
        self.max_requests_per_call = engine.config.max_requests_per_call
        self.max_prompt_chars = engine.requests.max_prompt_chars
        self._closed = False

    async def _run(self, fn, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # ------------------------------------------------------------------ generation
    async def generate(self, request: GenerateRequest) -> dict | list[dict]:
        return await self.engine.async_generate(request)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[dict]:
        chunks = await self.engine.async_generate(dataclasses.replace(request, stream=True))
        async for chunk in chunks:
            yield chunk

    async def abort_request(self, rid: str | None, abort_all: bool) -> None:
        self.engine.abort_request(rid=rid, abort_all=abort_all)

    # ------------------------------------------------------------------ control
    async def flush_cache(self) -> Any:
        return await self._run(self.engine.flush_cache)

    async def pause_generation(self, mode: str) -> Any:
        return await self._run(self.engine.pause_generation, mode)

    async def continue_generation(self) -> Any:
        return await self._run(self.engine.continue_generation)

    async def release_memory_occupation(self, tags: list[str] | None) -> Any:
        return await self._run(self.engine.release_memory_occupation, tags)

    async def resume_memory_occupation(self, tags: list[str] | None) -> Any:
        return await self._run(self.engine.resume_memory_occupation, tags)

    # ------------------------------------------------------------------ weights
    async def update_weights_from_disk(
        self, model_path, load_format, weight_version, abort_all_requests
    ) -> Any:
        return await self._run(
            self.engine.update_weights_from_disk,
            model_path,
            load_format,
            weight_version,
            abort_all_requests=abort_all_requests,
        )

    async def update_weights_from_tensor(
        self, named_tensors, load_format, weight_version, flush_cache=True
    ) -> Any:
        return await self._run(
            self.engine.update_weights_from_tensor,
            named_tensors,
            load_format,
            flush_cache=flush_cache,
            weight_version=weight_version,
        )

    async def init_weights_update_group(
        self, master_address, master_port, rank_offset, world_size, group_name, backend
    ) -> Any:
        return await self._run(
            self.engine.init_weights_update_group,
            master_address,
            master_port,
            rank_offset,
            world_size,
            group_name,
            backend,
        )

    async def update_weights_from_distributed(
        self, names, dtypes, shapes, group_name, weight_version
    ) -> Any:
        return await self._run(
            self.engine.update_weights_from_distributed,
            names,
            dtypes,
            shapes,
            group_name,
            weight_version=weight_version,
        )

    async def destroy_weights_update_group(self, group_name: str) -> Any:
        return await self._run(self.engine.destroy_weights_update_group, group_name)

    async def get_weights_by_name(self, name: str, truncate_size: int) -> Any:
        return await self._run(self.engine.get_weights_by_name, name, truncate_size)

    async def update_weight_version(self, new_version: str, abort_all_requests: bool) -> Any:
        return await self._run(self.engine.update_weight_version, new_version, abort_all_requests)

    # ------------------------------------------------------------------ state
    async def server_infos(self) -> list[dict[str, Any]]:
        return [self.engine.get_server_info()]

    async def model_info(self) -> dict[str, Any]:
        return self.engine.get_model_info()

    async def weight_versions(self) -> list[str]:
        return [self.engine.weight_version]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine.abort_request(abort_all=True)
        await self._run(self.engine.shutdown)
