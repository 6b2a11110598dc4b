"""``EngineActor``: one (tensor-parallel) ``engine_core.Engine`` behind Ray.

The actor methods are the RPC and mirror the Engine API (``generate``, ``async_generate``,
``abort_request``, ``get_server_info``, ``shutdown``, the refit / sleep / pause verbs), plus
``health``, ``generate_stream`` and ``drain_cache_events`` (the prefix cache's page events, for
the driver's cache-aware router). It is an async actor: concurrent ``generate`` calls run as
concurrent ``Engine.async_generate`` calls, so they share the engine's batches. Blocking engine
calls (refit, sleep) run in a thread so ``health`` and ``abort_request`` keep answering.

Refit verbs return SGLang's ``(success, message)`` tuples, but a failure raises its typed error
(the engine is built with ``refit_errors="raise"`` unless the caller chose otherwise): the
service's all-or-none refits and restarts need the error, not a ``False`` to check.

TP ranks are processes the Engine spawns on this actor's node; they use this actor's
reservation (the service reserves ``tp_size`` ranks' CPUs/GPUs for it) and, should they ever be
Ray tasks, the placement group captures them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import pickle
import uuid
from dataclasses import dataclass
from typing import Any

import ray

from engine_core.errors import InvalidRequestError
from engine_core.requests.generate_request import GenerateRequest, takes_generate_request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsSource:
    """Where the current weights come from: a checkpoint directory and its version label."""

    model_path: str
    weight_version: str


def _portable(exc: Exception) -> Exception:
    """``exc``, or a plain ValueError/RuntimeError with its message when it cannot be unpickled:
    Ray ships exceptions to the caller by pickle, and errors whose ``__init__`` takes several
    arguments (without a ``__reduce__``, as engine_core's errors have) would reach it as an
    opaque ``UnserializableException``."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        kind = ValueError if isinstance(exc, ValueError) else RuntimeError
        return kind(f"{type(exc).__name__}: {exc}")


def _reconstructed() -> bool:
    """True when Ray restarted this actor after a failure (``max_restarts``)."""
    import warnings

    with warnings.catch_warnings():  # Ray warns about its own deprecated internals here
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


@ray.remote
class EngineActor:
    """Owns one Engine. ``registry`` is the (name, namespace) of the service's
    ``RolloutDriver``; it is asked for the current weights when Ray restarts this actor, so a
    restarted engine rejoins on the current version.
    """

    def __init__(
        self,
        model_path: str,
        engine_kwargs: dict[str, Any] | None = None,
        registry: tuple[str, str] | None = None,
        index: int = 0,
        **kwargs: Any,
    ) -> None:
        """``EngineActor.remote(model_path, engine_kwargs_dict, registry, index)`` (the service)
        or, as ``sglang.Engine``, ``EngineActor.remote(model_path, **engine_kwargs)``."""
        if engine_kwargs is not None and not isinstance(engine_kwargs, dict):
            raise TypeError(
                f"engine_kwargs must be a dict of engine options, not {engine_kwargs!r}"
            )
        both = set(engine_kwargs or {}) & set(kwargs)
        if both:
            raise TypeError(
                f"engine options given twice (engine_kwargs and keywords): {sorted(both)}"
            )
        self._model_path = model_path
        self._kwargs = {**(engine_kwargs or {}), **kwargs}
        # The service raises a failed refit's typed error through Ray (RefitError, retries and
        # the all-or-none refit across engines depend on it); success is SGLang's tuple.
        self._kwargs.setdefault("refit_errors", "raise")
        self._index = index
        self._reconstructed = _reconstructed()
        # New on every (re)start: a restarted actor left every weight-update group it was in.
        self._incarnation = uuid.uuid4().hex
        source = WeightsSource(model_path, str(self._kwargs.pop("weight_version", "default")))
        if registry is not None and self._reconstructed:
            try:
                # By (name, namespace), not handle: a handle argument would live in the object
                # store, and Ray cannot restart an actor whose arguments went out of scope.
                driver = ray.get_actor(registry[0], namespace=registry[1])
                # A future, not ray.get: Ray warns about any blocking get in an async actor
                # (nothing else runs before __init__ returns, so blocking here is fine).
                source = driver.weights_source.remote(index).future().result(timeout=60)
            except (ValueError, TimeoutError, ray.exceptions.RayActorError):
                # No driver (service going down): serve the configured weights rather than die.
                log.warning("engine %d: driver unreachable; starting on %s", index, source)
        self.engine = self._load(source)

    def _load(self, source: WeightsSource):
        """Build the Engine at ``source``: the single place that brings a (re)started engine to
        the service's current weights."""
        from engine_core import Engine

        version = source.weight_version
        if source.model_path == self._model_path:
            return Engine(self._model_path, **self._kwargs, weight_version=version)
        # Keep the original directory's tokenizer/config; take only the weights from source.
        engine = Engine(self._model_path, **self._kwargs)
        engine.update_weights_from_disk(source.model_path, weight_version=version)
        return engine

    # ------------------------------------------------------------------ generation
    @takes_generate_request
    async def generate(self, *args: Any, **kwargs: Any):
        """``Engine.generate`` over Ray (``GenerateRequest``'s arguments, or one): a dict for one
        prompt, a list for a batch (the ``n`` samples of a prompt adjacent). Streams are not
        values: use ``generate_stream``."""
        try:
            request = GenerateRequest.of(*args, **kwargs)
            if request.stream:
                raise InvalidRequestError(
                    "stream", True, "a Ray call returns one value; use generate_stream instead"
                )
            return await self.engine.async_generate(request)
        except Exception as exc:
            raise _portable(exc) from None

    @takes_generate_request
    async def async_generate(self, *args: Any, **kwargs: Any):
        """Same as ``generate`` (every actor call is asynchronous for the caller)."""
        return await self.generate(*args, **kwargs)

    @takes_generate_request
    async def generate_stream(self, *args: Any, **kwargs: Any):
        """Streaming generator (one prompt, n=1): ``for ref in actor.generate_stream.remote(..)``
        yields refs of incremental chunks, as ``Engine.generate(stream=True)``."""
        try:
            request = dataclasses.replace(GenerateRequest.of(*args, **kwargs), stream=True)
            chunks = await self.engine.async_generate(request)
        except Exception as exc:
            raise _portable(exc) from None
        async for chunk in chunks:
            yield chunk

    def abort_request(self, rid: str | None = None, abort_all: bool = False) -> None:
        """Abort one request id (sample ids are ``{rid}-{i}`` when n > 1) or all of them."""
        self.engine.abort_request(rid=rid, abort_all=abort_all)

    # ------------------------------------------------------------------ status
    def _whereabouts(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "engine_index": self._index,
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
            "placement_group_id": ctx.get_placement_group_id(),
            "reconstructed": self._reconstructed,
        }

    def get_server_info(self) -> dict[str, Any]:
        """``Engine.get_server_info()`` plus ``actor``: where this engine runs."""
        return self.engine.get_server_info() | {"actor": self._whereabouts()}

    def health(self) -> dict[str, Any]:
        """Cheap liveness probe: ``ok`` is False once the engine loop stopped."""
        return {
            "ok": self.engine.loop.alive,
            "weight_version": self.engine.weight_version,
            "incarnation": self._incarnation,
            **self._whereabouts(),
        }

    def drain_cache_events(self) -> list[Any]:
        """``Engine.drain_cache_events()``: the prefix cache's events since the last drain, in
        order (the driver's cache-aware router replays them)."""
        return self.engine.drain_cache_events()

    def shutdown(self) -> None:
        """Stop the engine (in-flight requests finish with finish_reason abort)."""
        self.engine.shutdown()

    # ------------------------------------------------------------------ refit / sleep / pause
    async def _forward(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.engine, verb)
        try:
            if inspect.iscoroutinefunction(fn):
                return await fn(*args, **kwargs)
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:
            raise _portable(exc) from None

    async def update_weights_from_disk(
        self, model_path: str, weight_version: str | None = None, **kwargs: Any
    ):
        """Load weights from a checkpoint directory (``Engine.update_weights_from_disk``; its
        SGLang keywords such as ``load_format`` pass through)."""
        return await self._forward(
            "update_weights_from_disk", model_path, weight_version=weight_version, **kwargs
        )

    async def flush_cache(self):
        return await self._forward("flush_cache")

    async def get_model_info(self):
        return await self._forward("get_model_info")

    async def update_weights_from_tensor(self, *args: Any, **kwargs: Any):
        return await self._forward("update_weights_from_tensor", *args, **kwargs)

    async def init_weights_update_group(self, *args: Any, **kwargs: Any):
        return await self._forward("init_weights_update_group", *args, **kwargs)

    async def update_weights_from_distributed(self, *args: Any, **kwargs: Any):
        return await self._forward("update_weights_from_distributed", *args, **kwargs)

    async def destroy_weights_update_group(self, *args: Any, **kwargs: Any):
        return await self._forward("destroy_weights_update_group", *args, **kwargs)

    async def get_weights_by_name(self, *args: Any, **kwargs: Any):
        return await self._forward("get_weights_by_name", *args, **kwargs)

    async def commit_staged_weights(self, *args: Any, **kwargs: Any):
        return await self._forward("commit_staged_weights", *args, **kwargs)

    async def discard_staged_weights(self, *args: Any, **kwargs: Any):
        return await self._forward("discard_staged_weights", *args, **kwargs)

    async def get_weights_checksum(self, *args: Any, **kwargs: Any):
        return await self._forward("get_weights_checksum", *args, **kwargs)

    async def release_memory_occupation(self, *args: Any, **kwargs: Any):
        return await self._forward("release_memory_occupation", *args, **kwargs)

    async def resume_memory_occupation(self, *args: Any, **kwargs: Any):
        return await self._forward("resume_memory_occupation", *args, **kwargs)

    async def pause_generation(self, *args: Any, **kwargs: Any):
        return await self._forward("pause_generation", *args, **kwargs)

    async def continue_generation(self, *args: Any, **kwargs: Any):
        return await self._forward("continue_generation", *args, **kwargs)

    async def update_weight_version(self, *args: Any, **kwargs: Any):
        return await self._forward("update_weight_version", *args, **kwargs)
