"""Executors run model-runner methods on every TP rank.

``LocalExecutor`` (tp_size 1) calls the in-process ``ModelRunner``. ``TPExecutor`` starts one
process per rank (``tp_worker``); the engine process keeps the scheduler and sends each call
(a step's plan, a refit, ...) to every rank, which all run the same method so their
collectives line up. Only rank 0's result is returned.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import uuid
from typing import Any

from engine_core.config import EngineConfig
from engine_core.model_config import ModelConfig
from engine_core.step_plan import StepPlan, StepResult


class RemoteError(RuntimeError):
    """A method raised in a TP worker; carries the worker's rank and traceback text."""


class LocalExecutor:
    """tp_size == 1: the runner lives in this process."""

    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, context_length: int):
        from engine_core.model_runner import ModelRunner

        self.runner = ModelRunner(config, model_cfg, context_length)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.runner, method)(*args, **kwargs)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.runner.execute(plan)

    def shutdown(self) -> None:
        pass


def _free_port() -> int:
    # Asked from the OS per engine: several engines share a node, so no fixed port.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TPExecutor:
    """tp_size > 1: one worker process per rank, joined by a standalone gloo/NCCL group."""

    def __init__(
        self,
        config: EngineConfig,
        model_cfg: ModelConfig,
        context_length: int,
        start_timeout_s: float = 300.0,
    ):
        from engine_core.tp_worker import worker_main

        ctx = mp.get_context("spawn")
        size = config.tp_size
        threads = max(1, (os.cpu_count() or 1) // size) if config.device == "cpu" else 1
        group = {"port": _free_port(), "name": f"tp-{uuid.uuid4().hex[:12]}", "size": size}
        self.conns = []
        self.procs = []
        for rank in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                name=f"tp-rank-{rank}",
                daemon=True,
                args=(rank, child, config, model_cfg, context_length, group, threads),
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._closed = False
        try:
            self._collect("start", timeout=start_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``runner.method(*args)`` on every rank; return rank 0's result."""
        for conn in self.conns:
            conn.send((method, args, kwargs))
        return self._collect(method)[0]

    def execute(self, plan: StepPlan) -> StepResult:
        return self.call("execute", plan)

    def _collect(self, what: str, timeout: float | None = None) -> list[Any]:
        results, errors = [], []
        for rank, conn in enumerate(self.conns):
            if not self._wait(conn, rank, timeout):
                errors.append(f"rank {rank}: no reply to {what} within {timeout}s")
                results.append(None)
                continue
            status, value = conn.recv()
            results.append(value)
            if status != "ok":
                errors.append(f"rank {rank}: {value}")
        if errors:
            raise RemoteError(f"TP {what} failed:\n" + "\n".join(errors))
        return results

    def _wait(self, conn, rank: int, timeout: float | None) -> bool:
        # Poll in slices so a dead worker is reported instead of waited on forever.
        waited = 0.0
        while not conn.poll(1.0):
            waited += 1.0
            if not self.procs[rank].is_alive():
                raise RemoteError(f"TP rank {rank} died (exit code {self.procs[rank].exitcode})")
            if timeout is not None and waited >= timeout:
                return False
        return True

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self.conns:
            try:
                conn.send(("__exit__", (), {}))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()


def make_executor(config: EngineConfig, model_cfg: ModelConfig, context_length: int):
    if config.tp_size == 1:
        return LocalExecutor(config, model_cfg, context_length)
    return TPExecutor(config, model_cfg, context_length)
