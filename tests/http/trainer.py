"""A trainer process written the way RL frameworks write it (torch.distributed only: rendezvous
+ ``PrefixStore`` + ``_new_process_group_helper``); rank 0 of ``world`` broadcasts the tensors
of a safetensors file, one per name, in order (SGLang's per-tensor distributed update)."""

from __future__ import annotations

import os

from safetensors.torch import load_file


def stock_trainer(port: int, world: int, group: str, weights: str, names: list[str], q) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # this sandbox: loopback only
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    try:
        timeout = timedelta(seconds=60)
        url = f"tcp://127.0.0.1:{port}"
        store, rank, world_size = next(rendezvous(url, 0, world, timeout=timeout))
        store.set_timeout(timeout)
        pg, _ = _new_process_group_helper(
            world_size,
            rank,
            [],
            Backend("gloo"),
            PrefixStore(group, store),
            group_name=group,
            timeout=timeout,
        )
        _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
        tensors = load_file(weights)
        for name in names:
            dist.broadcast(tensors[name], src=0, group=pg)
        q.put("sent")
        # Joins gloo's threads now: left to interpreter exit they sometimes abort the process
        # ("terminate called without an active exception", exit code -6).
        dist.destroy_process_group(pg)
    except BaseException as exc:  # reported to the test
        q.put(f"{type(exc).__name__}: {exc}")
