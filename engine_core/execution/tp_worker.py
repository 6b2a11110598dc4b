"""One TP rank's process: joins the TP group, builds its ``Rank``, serves its calls.

``start_worker`` runs it as ``python -m engine_core.execution.tp_worker <fd>``: a fresh
interpreter that never imports the user's ``__main__`` (multiprocessing's spawn re-runs an
unguarded script in every child, which then fails), connected to the engine by a socket pair
whose end it inherits. The first message carries the rank's arguments, ``sys.path`` and the
engine process's multiprocessing authkey (a rank fetches the shared-memory descriptors of
SGLang-serialized tensors from the process that pickled them, which checks that key).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import traceback
from typing import Any

from engine_core.config import EngineConfig
from engine_core.model_config import ModelConfig


def worker_main(
    rank: int,
    conn: Any,
    config: EngineConfig,
    model_cfg: ModelConfig,
    context_length: int,
    group: dict,
    threads: int,
) -> None:
    """Serve ``(Rank method, args)`` calls until ``(None, ())``; reply ``(status, value)``."""
    import torch

    torch.set_num_threads(threads)
    try:
        worker, tp_group = _start(rank, config, model_cfg, context_length, group)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    try:
        _serve(rank, conn, worker)
    finally:
        tp_group.destroy()


def _start(
    rank: int, config: EngineConfig, model_cfg: ModelConfig, context_length: int, group: dict
):
    import torch

    from engine_core.execution.rank import Rank
    from engine_core.parallel import TPContext
    from weight_sync.group import create_group

    device = None
    if config.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    tp_group = create_group(
        "127.0.0.1",
        group["port"],
        rank,
        group["size"],
        group["name"],
        backend="nccl" if config.device == "cuda" else "gloo",
        timeout_s=600.0,
        device=device,
    )
    tp = TPContext(
        rank=rank,
        size=group["size"],
        group=tp_group.process_group,
        ordered_all_reduce=config.deterministic_all_reduce,
    )
    return Rank(config, model_cfg, context_length, tp), tp_group


def _serve(rank: int, conn: Any, worker: Any) -> None:
    while True:
        try:
            method, args = conn.recv()
        except EOFError:  # the engine process went away
            return
        if method is None:
            return
        try:
            value = method(worker, *args)
            conn.send(("ok", value if rank == 0 else None))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


def start_worker(args: tuple) -> tuple[multiprocessing.connection.Connection, subprocess.Popen]:
    """Start one rank process (engine side); ``args`` are ``worker_main``'s after ``conn``."""
    parent, child = multiprocessing.Pipe()
    fd = child.fileno()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine_core.execution.tp_worker", str(fd)], pass_fds=[fd], env=env
    )
    child.close()
    parent.send((args, list(sys.path), bytes(multiprocessing.current_process().authkey)))
    return parent, proc


def _main(fd: int) -> None:
    conn = multiprocessing.connection.Connection(fd)
    args, path, authkey = conn.recv()
    sys.path[:] = path
    multiprocessing.current_process().authkey = authkey
    rank, *rest = args
    worker_main(rank, conn, *rest)


if __name__ == "__main__":
    _main(int(sys.argv[1]))
