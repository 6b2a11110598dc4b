"""``RankClient``: the engine's typed calls to every rank of one engine.

Each method is one thing a rank executes (a method of ``execution.rank.Rank``). The transport
runs it on every rank and returns rank 0's result: ``LocalRanks`` (tp_size 1) calls the
in-process ``Rank``; ``TPRanks`` starts one process per rank (``execution.tp_worker``) and sends
the method itself (pickled by reference) with its arguments down each rank's pipe, so every
rank runs the same call and their collectives line up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from engine_core.config import EngineConfig
from engine_core.execution.rank import Rank, RankInfo
from engine_core.model_config import ModelConfig
from engine_core.scheduling.step_plan import StepPlan, StepResult

T = TypeVar("T")


class RemoteError(RuntimeError):
    """A call raised in a TP worker; carries the worker's rank and traceback text."""


class RankClient:
    """Every rank's ``Rank`` methods, called on all ranks at once (rank 0's result)."""

    def __init__(self, transport: LocalRanks | TPRanks) -> None:
        self._transport = transport
        self._on_all = transport.call
        self._on_each = transport.call_each

    @property
    def local(self) -> Rank | None:
        """The in-process rank (tp_size 1), else None: TP ranks live in worker processes."""
        return self._transport.rank if isinstance(self._transport, LocalRanks) else None

    def shutdown(self) -> None:
        self._transport.shutdown()

    def rank_pids(self) -> list[int]:
        """The process of each rank (this one with tp_size 1): peak RSS is read from them."""
        if isinstance(self._transport, LocalRanks):
            return [os.getpid()]
        return [proc.pid for proc in self._transport.procs]

    # ---- steps
    def info(self) -> RankInfo:
        return self._on_all(Rank.info)

    def execute(self, plan: StepPlan) -> StepResult:
        return self._on_all(Rank.execute, plan)

    # ---- weights (two-phase)
    def stage_checkpoint(self, model_path: str) -> int:
        return self._on_all(Rank.stage_checkpoint, model_path)

    def commit_weights(self) -> int:
        return self._on_all(Rank.commit_weights)

    def discard_weights(self) -> None:
        self._on_all(Rank.discard_weights)

    def get_weight_values(self, name: str, truncate_size: int) -> list:
        return self._on_all(Rank.get_weight_values, name, truncate_size)

    # ---- trainer refits
    def init_group(self, *args: Any) -> int:
        return self._on_all(Rank.init_group, *args)

    def destroy_group(self, group_name: str) -> bool:
        return self._on_all(Rank.destroy_group, group_name)

    def stage_distributed(self, group_name: str, plan, metas, hold: bool) -> int:
        return self._on_all(Rank.stage_distributed, group_name, plan, metas, hold)

    def stage_received(self, group_name: str, pairs, hold: bool) -> int:
        return self._on_all(Rank.stage_received, group_name, pairs, hold)

    def stage_colocated(self, handles: Sequence[Any], hold: bool = False) -> int:
        return self._on_all(Rank.stage_colocated, handles, hold)

    def stage_pairs(self, pairs: list, hold: bool = False) -> int:
        return self._on_all(Rank.stage_pairs, pairs, hold)

    def stage_serialized(
        self, payloads: Sequence[Any], load_format: str | None, hold: bool = False
    ) -> int:
        """SGLang's per-rank payloads: rank ``r`` decodes ``payloads[r]`` only."""
        return self._on_each(Rank.stage_serialized, [(p, load_format, hold) for p in payloads])

    def restage_held(self) -> int:
        return self._on_all(Rank.restage_held)

    def discard_held(self) -> None:
        self._on_all(Rank.discard_held)

    def has_held(self) -> bool:
        return self._on_all(Rank.has_held)

    def checksums(self, names: Sequence[str] | None) -> dict[str, str]:
        return self._on_all(Rank.checksums, names)

    def close_groups(self) -> None:
        self._on_all(Rank.close_groups)

    # ---- memory
    def release_kv_cache(self) -> int:
        return self._on_all(Rank.release_kv_cache)

    def resume_kv_cache(self) -> None:
        self._on_all(Rank.resume_kv_cache)

    def release_weights(self, host_copy: bool) -> int:
        return self._on_all(Rank.release_weights, host_copy)

    def resume_weights(self, source: str, checkpoint: str | None) -> None:
        self._on_all(Rank.resume_weights, source, checkpoint)

    def check_weights_loaded(self) -> None:
        self._on_all(Rank.check_weights_loaded)


