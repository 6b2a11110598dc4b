"""Refit cost on the default model (538 MB fp32), all measured in this one run (issue 5):

- raw: one ``torch.distributed`` (gloo) broadcast of a flat buffer of the model's size from a
  spawned process to this one -- the wire's ceiling;
- transport: ``WeightSender`` (pack + header + bucket broadcasts) into a ``StagingArena``;
- distributed refit: the same stream into a live engine (receive into staging, validate,
  commit, version switch) -- ``Engine.update_weights_from_distributed``;
- disk refit (``update_weights_from_disk``, page cache warm) and colocated refits
  (``update_weights_from_tensor`` with in-process tensors, and with shared-memory buckets
  including the trainer's packing).

Every distributed timing is taken on the receiving side from the "go" sent to the sender to
the end of the call, so packing on the sender is included. Median of ``--iters`` after one
warm-up (first-touch page faults of fresh buffers are not what a steady trainer pays).

    python benchmarks/bench_refit.py [--iters 5] [--bucket-mb 64 512]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import write_section  # noqa: E402
from engine_core import Engine  # noqa: E402
from engine_core.default_model import ensure_default_model  # noqa: E402
from weight_sync import (  # noqa: E402
    ColocatedBuckets,
    UpdatePlan,
    create_group,
    free_port,
)
from weight_sync.checksum import tensor_checksum  # noqa: E402
from weight_sync.staging import StagingArena  # noqa: E402

GROUP = "bench-refit"


def _load(model_path: str) -> dict[str, torch.Tensor]:
    """The model's tensors in anonymous memory, as a trainer holds them (``load_file`` may
    leave them backed by the file mapping)."""
    from safetensors.torch import load_file

    return {
        k: v.clone() for k, v in load_file(os.path.join(model_path, "model.safetensors")).items()
    }


def _sender(conn, port: int, mode: str, model_path: str, bucket_bytes: int, rounds: int) -> None:
    """Rank 0: per round, wait for "go", then broadcast (raw) or stream (ours)."""
    from weight_sync import WeightSender

    # One intra-op thread: packing runs beside gloo's I/O threads on a 2-core machine.
    torch.set_num_threads(1)
    named = _load(model_path)
    group = create_group("127.0.0.1", port, 0, 2, GROUP, "gloo", timeout_s=300)
    try:
        if mode == "raw":
            flat = torch.empty(sum(t.nbytes for t in named.values()), dtype=torch.uint8)
            flat.fill_(7)
            for _ in range(rounds):
                conn.recv()
                group.broadcast(flat, 0)
        else:
            sender = WeightSender(group, bucket_bytes=bucket_bytes)
            for k in range(rounds):
                plan = sender.plan(named, f"bench-{k}")
                conn.send(plan.to_json())
                conn.recv()
                sender.send(named, plan)
            sender.close()
        conn.send(("ok", None))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
    finally:
        group.destroy()


class SenderProc:
    """Owner of the spawned sender and its pipe."""

    def __init__(self, mode: str, model_path: str, bucket_bytes: int, rounds: int):
        ctx = mp.get_context("spawn")
        self.port = free_port()
        self.conn, child = ctx.Pipe()
        args = (child, self.port, mode, model_path, bucket_bytes, rounds)
        self.proc = ctx.Process(target=_sender, args=args, daemon=True)
        self.proc.start()
        child.close()

    def close(self) -> None:
        status = self.conn.recv()
        self.proc.join(60)
        assert status[0] == "ok", status


def time_raw(model_path: str, nbytes: int, rounds: int) -> list[float]:
    proc = SenderProc("raw", model_path, 0, rounds)
    group = create_group("127.0.0.1", proc.port, 1, 2, GROUP, "gloo", timeout_s=300)
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        proc.conn.send("go")
        group.broadcast(buf, 0)
        times.append(time.perf_counter() - started)
    assert int(buf[-1]) == 7
    group.destroy()
    proc.close()
    return times


def time_transport(model_path: str, bucket_bytes: int, rounds: int) -> list[float]:
    proc = SenderProc("ours", model_path, bucket_bytes, rounds)
    group = create_group("127.0.0.1", proc.port, 1, 2, GROUP, "gloo", timeout_s=300)
    arena, times = StagingArena(), []
    for _ in range(rounds):
        plan = UpdatePlan.from_json(proc.conn.recv())
        started = time.perf_counter()
        proc.conn.send("go")
        arena.receive(group, plan)
        times.append(time.perf_counter() - started)
    arena.close()
    group.destroy()
    proc.close()
    return times


def time_distributed(engine: Engine, model_path: str, bucket_bytes: int, rounds: int):
    proc = SenderProc("ours", model_path, bucket_bytes, rounds)
    engine.init_weights_update_group("127.0.0.1", proc.port, 1, 2, GROUP, timeout_s=300)
    times = []
    for _ in range(rounds):
        plan = proc.conn.recv()
        started = time.perf_counter()
        proc.conn.send("go")
        engine.update_weights_from_distributed(plan, group_name=GROUP)
        times.append(time.perf_counter() - started)
    engine.destroy_weights_update_group(GROUP)
    proc.close()
    return times


def timed(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def med(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)  # drop the warm-up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[64, 512])
    args = parser.parse_args()
    rounds = args.iters + 1
    path = ensure_default_model()
    named = _load(path)
    nbytes = sum(t.nbytes for t in named.values())
    gb = nbytes / 1e9

    raw = med(time_raw(path, nbytes, rounds))
    rows = [("raw gloo broadcast, one flat buffer", raw)]
    for mb in args.bucket_mb:
        t = med(time_transport(path, mb << 20, rounds))
        rows.append((f"transport only ({mb} MB buckets, into staging)", t))
    with Engine(path, device="cpu", max_total_tokens=1024, skip_tokenizer_init=True) as engine:
        for mb in args.bucket_mb:
            t = med(time_distributed(engine, path, mb << 20, rounds))
            rows.append((f"**distributed refit** ({mb} MB buckets; into the engine)", t))
        probe = "model.layers.29.mlp.down_proj.weight"
        assert engine.get_weights_checksum([probe])[probe] == tensor_checksum(named[probe])
        t = med(timed(lambda: engine.update_weights_from_disk(path), rounds))
        rows.append(("disk refit (safetensors, page cache warm)", t))
        pairs = list(named.items())
        t = med(timed(lambda: engine.update_weights_from_tensor(pairs), rounds))
        rows.append(("colocated refit, in-process tensors", t))

        def shm() -> None:
            with ColocatedBuckets(pairs, "rlr-bench", 512 << 20) as buckets:
                engine.update_weights_from_tensor(buckets.handles, load_format="flattened_bucket")

        t = med(timed(shm, rounds))
        rows.append(("colocated refit, shared-memory buckets (incl. packing)", t))

    lines = [
        f"Default model: {len(named)} tensors, {nbytes / 1e6:.0f} MB fp32; engine tp_size=1 on "
        f"CPU; sender in a spawned process over gloo (loopback). Median of {args.iters} after "
        "one warm-up.",
        "",
        "| path | seconds | GB/s | vs raw broadcast |",
        "|---|---:|---:|---:|",
    ]
    for name, t in rows:
        lines.append(f"| {name} | {t:.3f} | {gb / t:.2f} | {raw / t:.2f}x |")
    write_section("Refit (weight sync)", "\n".join(lines))


if __name__ == "__main__":
    main()
