"""``Engine``: the SGLang-compatible offline API over one (tensor-parallel) engine.

Requests are validated here (bad input raises ``InvalidRequestError`` before anything is queued),
expanded into one ``Request`` per sample, and handed to the background ``EngineLoop``, which
batches whatever is in flight. Logprobs are ``log_softmax(logits / T)`` over the full vocabulary,
with ``T`` the request's temperature (1.0 when greedy) — what a trainer recomputes.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from typing import Any

from engine_core.config import EngineConfig
from engine_core.control import ControlAPI, EngineControl
from engine_core.engine_loop import EngineLoop
from engine_core.errors import EngineStoppedError, InvalidRequestError
from engine_core.executor import make_executor
from engine_core.model_config import load_model_config
from engine_core.outputs import final_output, meta_info
from engine_core.page_pool import PagePool
from engine_core.parallel import check_tp_divisibility
from engine_core.refit import WeightSyncAPI
from engine_core.request import Request
from engine_core.request_factory import RequestFactory
from engine_core.scheduler import Scheduler
from engine_core.sinks import BlockingSink, FutureSink, StreamSink, StreamState
from engine_core.tokenizer import load_tokenizer, stable_prefix
from engine_core.weights import WeightUpdater


class Engine(WeightSyncAPI, ControlAPI):
    """One inference engine: ``Engine(model_path, **EngineConfig fields)``.

    Refits from a trainer (``update_weights_from_tensor``, ``init_weights_update_group``,
    ``update_weights_from_distributed``, ``get_weights_checksum``, ...) come from
    ``engine_core.refit.WeightSyncAPI``; RL control (release/resume memory, sleep-on-idle,
    pause/continue) from ``engine_core.control.ControlAPI``.
    """

    def __init__(self, model_path: str, **kwargs: Any) -> None:
        self.config = EngineConfig.from_kwargs(model_path, **kwargs)
        self.model_config = load_model_config(model_path)
        self.context_length = self._context_length()
        self.tokenizer = None if self.config.skip_tokenizer_init else load_tokenizer(model_path)
        mc = self.model_config
        check_tp_divisibility(
            mc.num_heads, mc.num_kv_heads, mc.intermediate_size, self.config.tp_size
        )
        self.executor = make_executor(self.config, mc, self.context_length)
        self.pool = PagePool(self.executor.call("info")["num_pages"], self.config.page_size)
        self.scheduler = Scheduler(
            self.pool, self.config.max_running_requests, self.config.max_num_batched_tokens
        )
        self.requests = RequestFactory(
            self.tokenizer,
            mc.vocab_size,
            self.context_length,
            self.pool,
            self.config.seed,
            max_requests_per_call=self.config.max_requests_per_call,
        )
        self.loop = EngineLoop(
            self.scheduler,
            self.executor.execute,
            self.model_config.eos_token_ids,
            self._decode,
            lambda: self.weights.version,
        )
        self.weights = WeightUpdater(self.loop, self.executor, mc, self.config.weight_version)
        self.control = EngineControl.attach(self)

    def _context_length(self) -> int:
        mc = self.model_config
        limit = self.config.context_length or mc.max_position_embeddings
        # Sliding-window models run full attention; capping the context keeps that exact.
        return min(limit, mc.sliding_window) if mc.sliding_window else limit

    # ------------------------------------------------------------------ outputs
    def _decode(self, req: Request) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(
            req.output_ids, skip_special_tokens=req.params.skip_special_tokens
        )

    def _finalize(self, req: Request, text: str) -> dict[str, Any]:
        self.requests.release([req.rid])
        return final_output(req, text, self.weight_version)

    def _delta(self, req: Request, state: StreamState, final: bool, text: str | None):
        if final:
            self.requests.release([req.rid])
            full = text or ""
        else:
            full = stable_prefix(self._decode(req))
            hold = max((len(s) for s in req.params.stop), default=1) - 1
            full = full[: len(full) - hold] if hold else full  # may yet become a stop string
        new_ids = req.output_ids[state.sent_tokens :]
        new_text = full[len(state.sent_text) :] if len(full) > len(state.sent_text) else ""
        if not final and not new_ids:
            return None
        state.sent_tokens += len(new_ids)
        state.sent_text += new_text
        return {
            "text": new_text,
            "output_ids": new_ids,
            "meta_info": meta_info(req, self.weight_version),
        }

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompt=None,
        input_ids=None,
        sampling_params=None,
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        rid=None,
        stream=False,
    ):
        """Generate for one prompt (returns a dict) or a batch (a list, samples of a prompt
        adjacent). ``stream=True`` (one prompt, n=1) returns an iterator of incremental chunks
        whose ``text`` and ``output_ids`` concatenate to the full output."""
        reqs, is_batch = self.requests.build(
            prompt,
            input_ids,
            sampling_params,
            return_logprob,
            logprob_start_len,
            top_logprobs_num,
            rid,
        )
        if stream:
            return self._stream(reqs, is_batch)
        sinks = [BlockingSink(self._finalize) for _ in reqs]
        self._submit(reqs, sinks)
        for sink in sinks:
            while not sink.done.wait(timeout=1.0):
                if not self.loop.alive:
                    raise EngineStoppedError("engine loop died; see the log for its error")
        outputs = [sink.output for sink in sinks]
        return outputs if is_batch or len(outputs) > 1 else outputs[0]

    def _stream(self, reqs: list[Request], is_batch: bool) -> Iterator[dict[str, Any]]:
        self._check_streamable(reqs, is_batch)
        chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._submit(reqs, [StreamSink(self._delta, chunks.put)])

        def iterate() -> Iterator[dict[str, Any]]:
            while (chunk := chunks.get()) is not None:
                yield chunk

        return iterate()

    def _check_streamable(self, reqs: list[Request], is_batch: bool) -> None:
        if is_batch or len(reqs) != 1:
            self.requests.release(r.rid for r in reqs)
            raise InvalidRequestError("stream", True, "streaming takes one prompt with n=1")

    async def async_generate(
        self,
        prompt=None,
        input_ids=None,
        sampling_params=None,
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        rid=None,
        stream=False,
    ):
        """asyncio form of ``generate``; concurrent calls share batches. With ``stream=True``
        returns an async iterator of chunks."""
        reqs, is_batch = self.requests.build(
            prompt,
            input_ids,
            sampling_params,
            return_logprob,
            logprob_start_len,
            top_logprobs_num,
            rid,
        )
        loop = asyncio.get_running_loop()
        if stream:
            return self._async_stream(reqs, is_batch, loop)
        sinks = [FutureSink(self._finalize, loop) for _ in reqs]
        self._submit(reqs, sinks)
        outputs = list(await asyncio.gather(*(s.future for s in sinks)))
        return outputs if is_batch or len(outputs) > 1 else outputs[0]

    def _async_stream(self, reqs, is_batch, loop) -> AsyncIterator[dict[str, Any]]:
        self._check_streamable(reqs, is_batch)
        chunks: asyncio.Queue = asyncio.Queue()
        push = lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item)  # noqa: E731
        self._submit(reqs, [StreamSink(self._delta, push)])

        async def iterate() -> AsyncIterator[dict[str, Any]]:
            while (chunk := await chunks.get()) is not None:
                yield chunk

        return iterate()

    def _submit(self, reqs: list[Request], sinks: list) -> None:
        alive = self.loop.alive
        error = self.control.submit_error() if alive else EngineStoppedError("engine is shut down")
        if error is not None:
            self.requests.release(r.rid for r in reqs)
            raise error
        self.loop.submit(reqs, sinks)

    def abort_request(self, rid: str | None = None, abort_all: bool = False) -> None:
        """Abort a request (its output returns with finish_reason abort), or all of them."""
        if abort_all:
            self.loop.abort(None)
        elif rid is not None:
            self.loop.abort(rid)

    def get_server_info(self) -> dict[str, Any]:
        stats = self.loop.stats
        return {
            "config": self.config.to_dict(),
            "model": self.model_config.__dict__ | {"context_length": self.context_length},
            "weight_version": self.weight_version,
            "num_running_requests": len(self.scheduler.running),
            "num_waiting_requests": len(self.scheduler.waiting),
            "num_total_pages": self.pool.num_pages,
            "num_free_pages": self.pool.num_free,
            "max_total_num_tokens": self.pool.capacity_tokens,
            "num_retractions": self.scheduler.stats.num_retractions,
            **self.control.info(),
            "generated_tokens": stats.generated_tokens,
            "steps": stats.steps,
            "decode_throughput": stats.generated_tokens / stats.busy_seconds
            if stats.busy_seconds
            else 0.0,
        }

    # ------------------------------------------------------------------ weights
    @property
    def weight_version(self) -> str:
        return self.weights.version

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> dict:
        """Reload weights from a safetensors checkpoint of the same architecture (never pickles).
        Atomic: on any error the old weights and version stay. Returns ``{"success", ...}``."""
        return self.weights.from_disk(model_path, weight_version)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[float]:
        """First ``truncate_size`` values of HF-named parameter ``name`` (this rank's shard)."""
        return self.weights.get_weights_by_name(name, truncate_size)

    @property
    def runner(self):
        """The in-process model runner (tp_size 1 only; TP ranks live in worker processes)."""
        return self.executor.runner

    def shutdown(self) -> None:
        """Stop the loop (requests in flight finish with finish_reason abort), then the ranks."""
        self.loop.stop()
        self.close_weight_sync()
        self.executor.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
