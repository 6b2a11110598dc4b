"""Runs the app under uvicorn until SIGINT/SIGTERM (or a ``stop`` event), then shuts down
cleanly: the server stops accepting, every request in flight is aborted on the engines (its
answer or stream ends with finish_reason abort), open connections finish (at most
``GRACE_S``), then the backend closes (engine stopped, or the Ray service torn down)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from typing import TextIO

import uvicorn

from rollout.http.app import build_app
from rollout.http.backend import Backend
from rollout.http.config import HTTPConfig

log = logging.getLogger(__name__)
GRACE_S = 10.0


def run(
    backend: Backend,
    config: HTTPConfig,
    stop: threading.Event | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Serve ``backend`` (owned: closed on the way out); blocks until stopped."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        # uvicorn handles the signal while serving, then re-raises it once it has stopped: this
        # handler takes it then, so the backend still closes and the exit status is 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    try:
        asyncio.run(_serve(backend, config, stop, out))
    finally:
        asyncio.run(backend.close())
    return 0


async def _serve(backend: Backend, config: HTTPConfig, stop, out: TextIO) -> None:
    app = build_app(backend, config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(GRACE_S),
            lifespan="off",
        )
    )
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        if task.done():
            task.result()  # a bind error: raise it
            return
        await asyncio.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    print(f"rollout http server ready at http://{host}:{port}", file=out, flush=True)
    while not task.done():
        if stop is not None and stop.is_set():
            server.should_exit = True
        if server.should_exit and not app.state.shutting_down:
            app.state.shutting_down = True
            print("rollout http server shutting down", file=out, flush=True)
            await backend.abort_request(None, True)  # streams end now, answered with abort
        await asyncio.sleep(0.05)
    await task
