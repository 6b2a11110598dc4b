"""``Engine``: the SGLang-compatible offline API over one (tensor-parallel) engine.

The constructor builds the engine's parts in order; every verb delegates to the part that owns
it. A request: ``GenerateRequest`` -> ``RequestFactory`` (validated, one ``Request`` per
sample) -> ``Submission`` -> the background ``EngineLoop`` (scheduler, ranks) -> a sink -> the
output dict.
Logprobs are ``log_softmax(logits / T)`` over the full vocabulary, with ``T`` the request's
temperature (1.0 when greedy) -- what a trainer recomputes; with a sampling penalty, of the
penalized logits (as SGLang).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from engine_core.config import EngineConfig, check_device_usable
from engine_core.control.engine_memory import MemoryController, normalize_tags
from engine_core.errors import InvalidRequestError, ModelLoadError
from engine_core.execution.rank_client import start_ranks
from engine_core.info import model_info, server_info
from engine_core.kv_budget import resolve_kv_budget
from engine_core.model_config import load_model_config, serving_context_length
from engine_core.parallel import check_tp_divisibility
from engine_core.requests.factory import RequestFactory
from engine_core.requests.generate_request import GenerateRequest, takes_generate_request
from engine_core.requests.outputs import FlushCacheOutput, OutputBuilder
from engine_core.requests.submission import Submission
from engine_core.scheduling.cache_events import CacheEvent
from engine_core.scheduling.loop import EngineLoop
from engine_core.scheduling.page_pool import PagePool
from engine_core.scheduling.radix_cache import RadixCache
from engine_core.scheduling.scheduler import Scheduler
from engine_core.server_args import resolve as resolve_server_args
from engine_core.sglang_args import log_no_effect
from engine_core.tokenizer import load_tokenizer
from engine_core.weights.payloads import RefitSegments
from engine_core.weights.refit_results import (
    DISK_OK,
    DISTRIBUTED_OK,
    GROUP_DESTROY_OK,
    GROUP_INIT_OK,
    GROUP_MISSING,
    TENSOR_OK,
    RefitResults,
    with_version,
)
from engine_core.weights.refitter import DEFAULT_GROUP, Refitter, WeightVersions

log = logging.getLogger(__name__)
LOAD_FORMATS = (None, "auto", "safetensors")


class Engine:
    """One inference engine: ``Engine(model_path, **kwargs)`` with ``EngineConfig`` fields or
    SGLang's ``ServerArgs`` names (``engine_core.sglang_args``; ``model_path`` may be a keyword,
    as in ``sglang.Engine(model_path=...)``), or SGLang's ``Engine(server_args=...)``
    (``engine_core.server_args``)."""

    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        model_path, kwargs = resolve_server_args(model_path, kwargs)
        translated = EngineConfig.translate(model_path, kwargs)
        self.server_args_given = translated.given  # SGLang names as given (get_server_info)
        config = EngineConfig.from_translated(model_path, translated)
        check_device_usable(config.device)
        if "log_level" in translated.given:
            _set_log_level(translated.given["log_level"])
        log_no_effect(translated.no_effect)
        self.model_config = mc = load_model_config(model_path)
        self.context_length = serving_context_length(mc, config.context_length)
        self.config = config = resolve_kv_budget(config, mc, self.context_length)
        self.served = {"model_path": model_path, "load_format": translated.given.get("load_format")}
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(model_path)
        check_tp_divisibility(mc.num_heads, mc.num_kv_heads, mc.intermediate_size, config.tp_size)
        self.ranks = start_ranks(config, mc, self.context_length)
        self.rank_info = self.ranks.info()
        self.pool = PagePool(self.rank_info.num_pages, config.page_size)
        self.scheduler = Scheduler(
            self.pool,
            config.max_running_requests,
            config.max_num_batched_tokens,
            RadixCache(self.pool) if config.enable_prefix_cache else None,
        )
        self.requests = RequestFactory(
            self.tokenizer,
            mc.vocab_size,
            self.context_length,
            self.pool,
            config.seed,
            config.max_requests_per_call,
            config.enable_return_hidden_states,
        )
        self.versions = WeightVersions(config.weight_version, model_path)
        self.outputs = OutputBuilder(
            self.tokenizer,
            self.requests.release,
            self._version,
            config.incremental_streaming_output,
        )
        self.segments = RefitSegments()
        self.memory = MemoryController(
            config,
            self.ranks,
            self.scheduler,
            self.versions,
            # On the loop thread: never wait for a refit that is packing (it waits for the loop).
            on_weights_released=lambda: self.segments.release(blocking=False),
        )
        self.loop = EngineLoop(
            self.scheduler,
            self.ranks.execute,
            mc.eos_token_ids,
            self.outputs.decode,
            self._version,
            self.memory,
        )
        self.refitter = Refitter(
            self.loop,
            self.ranks,
            mc,
            self.versions,
            self.segments,
            self.memory.before_refit,
            config.tp_size,
            # Old-weights KV must never be reused: a committed refit drops the prefix cache.
            on_commit=self.scheduler.reset_cache,
        )
        self.results = RefitResults(config.refit_errors)
        self.submission = Submission(self.requests, self.outputs, self.loop, self.memory)

    def _version(self) -> str:
        return self.versions.current

    # ------------------------------------------------------------------ generation
    @takes_generate_request
    def generate(self, *args: Any, **kwargs: Any):
        """Generate for one prompt (returns a dict) or a batch (a list, samples of a prompt
        adjacent); arguments: ``GenerateRequest``'s (SGLang's). ``stream=True`` (one prompt,
        n=1) returns an iterator of chunks, each holding the output so far (as SGLang; the last
        equals the final output), or only what is new with ``incremental_streaming_output``."""
        return self.submission.generate(GenerateRequest.of(*args, **kwargs))

    @takes_generate_request
    async def async_generate(self, *args: Any, **kwargs: Any):
        """asyncio form of ``generate``; concurrent calls share batches. With ``stream=True``
        returns an async iterator of chunks."""
        return await self.submission.async_generate(GenerateRequest.of(*args, **kwargs))

    def abort_request(self, rid: str | None = None, abort_all: bool = False) -> None:
        """Abort a request (its output returns with finish_reason abort), or all of them."""
        _check_flag("abort_all", abort_all)
        self.submission.abort(rid, abort_all)

    def get_server_info(self) -> dict[str, Any]:
        """Engine state (``config``, ``model``, ``memory``, counters), plus SGLang's flat keys:
        every ``ServerArgs`` name of ``engine_core.sglang_args`` (the value in effect here),
        ``max_total_num_tokens``, ``max_req_input_len``, ``internal_states`` and ``version``."""
        return server_info(self)

    def get_model_info(self) -> dict[str, Any]:
        """SGLang's ``get_model_info``: what this engine serves now (``model_path`` and
        ``load_format`` follow the last successful ``update_weights_from_disk``)."""
        return model_info(self)

    def flush_cache(self) -> FlushCacheOutput:
        """SGLang's ``flush_cache``: succeeds only when no request is running or waiting (else
        ``success=False`` with the counts, and a warning). An idle flush drops the whole prefix
        cache (an ``AllBlocksCleared`` page event)."""

        def check() -> FlushCacheOutput:
            waiting, running = len(self.scheduler.waiting), len(self.scheduler.running)
            if waiting or running:
                message = (
                    "Cache not flushed because there are pending requests. "
                    f"#queue-req: {waiting}, #running-req: {running}"
                )
                return FlushCacheOutput(False, message)
            self.scheduler.reset_cache()
            return FlushCacheOutput(True, "")

        result = self.loop.call(check)
        if not result.success:
            log.warning(result.message)
        return result

    def drain_cache_events(self) -> list[CacheEvent]:
        """Prefix-cache page events since the last call, oldest first
        (``engine_core.scheduling.cache_events``; empty when the cache is disabled). A router
        replaying them knows exactly which page hashes this engine holds."""
        cache = self.scheduler.prefix.cache
        return [] if cache is None else cache.events.drain()

    @property
    def weight_version(self) -> str:
        return self.versions.current

    @property
    def runner(self):
        """The in-process rank (tp_size 1 only; TP ranks live in worker processes)."""
        return self.ranks.local

    # ------------------------------------------------------------------ refits (Refitter)
    # SGLang's return values: ``(success, message)`` (``update_weights_from_disk`` adds
    # ``num_paused_requests``); a failure is ``(False, message)`` with weights and version
    # unchanged, or the typed error with ``refit_errors="raise"`` (``weights/refit_results``).
    # ``flush_cache`` is accepted for SGLang's callers and has no effect: a committed refit
    # always drops the prefix cache (KV computed with the old weights is never reused).
    def update_weights_from_disk(
        self,
        model_path: str,
        load_format: str | None = None,
        weight_version: str | None = None,
        *,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
        is_async: bool = False,
        torch_empty_cache: bool = False,
        keep_pause: bool = False,
        recapture_cuda_graph: bool = False,
        token_step: int = 0,
        manifest: dict | None = None,
    ) -> tuple[bool, str, int]:
        """Reload weights from a safetensors checkpoint of the same architecture (never pickles;
        atomic). Returns SGLang's ``(success, message, num_paused_requests)`` (always 0 paused:
        requests in flight continue on the new weights).

        SGLang's arguments: ``load_format`` None / ``"auto"`` / ``"safetensors"``;
        ``abort_all_requests`` aborts what is in flight first; ``manifest`` must be None; the
        others (cache, CUDA-graph and pause knobs, ``is_async``: it returns once committed)
        have nothing to do here."""

        def run() -> tuple[bool, str]:
            if load_format not in LOAD_FORMATS:
                raise ModelLoadError(
                    f"load_format={load_format!r}: only safetensors checkpoints load "
                    f"({LOAD_FORMATS})"
                )
            if manifest is not None:
                raise ModelLoadError("manifest: not supported (the checkpoint's files are read)")
            if abort_all_requests:
                self.abort_request(abort_all=True)
            self.refitter.from_disk(model_path, weight_version)
            self.served = {"model_path": model_path, "load_format": load_format}
            return True, with_version(DISK_OK, weight_version)

        success, message = self.results.run("update_weights_from_disk", run)
        return success, message, 0

    def update_weights_from_tensor(
        self,
        named_tensors: Any,
        load_format: str | None = None,
        flush_cache: bool = True,
        weight_version: str | None = None,
        commit: bool = True,
    ) -> tuple[bool, str]:
        """Load tensors handed over in memory; SGLang's ``(success, message)``.

        ``named_tensors`` (``weights/payloads.py``): ``(name, tensor)`` pairs or a dict (HF
        names, any subset; ``load_format="direct"`` also takes the fused ``qkv_proj`` /
        ``gate_up_proj`` names), SGLang's serialized payloads -- one
        ``MultiprocessingSerializer.serialize(...)`` bytes/base64 string per TP rank, of pairs
        or (``load_format="flattened_bucket"``) of a ``FlattenedTensorBucket`` dict -- or a
        trainer's ``weight_sync.ColocatedBuckets`` handles (``"flattened_bucket"``).
        ``commit=False`` (not SGLang's) validates and holds a private copy on every rank, for
        a commit across engines: finish with ``commit_staged_weights`` or
        ``discard_staged_weights``."""

        def run() -> tuple[bool, str]:
            self.refitter.from_tensors(named_tensors, load_format, weight_version, commit)
            return True, with_version(TENSOR_OK, weight_version)

        return self.results.run("update_weights_from_tensor", run)

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = DEFAULT_GROUP,
        backend: str = "gloo",
        timeout_s: float = 300.0,
    ) -> tuple[bool, str]:
        """Join a weight-update group (separate from the TP group): TP rank ``r`` becomes rank
        ``rank_offset + r`` of ``world_size``. Blocks until every member joined (the trainer,
        normally rank 0, calls ``weight_sync.create_group`` concurrently); ``timeout_s`` bounds
        the rendezvous and every later transfer of this group."""

        def run() -> tuple[bool, str]:
            self.refitter.init_group(
                master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s
            )
            return True, GROUP_INIT_OK

        return self.results.run("init_weights_update_group", run)

    def update_weights_from_distributed(
        self,
        names: Any,
        dtypes: Sequence[Any] | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
        group_name: str = DEFAULT_GROUP,
        flush_cache: bool = True,
        load_format: str | None = None,  # SGLang's sixth positional
        weight_version: str | None = None,
        commit: bool = True,
    ) -> tuple[bool, str]:
        """Receive an update broadcast by the group's rank 0, stage it on every rank, commit.

        ``names``: an ``UpdatePlan`` (or its JSON) -- the trainer's ``WeightSender`` streams the
        plan's buckets and ``weight_version`` defaults to the plan's -- or SGLang's
        ``names``/``dtypes``/``shapes`` lists, each tensor one plain broadcast in that order
        (``load_format="flattened_bucket"``: one broadcast of SGLang's flattened bucket).
        Everything is received into a staging arena before any weight is touched.
        ``commit=False`` stages and holds the update (for a commit across engines): finish with
        ``commit_staged_weights`` or ``discard_staged_weights``. After a ``WeightSyncError``
        (dead sender, timeout) destroy and re-init the group; after a bad name/shape/dtype
        (``ModelLoadError``) the group stays usable."""

        def run() -> tuple[bool, str]:
            self.refitter.from_distributed(
                names, dtypes, shapes, group_name, weight_version, commit, load_format
            )
            return True, with_version(DISTRIBUTED_OK, weight_version)

        return self.results.run("update_weights_from_distributed", run)

    def commit_staged_weights(
        self, weight_version: str | None = None, flush_cache: bool | None = None
    ) -> dict:
        """Commit the update held by ``update_weights_from_distributed`` / ``_from_tensor``
        (``commit=False``) on every rank and switch the version (default: the one given when
        staging). Not SGLang's: returns ``{"success", "num_tensors", "weight_version"}`` and
        raises on failure."""
        return self.refitter.commit_held(weight_version)

    def discard_staged_weights(self) -> dict:
        """Drop a held update (weights and version stay); a no-op when none is held."""
        return self.refitter.discard_held()

    def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP) -> tuple[bool, str]:
        """Leave the group on every rank (drops an update held from it). As SGLang:
        ``(False, "The group to be destroyed does not exist.")`` for an unknown group."""

        def run() -> tuple[bool, str]:
            existed = self.refitter.destroy_group(group_name)["existed"]
            return (True, GROUP_DESTROY_OK) if existed else (False, GROUP_MISSING)

        return self.results.run("destroy_weights_update_group", run)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        """HF-named parameter ``name`` as SGLang returns it: ``tolist()`` of its first
        ``truncate_size`` rows (dim 0), so a matrix gives a list of rows, a vector a list of
        floats (this rank's shard with TP; ``ModelLoadError`` for an unknown name)."""
        return self.refitter.weight_values(name, truncate_size)

    def get_weights_checksum(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """``{HF name: sha256 hex}`` of the weights (all of them when ``names`` is None).

        Each digest covers the raw bytes of the *full* tensor in the engine's dtype -- with TP
        the shards are gathered first -- so a trainer compares it with
        ``weight_sync.checksum.tensor_checksum(t.to(engine_dtype))`` of what it sent. A tied LM
        head is ``model.embed_tokens.weight`` (ask for ``lm_head.weight`` explicitly)."""
        return self.refitter.checksums(names)

    def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> dict:
        """SGLang's ``update_weight_version``: relabel the current weights (no weight changes;
        between two steps, so every later token carries the new label)."""
        if not isinstance(new_version, str) or not new_version:
            raise InvalidRequestError("new_version", new_version, "must be a non-empty str")
        _check_flag("abort_all_requests", abort_all_requests)
        if abort_all_requests:
            self.abort_request(abort_all=True)
        version = self.loop.call(lambda: self.versions.relabel(new_version))
        return {
            "success": True,
            "message": f"Weight version updated to {version}",
            "new_version": version,
        }

    # ------------------------------------------------------------------ RL control
    def release_memory_occupation(self, tags: Iterable[str] | str | None = None) -> dict:
        """Free the engine's ``tags`` memory ("weights", "kv_cache"; None: both; SGLang's
        "cuda_graph" is accepted and has nothing to free) on every TP rank, between two steps
        (``control.engine_memory``). Running requests are retracted first when the KV cache
        goes; until resumed, generating raises ``EngineReleasedError`` (or waits:
        ``generate_while_released="wait"``). Releasing what is already released raises
        ``MemoryStateError`` (SGLang's memory saver fails the engine then)."""
        chosen, explicit = normalize_tags(tags), tags is not None
        return self.loop.call(lambda: self.memory.release_requested(chosen, explicit))

    def resume_memory_occupation(
        self, tags: Iterable[str] | str | None = None, weights: str = "auto"
    ) -> dict:
        """Re-allocate ``tags`` (None: whatever is released). ``weights``: ``"auto"`` |
        ``"host"`` | ``"checkpoint"`` | ``"empty"`` (see ``control.engine_memory``). Resuming
        what is not released raises ``MemoryStateError`` (SGLang's scheduler fails then)."""
        chosen, explicit = normalize_tags(tags), tags is not None
        return self.loop.call(lambda: self.memory.resume_requested(chosen, explicit, weights))

    def pause_generation(self, mode: str = "abort") -> dict:
        """Stop generating: ``"abort"`` | ``"retract"`` | ``"in_place"`` (see
        ``control.pause``). New requests queue; aborts, refits and memory verbs still work."""
        return self.loop.call(lambda: self.loop.pause.pause(mode))

    def continue_generation(self) -> dict:
        """Resume generating after ``pause_generation`` (a no-op when not paused)."""
        return self.loop.call(self.loop.pause.resume)

    @property
    def is_paused(self) -> bool:
        return self.loop.pause.paused

    def shutdown(self) -> None:
        """Stop the loop (requests in flight finish with finish_reason abort), then the ranks."""
        self.loop.stop()
        self.refitter.close()
        self.ranks.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):  # "no" would read as True
        raise InvalidRequestError(name, value, "must be a bool")


def _set_log_level(level: Any) -> None:
    """SGLang's ``log_level`` (validated by ``sglang_args.translate``): the level of the
    ``engine_core`` loggers."""
    logging.getLogger("engine_core").setLevel(str(level).upper())
