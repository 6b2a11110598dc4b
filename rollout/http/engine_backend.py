"""``EngineBackend``: the HTTP server over one in-process ``engine_core.Engine`` (no Ray).

Generation is ``Engine.async_generate``'s path (concurrent requests share batches), except that
the blocking part -- validating and tokenizing the prompts into engine requests -- runs in a
worker thread, so a huge prompt does not stall the event loop (``/health``, other streams).
Blocking verbs (refits, memory, pause) run in a worker thread too, so the server keeps
answering health checks and aborts meanwhile."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from engine_core import Engine
from engine_core.requests.factory import RequestFactory
from engine_core.requests.generate_request import GenerateRequest
from engine_core.requests.request import Request
from engine_core.requests.submission import Submission
from rollout.http.backend import Backend


class _Built:
    """The engine's request factory, except that ``build`` returns requests already built (in a
    worker thread): the engine's own ``Submission`` then submits them as it always does."""

    def __init__(self, factory: RequestFactory, built: tuple[list[Request], bool]) -> None:
        self._factory = factory
        self._built = built

    def build(self, request: GenerateRequest) -> tuple[list[Request], bool]:
        return self._built

    def __getattr__(self, name: str) -> Any:  # release, ...: the real factory's
        return getattr(self._factory, name)


async def build_off_loop(factory: RequestFactory, request: GenerateRequest):
    """``factory.build(request)`` in a worker thread. If the caller is cancelled meanwhile, the
    ids of what gets built are released once it is (nothing will submit those requests)."""
    future = asyncio.get_running_loop().run_in_executor(None, factory.build, request)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda done: _release_built(factory, done))
        raise


def _release_built(factory: RequestFactory, done: asyncio.Future) -> None:
    if not done.cancelled() and done.exception() is None:
        factory.release(r.rid for r in done.result()[0])


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
        self._closed = False

    async def _run(self, fn, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # ------------------------------------------------------------------ generation
    async def _submission(self, request: GenerateRequest) -> Submission:
        """A copy of the engine's submission path, holding ``request`` built off the loop."""
        submission = self.engine.submission
        built = await build_off_loop(submission.requests, request)
        ready = copy.copy(submission)
        ready.requests = _Built(submission.requests, built)
        return ready

    async def generate(self, request: GenerateRequest) -> dict | list[dict]:
        return await (await self._submission(request)).async_generate(request)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[dict]:
        request = dataclasses.replace(request, stream=True)
        chunks = await (await self._submission(request)).async_generate(request)
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