def start_ranks(config: EngineConfig, model_cfg: ModelConfig, context_length: int) -> RankClient:
    """The ranks of one engine: in this process for tp_size 1, else one process each."""
    if config.tp_size == 1:
        if config.num_threads is not None:
            import torch

            torch.set_num_threads(config.num_threads)  # this process computes the rank
        return RankClient(LocalRanks(Rank(config, model_cfg, context_length)))
    return RankClient(TPRanks(config, model_cfg, context_length))


class LocalRanks:
    """tp_size == 1: the rank lives in this process."""

    def __init__(self, rank: Rank) -> None:
        self.rank = rank

    def call(self, method: Callable[..., T], *args: Any) -> T:
        return method(self.rank, *args)

    def call_each(self, method: Callable[..., T], per_rank: Sequence[tuple]) -> T:
        return method(self.rank, *per_rank[0])

    def shutdown(self) -> None:
        self.rank.close()  # worker processes free theirs by exiting


def _free_port() -> int:
    # Asked from the OS per engine: several engines share a node, so no fixed port.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TPRanks:
    """tp_size > 1: one worker process per rank, joined by a standalone gloo/NCCL group."""

    def __init__(
        self,
        config: EngineConfig,
        model_cfg: ModelConfig,
        context_length: int,
        start_timeout_s: float = 300.0,
    ):
        from engine_core.execution.tp_worker import start_worker

        size = config.tp_size
        threads = max(1, (os.cpu_count() or 1) // size) if config.device == "cpu" else 1
        threads = config.num_threads or threads
        group = {"port": _free_port(), "name": f"tp-{uuid.uuid4().hex[:12]}", "size": size}
        self.conns = []
        self.procs = []
        self._closed = False
        for rank in range(size):
            try:
                conn, proc = start_worker((rank, config, model_cfg, context_length, group, threads))
            except BaseException:
                self.shutdown()
                raise
            self.conns.append(conn)
            self.procs.append(proc)
        try:
            self._collect("start", timeout=start_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def call(self, method: Callable[..., T], *args: Any) -> T:
        """Run ``method(rank, *args)`` on every rank; return rank 0's result."""
        return self.call_each(method, [args] * len(self.conns))

    def call_each(self, method: Callable[..., T], per_rank: Sequence[tuple]) -> T:
        """Run ``method(rank, *per_rank[r])`` on every rank ``r``; return rank 0's result."""
        for conn, args in zip(self.conns, per_rank, strict=True):
            conn.send((method, args))
        return self._collect(method.__qualname__)[0]

    def _collect(self, what: str, timeout: float | None = None) -> list[Any]:
        results, errors = [], []
        for rank, conn in enumerate(self.conns):
            if not self._wait(conn, rank, timeout):
                errors.append(f"rank {rank}: no reply to {what} within {timeout}s")
                results.append(None)
                continue
            try:
                status, value = conn.recv()
            except (EOFError, OSError):  # the process exited without replying
                code = self.procs[rank].wait(timeout=10)
                raise RemoteError(
                    f"TP rank {rank} exited (code {code}) before replying to {what}; "
                    "see its output above"
                ) from None
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
            if self.procs[rank].poll() is not None:
                raise RemoteError(f"TP rank {rank} died (exit code {self.procs[rank].returncode})")
            if timeout is not None and waited >= timeout:
                return False
        return True

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self.conns:
            try:
                conn.send((None, ()))  # tells the worker to exit
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for conn in self.conns:
            conn.close()
