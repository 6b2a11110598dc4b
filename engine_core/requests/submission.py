"""Hands built requests to the engine loop and waits for their outputs: the blocking, asyncio
and streaming forms of ``Engine.generate``.

Contract: every request id the factory handed out is released exactly once -- by the output
builder when the final output is built, or here when a request fails before that (a
refused submission, an error a sink reported). A caller that stops waiting (a cancelled
await, a stream closed early) gets its requests aborted instead: they keep their ids until
the loop has finished them, so a request reusing an id never receives another's output.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from engine_core.control.engine_memory import MemoryController
from engine_core.errors import EngineStoppedError, InvalidRequestError
from engine_core.requests.factory import RequestFactory
from engine_core.requests.generate_request import GenerateRequest
from engine_core.requests.outputs import BlockingSink, FutureSink, OutputBuilder, StreamSink
from engine_core.requests.request import Request
from engine_core.scheduling.loop import EngineLoop


class Submission:
    """The path from a ``GenerateRequest`` to its outputs, for one engine."""

    def __init__(
        self,
        requests: RequestFactory,
        outputs: OutputBuilder,
        loop: EngineLoop,
        memory: MemoryController,
    ) -> None:
        self.requests = requests
        self.outputs = outputs
        self.loop = loop
        self.memory = memory
        self.building = BuildingCalls()

    def abort(self, rid: str | None, abort_all: bool) -> None:
        """Abort ``rid`` (or everything) in the loop, and in calls still building their
        requests off the event loop: an abort sent after a generate call always finds it."""
        self.building.abort(rid, abort_all)
        if abort_all:
            self.loop.abort(None)
        elif rid is not None:
            self.loop.abort(rid)

    def generate(self, request: GenerateRequest):
        """One output dict, a list for a batch, or (``stream``) an iterator of chunks."""
        reqs, is_batch = self.requests.build(request)
        if request.stream:
            chunks: queue.SimpleQueue = queue.SimpleQueue()
            self._submit_stream(reqs, is_batch, chunks.put)
            return _stream(chunks, self._release_one(reqs[0]), self._abort_one(reqs[0]))
        sinks = [BlockingSink(self.outputs.final) for _ in reqs]
        self._submit(reqs, sinks)
        for sink in sinks:
            while not sink.done.wait(timeout=1.0):
                if not self.loop.alive:
                    raise EngineStoppedError("engine loop died; see the log for its error")
        error = next((sink.error for sink in sinks if sink.error is not None), None)
        if error is not None:
            self.requests.release(r.rid for r in reqs)  # their outputs never got built
            raise error
        outputs = [sink.output for sink in sinks]
        return outputs if is_batch or len(outputs) > 1 else outputs[0]

    async def async_generate(self, request: GenerateRequest):
        """``generate`` for asyncio callers; with ``stream`` an async iterator of chunks. The
        requests are built (validated, tokenized) in a worker thread: a huge prompt must not
        stall the caller's event loop (an HTTP server's other clients)."""
        key = self.building.open(request.rid)
        try:
            reqs, is_batch = await self._build_off_loop(request)
            loop = asyncio.get_running_loop()
            if request.stream:
                chunks: asyncio.Queue = asyncio.Queue()
                self._submit_stream(
                    reqs, is_batch, lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item)
                )
            else:
                sinks = [FutureSink(self.outputs.final, loop) for _ in reqs]
                self._submit(reqs, sinks)
        finally:
            aborted = self.building.close(key)
        for req in reqs:  # aborts asked while the requests were being built
            if aborted(req.rid):
                self.loop.abort(req.rid)
        if request.stream:
            return _drain(chunks, self._release_one(reqs[0]), self._abort_one(reqs[0]))
        try:
            outputs = list(await asyncio.gather(*(s.future for s in sinks)))
        except BaseException:
            self._give_up(reqs, [s.future for s in sinks])
            raise
        return outputs if is_batch or len(outputs) > 1 else outputs[0]

    async def _build_off_loop(self, request: GenerateRequest) -> tuple[list[Request], bool]:
        """``requests.build(request)`` in a worker thread. Cancelled meanwhile, the ids of what
        gets built are released once it is built (nothing will submit those requests)."""
        built = asyncio.get_running_loop().run_in_executor(None, self.requests.build, request)
        try:
            return await asyncio.shield(built)
        except asyncio.CancelledError:
            built.add_done_callback(self._release_built)
            raise

    def _release_built(self, built: asyncio.Future) -> None:
        if not built.cancelled() and built.exception() is None:
            self.requests.release(r.rid for r in built.result()[0])

    def _give_up(self, reqs: list[Request], futures: list[asyncio.Future]) -> None:
        """The caller stopped waiting (cancelled, or one request of the call failed): a failed
        request's id is freed here (its output never got built); every other one is aborted
        and keeps its id until the loop has finished it, so a reuse of the id cannot receive
        this request's output."""
        for req, future in zip(reqs, futures, strict=True):
            failed = future.done() and not future.cancelled() and future.exception() is not None
            if failed:
                self.requests.release([req.rid])
            elif not future.done() or future.cancelled():
                self.loop.abort(req.rid, "aborted: the caller stopped waiting")

    def _release_one(self, req: Request):
        return lambda: self.requests.release([req.rid])

    def _abort_one(self, req: Request):
        return lambda: self.loop.abort(req.rid, "aborted: the caller closed the stream")

    def _submit_stream(self, reqs: list[Request], is_batch: bool, push) -> None:
        if is_batch or len(reqs) != 1:
            self.requests.release(r.rid for r in reqs)
            raise InvalidRequestError("stream", True, "streaming takes one prompt with n=1")
        self._submit(reqs, [StreamSink(self.outputs.delta, push)])

    def _submit(self, reqs: list[Request], sinks: list) -> None:
        alive = self.loop.alive
        error = self.memory.submit_error(self.loop.call) if alive else None
        if not alive:
            error = EngineStoppedError("engine is shut down")
        if error is not None:
            self.requests.release(r.rid for r in reqs)
            raise error
        self.loop.submit(reqs, sinks)


