"""A trainer built with the stock recipe SGLang's tests, verl, slime, OpenRLHF and AReaL use
(``rendezvous("tcp://...")`` + ``PrefixStore(group_name, store)`` + torch's
``_new_process_group_helper``; trainer rank 0, world 1 + engine ranks) joins the engine's
weight-update group and refits it with SGLang's per-tensor broadcasts, or one broadcast of
SGLang's flattened bucket (``load_format="flattened_bucket"``, tp_size 1 and 2)."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch
from safetensors.torch import load_file

from engine_core import Engine
from weight_sync import free_port
from weight_sync.checksum import checksums_of

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


def _stock_trainer(
    port: int, world: int, group: str, weights: str, names: list[str], q, flat: bool = False
) -> None:
    """Written the way RL frameworks write it (torch.distributed only)."""
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
        store = PrefixStore(group, store)
        pg, _ = _new_process_group_helper(
            world_size, rank, [], Backend("gloo"), store, group_name=group, timeout=timeout
        )
        _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
        tensors = load_file(weights)
        if flat:  # SGLang's FlattenedTensorBucket: flattened, concatenated, one broadcast
            dist.broadcast(torch.cat([tensors[n].flatten() for n in names]), src=0, group=pg)
        for name in [] if flat else names:
            dist.broadcast(tensors[name], src=0, group=pg)
        q.put("ok")
    except BaseException as exc:  # reported to the test
        q.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("dtype_form", ["str", "torch", "flattened_bucket", "flattened_tp2"])
def test_stock_recipe_trainer_refits_the_engine(model_dir, dtype_form):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    weights = os.path.join(new, "model.safetensors")
    tensors = load_file(weights)
    names = sorted(tensors)
    shapes = [list(tensors[n].shape) for n in names]
    dtypes = [tensors[n].dtype if dtype_form == "torch" else "float32" for n in names]
    with Engine(new, device="cpu", refit_errors="raise") as fresh:
        expected = fresh.generate(input_ids=[1, 2, 3], sampling_params=GREEDY)["output_ids"]
    port, group = free_port(), f"stock-{dtype_form}"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    flat, tp = dtype_form.startswith("flattened"), 2 if dtype_form.endswith("tp2") else 1
    args = (port, 1 + tp, group, weights, names, q, flat)
    trainer = ctx.Process(target=_stock_trainer, args=args)
    trainer.start()
    try:
        with Engine(old, device="cpu", refit_errors="raise", tp_size=tp) as engine:
            # master_port as a string, as JSON payloads and CLIs pass it
            joined = engine.init_weights_update_group(
                "127.0.0.1", str(port), 1, 1 + tp, group, "gloo"
            )
            assert joined == (True, "Succeeded to initialize custom process group.")
            result = engine.update_weights_from_distributed(
                names,
                dtypes,
                shapes,
                group_name=group,
                weight_version="stock-1",
                load_format="flattened_bucket" if flat else None,
            )
            assert result[0] is True and engine.weight_version == "stock-1"
            assert q.get(timeout=60) == "ok"
            assert engine.get_weights_checksum(names) == checksums_of(tensors)
            got = engine.generate(input_ids=[1, 2, 3], sampling_params=GREEDY)["output_ids"]
            assert got == expected
            engine.destroy_weights_update_group(group)
    finally:
        trainer.join(timeout=30)
        if trainer.is_alive():
            trainer.kill()


def test_bad_master_port_is_named(model_dir):
    with Engine(model_dir("llama"), device="cpu", refit_errors="raise") as engine:
        with pytest.raises(ValueError, match="master_port='x'"):
            engine.init_weights_update_group("127.0.0.1", "x", 1, 2, "bad-port", "gloo", 5)
        assert engine.generate(input_ids=[1, 2], sampling_params=GREEDY)["output_ids"]


def test_dtype_names():
    from engine_core.weights.refitter import dtype_name

    assert dtype_name(torch.bfloat16) == dtype_name("torch.bfloat16") == "bfloat16"
    assert dtype_name("float32") == "float32"
