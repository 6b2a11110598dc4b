"""``Backend``: what the HTTP routes need from whatever serves them, as one small interface.

Two implementations: ``EngineBackend`` (one in-process ``engine_core.Engine``, no Ray) and
``ServiceBackend`` (the Ray rollout service: the driver routes generation, control verbs fan
out to every engine). Every method is a coroutine; verbs return what the engine returns (or
raise its typed error) and routes map that through ``rollout.http.results.verb_result``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from engine_core.requests.generate_request import GenerateRequest


class Backend(ABC):
    """Attributes every backend sets: ``tokenizer`` (HF tokenizer or None), ``model_path``,
    ``context_length``, ``num_engines``, ``kv_capacity`` (KV-cache tokens of the smallest
    engine: the most one request can hold), ``max_requests_per_call`` (the engines' bound on
    batch size x n of one call: the HTTP front holds streams, one per sample, to it too),
    ``max_prompt_chars`` (a longer text cannot fit the context: refused before tokenizing)."""

    tokenizer: Any
    model_path: str
    context_length: int
    num_engines: int
    kv_capacity: int
    max_requests_per_call: int
    max_prompt_chars: int

    # ------------------------------------------------------------------ generation
    @abstractmethod
    async def generate(self, request: GenerateRequest) -> dict | list[dict]:
        """Engine-shaped outputs (a dict for one prompt with n=1, else a list)."""

    @abstractmethod
    def stream(self, request: GenerateRequest) -> AsyncIterator[dict]:
        """SGLang's cumulative chunks of one prompt (n=1): each holds the output so far."""

    @abstractmethod
    async def abort_request(self, rid: str | None, abort_all: bool) -> None: ...

    # ------------------------------------------------------------------ control
    @abstractmethod
    async def flush_cache(self) -> Any: ...

    @abstractmethod
    async def pause_generation(self, mode: str) -> Any: ...

    @abstractmethod
    async def continue_generation(self) -> Any: ...

    @abstractmethod
    async def release_memory_occupation(self, tags: list[str] | None) -> Any: ...

    @abstractmethod
    async def resume_memory_occupation(self, tags: list[str] | None) -> Any: ...

    # ------------------------------------------------------------------ weights
    @abstractmethod
    async def update_weights_from_disk(
        self,
        model_path: str,
        load_format: str | None,
        weight_version: str | None,
        abort_all_requests: bool,
    ) -> Any: ...

    @abstractmethod
    async def update_weights_from_tensor(
        self,
        named_tensors: Any,
        load_format: str | None,
        weight_version: str | None,
        flush_cache: bool = True,
    ) -> Any: ...

    @abstractmethod
    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int | str,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> Any: ...

    @abstractmethod
    async def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        weight_version: str | None,
    ) -> Any: ...

    @abstractmethod
    async def destroy_weights_update_group(self, group_name: str) -> Any: ...

    @abstractmethod
    async def get_weights_by_name(self, name: str, truncate_size: int) -> Any: ...

    @abstractmethod
    async def update_weight_version(self, new_version: str, abort_all_requests: bool) -> Any: ...

    # ------------------------------------------------------------------ state
    @abstractmethod
    async def server_infos(self) -> list[dict[str, Any]]:
        """``get_server_info()`` of every engine, in engine order."""

    async def routing_stats(self) -> dict[str, Any] | None:
        """The router's counters when requests are routed over engines (else None)."""
        return None

    @abstractmethod
    async def model_info(self) -> dict[str, Any]: ...

    @abstractmethod
    async def weight_versions(self) -> list[str]:
        """The weight version of every engine, in engine order."""

    @abstractmethod
    async def close(self) -> None:
        """Abort what is in flight and release everything (idempotent)."""