def _stream(chunks: queue.SimpleQueue, release, abort) -> Iterator[dict[str, Any]]:
    """Chunks until the end marker; a failure the sink reported is raised (``release``
    frees the request's id, whose final chunk never got built). Closed early, the request
    is aborted (``abort``): nobody reads the rest."""
    ended = False
    try:
        while (chunk := chunks.get()) is not None:
            if isinstance(chunk, BaseException):
                ended = True
                release()
                raise chunk
            yield chunk
        ended = True
    finally:
        if not ended:
            abort()


async def _drain(chunks: asyncio.Queue, release, abort) -> AsyncIterator[dict[str, Any]]:
    """``_stream`` for asyncio callers."""
    ended = False
    try:
        while (chunk := await chunks.get()) is not None:
            if isinstance(chunk, BaseException):
                ended = True
                release()
                raise chunk
            yield chunk
        ended = True
    finally:
        if not ended:
            abort()


class BuildingCalls:
    """The asyncio calls whose requests are being built in a worker thread, and the aborts
    asked for them meanwhile (applied once the requests are submitted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[int, tuple[set[str], set[str], list[bool]]] = {}
        self._keys = itertools.count()

    def open(self, rid: Any) -> int:
        """Register a call by the ids its caller gave (``rid``: a str, a list, or None)."""
        given = {r for r in (rid if isinstance(rid, list) else [rid]) if isinstance(r, str)}
        with self._lock:
            key = next(self._keys)
            self._calls[key] = (given, set(), [False])
        return key

    def abort(self, rid: str | None, abort_all: bool) -> None:
        with self._lock:
            for given, asked, everything in self._calls.values():
                if abort_all:
                    everything[0] = True
                elif rid in given:
                    asked.add(rid)

    def close(self, key: int) -> Callable[[str], bool]:
        """Forget the call; returns whether a request id of it was aborted meanwhile."""
        with self._lock:
            _, asked, everything = self._calls.pop(key)
        return lambda rid: everything[0] or rid in asked
