"""Ways a caller receives outputs from the loop thread: blocking, streaming, or asyncio."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

from engine_core.request import Request

Finalize = Callable[[Request, str], dict[str, Any]]
Delta = Callable[[Request, "StreamState", bool, str | None], dict[str, Any] | None]


class StreamState:
    """How much of a request has already been streamed."""

    def __init__(self) -> None:
        self.sent_tokens = 0
        self.sent_text = ""


class BlockingSink:
    """Collects the final output; ``wait`` blocks the caller's thread."""

    def __init__(self, finalize: Finalize) -> None:
        self.finalize = finalize
        self.done = threading.Event()
        self.output: dict[str, Any] | None = None

    def on_progress(self, req: Request) -> None:
        pass

    def on_finish(self, req: Request, text: str) -> None:
        self.output = self.finalize(req, text)
        self.done.set()


class StreamSink:
    """Pushes incremental chunks to a queue; ``None`` marks the end."""

    def __init__(self, delta: Delta, push: Callable[[Any], None]) -> None:
        self.delta = delta
        self.push = push
        self.state = StreamState()

    def on_progress(self, req: Request) -> None:
        chunk = self.delta(req, self.state, False, None)
        if chunk is not None:
            self.push(chunk)

    def on_finish(self, req: Request, text: str) -> None:
        self.push(self.delta(req, self.state, True, text))
        self.push(None)


class FutureSink:
    """Resolves an asyncio future on the caller's event loop."""

    def __init__(self, finalize: Finalize, loop: asyncio.AbstractEventLoop) -> None:
        self.finalize = finalize
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()

    def on_progress(self, req: Request) -> None:
        pass

    def on_finish(self, req: Request, text: str) -> None:
        output = self.finalize(req, text)
        self.loop.call_soon_threadsafe(_resolve, self.future, output)


def _resolve(future: asyncio.Future, output: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(output)


def thread_queue_push(q: queue.SimpleQueue) -> Callable[[Any], None]:
    return q.put


def asyncio_queue_push(q: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> Callable[[Any], None]:
    return lambda item: loop.call_soon_threadsafe(q.put_nowait, item)
