"""A backend stream opened eagerly (so bad input is a 400, not a broken 200 stream) and closed
on every exit: when the client goes away mid-stream the request is aborted on the engine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from engine_core.requests.generate_request import GenerateRequest
from rollout.http.backend import Backend

log = logging.getLogger(__name__)


class OpenStream:
    """``await OpenStream.open(backend, request)`` has the first chunk (or raised the typed
    error); iterate ``chunks()`` for all of them. ``request.rid`` must be set (abort key)."""

    def __init__(self, backend: Backend, request: GenerateRequest, it, first: dict) -> None:
        self.backend = backend
        self.rid = request.rid
        self._it = it
        self._first = first
        self.finished = False

    @classmethod
    async def open(cls, backend: Backend, request: GenerateRequest) -> OpenStream:
        it = backend.stream(request)
        try:
            first = await it.__anext__()
        except StopAsyncIteration:  # pragma: no cover - a stream always ends with its final chunk
            raise RuntimeError("the engine ended the stream without output") from None
        return cls(backend, request, it, first)

    async def abort(self) -> None:
        """Abort a stream that will not be read (a sibling of a batch failed to open)."""
        await _quiet_abort(self)
        await self._it.aclose()

    async def chunks(self) -> AsyncIterator[dict]:
        try:
            chunk = self._first
            while True:
                self.finished = chunk["meta_info"].get("finish_reason") is not None
                yield chunk
                try:
                    chunk = await self._it.__anext__()
                except StopAsyncIteration:
                    return
        finally:
            if not self.finished:  # the client left (or the stream failed): free the engine
                await _quiet(lambda: self.backend.abort_request(self.rid, False))
            await self._it.aclose()


async def open_all(backend: Backend, requests: list[GenerateRequest]) -> list[OpenStream]:
    """Every request's stream, opened in order before the answer (so bad input is still a
    400); if one fails to open, those already open are aborted and the error raised."""
    streams: list[OpenStream] = []
    try:
        for request in requests:
            streams.append(await OpenStream.open(backend, request))
    except BaseException:
        for stream in streams:
            await stream.abort()
        raise
    return streams


async def merged(streams: list[OpenStream]) -> AsyncIterator[tuple[int, dict]]:
    """Chunks of every stream as they come, tagged with the stream's index in ``streams``."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: OpenStream) -> None:
        try:
            async for chunk in stream.chunks():
                await queue.put((index, chunk))
        except Exception as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            index, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Deltas:
    """One stream's cumulative chunks (SGLang's default, as the engines send them) turned into
    what is new: ``text`` / ``output_ids`` deltas, ``meta_info`` as it comes (for OpenAI chunks
    and SGLang's incremental mode)."""

    def __init__(self) -> None:
        self.text, self.ids = "", 0

    def __call__(self, chunk: dict) -> dict:
        full_text, full_ids = chunk["text"], chunk["output_ids"]
        delta = full_text[len(self.text) :] if full_text.startswith(self.text) else full_text
        self.text, start, self.ids = full_text, self.ids, len(full_ids)
        return {**chunk, "text": delta, "output_ids": full_ids[start:]}


def check_cumulative_engines(engine_kwargs: dict) -> None:
    """The HTTP front needs the engines' default (cumulative) streams; incremental HTTP chunks
    are the server's own switch (``HTTPConfig.incremental_streaming_output``)."""
    if engine_kwargs.get("incremental_streaming_output"):
        from engine_core.errors import InvalidConfigError

        raise InvalidConfigError(
            "incremental_streaming_output",
            True,
            "behind rollout serve, set it on the server (HTTPConfig), not on the engines",
        )


async def _quiet_abort(stream: OpenStream) -> None:
    await _quiet(lambda: stream.backend.abort_request(stream.rid, False))


async def _quiet(call: Callable) -> None:
    try:
        await call()
    except Exception:  # the engine may be gone already; nothing is waiting for this stream
        log.debug("abort after a closed stream failed", exc_info=True)
