"""Refit cost on the default model (538 MB fp32), all measured in this one run (issue 5):

- raw: one ``torch.distributed`` (gloo) broadcast of a flat buffer of the model's size from a
  spawned process to this one -- the wire's ceiling;
- distributed refit: a trainer stand-in (an HF model in a spawned process) pushes its
  parameters with ``WeightSender`` into a live engine here
  (``Engine.update_weights_from_distributed``: receive into staging, validate, commit,
  version switch). Either as separate tensors (packed into buckets while earlier buckets are
  on the wire) or kept in flat buffers (``weight_sync.flatten_parameters``: nothing to pack);
- disk refit (``update_weights_from_disk``, page cache warm) and colocated refits
  (``update_weights_from_tensor`` with in-process tensors, and with shared-memory buckets
  including the trainer's packing).

Raw and refit rounds alternate over the same sender process (one group each), so every refit
round has a raw round taken right before it; the ratio is the median of those paired ratios,
which cancels most of the noise of a shared 2-core VM. Timings are taken on the receiving side
from the "go" sent to the sender to the end of the call, so packing is included. The first
``WARMUP`` rounds are dropped (first-touch page faults of fresh buffers; the engine's staging
arena fills its two buffers in the first two refits), and one whole configuration is run and
discarded first (the first one measured in a fresh process ran ~10% slower, raw included).

    python benchmarks/bench_refit.py [--iters 7] [--bucket-mb 64 512]
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
    SegmentPool,
    create_group,
    free_port,
)
from weight_sync.checksum import tensor_checksum  # noqa: E402

GROUP = "bench-refit"
WARMUP = 2  # rounds dropped before the median


def _load(model_path: str) -> dict[str, torch.Tensor]:
    """The model's tensors in anonymous memory, as a trainer holds them (``load_file`` may
    leave them backed by the file mapping)."""
    from safetensors.torch import load_file

    return {
        k: v.clone() for k, v in load_file(os.path.join(model_path, "model.safetensors")).items()
    }


def _trainer_tensors(model_path: str, flat: bool) -> list[tuple[str, torch.Tensor]]:
    """What a trainer pushes: its HF module's tensors in state-dict order (tied LM head sent
    once). ``flat``: the module's parameters were moved into one flat buffer per dtype first
    (``weight_sync.flatten_parameters``), so buckets go out without packing."""
    from transformers import AutoModelForCausalLM

    from weight_sync import flatten_parameters, named_tensors_of

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if flat:
        flatten_parameters(model)
    return named_tensors_of(model)


def _sender(conn, ports: tuple[int, int], mode: str, path: str, bucket_bytes: int, rounds: int):
    """Rank 0 of a raw group and a refit group: per round, a raw broadcast then an update."""
    from weight_sync import WeightSender

    # One intra-op thread: packing runs beside gloo's I/O threads on a 2-core machine.
    torch.set_num_threads(1)
    named = _trainer_tensors(path, mode == "flat")
    raw_buffer = torch.full((sum(t.nbytes for _, t in named),), 7, dtype=torch.uint8)
    raw = create_group("127.0.0.1", ports[0], 0, 2, "bench-raw", "gloo", timeout_s=300)
    refit = create_group("127.0.0.1", ports[1], 0, 2, GROUP, "gloo", timeout_s=300)
    sender = WeightSender(refit, bucket_bytes=bucket_bytes)
    try:
        for k in range(rounds):
            conn.recv()
            raw.broadcast(raw_buffer, 0)
            plan = sender.plan(named, f"bench-{k}")
            conn.send(plan.to_json())
            conn.recv()
            sender.send(named, plan)
        conn.send(("ok", None))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
    finally:
        sender.close()
        raw.destroy()
        refit.destroy()


def time_paired(engine: Engine, path: str, mode: str, bucket_bytes: int, rounds: int):
    """``(raw seconds, refit seconds)`` per round, alternating over one sender process."""
    ctx = mp.get_context("spawn")
    ports = (free_port(), free_port())
    conn, child = ctx.Pipe()
    args = (child, ports, mode, path, bucket_bytes, rounds)
    proc = ctx.Process(target=_sender, args=args, daemon=True)
    proc.start()
    child.close()
    raw = create_group("127.0.0.1", ports[0], 1, 2, "bench-raw", "gloo", timeout_s=300)
    engine.init_weights_update_group("127.0.0.1", ports[1], 1, 2, GROUP, timeout_s=300)
    nbytes = sum(t.nbytes for t in _load(path).values())
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    pairs = []
    for _ in range(rounds):
        started = time.perf_counter()
        conn.send("go")
        raw.broadcast(buffer, 0)
        raw_s = time.perf_counter() - started
        plan = conn.recv()
        started = time.perf_counter()
        conn.send("go")
        engine.update_weights_from_distributed(plan, group_name=GROUP)
        pairs.append((raw_s, time.perf_counter() - started))
    assert int(buffer[-1]) == 7
    engine.destroy_weights_update_group(GROUP)
    raw.destroy()
    status = conn.recv()
    proc.join(60)
    assert status[0] == "ok", status
    return pairs[WARMUP:]


def timed(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def med(times: list[float]) -> float:
    return statistics.median(times[WARMUP:] if len(times) > WARMUP else times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[64, 512])
    args = parser.parse_args()
    rounds = args.iters + WARMUP
    path = ensure_default_model()
    named = _load(path)
    nbytes = sum(t.nbytes for t in named.values())
    gb = nbytes / 1e9
    rows, raws = [], []
    with Engine(path, device="cpu", max_total_tokens=1024, skip_tokenizer_init=True) as engine:
        # Discarded: the first configuration measured in a fresh process ran ~10% slower on
        # both sides of the pairing (raw too), whichever it was.
        time_paired(engine, path, "flat", 64 << 20, WARMUP + 2)
        for mode, what in (("flat", "flat parameter buffers"), ("packed", "separate tensors")):
            for mb in args.bucket_mb:
                pairs = time_paired(engine, path, mode, mb << 20, rounds)
                raws += [r for r, _ in pairs]
                ratio = statistics.median(r / t for r, t in pairs)
                t = statistics.median(t for _, t in pairs)
                name = f"**distributed refit**, trainer {what}, {mb} MB buckets"
                rows.append((name, t, statistics.median(r for r, _ in pairs), ratio))
        probe = "model.layers.29.mlp.down_proj.weight"
        assert engine.get_weights_checksum([probe])[probe] == tensor_checksum(named[probe])
        raw = statistics.median(raws)
        local = [
            (
                "disk refit (safetensors, page cache warm)",
                lambda: engine.update_weights_from_disk(path),
            )
        ]
        pairs_ = list(named.items())
        local.append(
            (
                "colocated refit, in-process tensors",
                lambda: engine.update_weights_from_tensor(pairs_),
            )
        )

        def shm() -> None:
            with ColocatedBuckets(pairs_, "rlr-bench", 512 << 20) as buckets:
                engine.update_weights_from_tensor(buckets.handles, load_format="flattened_bucket")

        local.append(("colocated refit, shared-memory buckets (incl. packing)", shm))
        pool = SegmentPool()

        def shm_pooled() -> None:
            with ColocatedBuckets(pairs_, "rlr-bench", 512 << 20, pool=pool) as buckets:
                engine.update_weights_from_tensor(buckets.handles, load_format="flattened_bucket")

        local.append(("colocated refit, shared-memory buckets reused (`SegmentPool`)", shm_pooled))
        for name, fn in local:
            t = med(timed(fn, rounds))
            rows.append((name, t, raw, raw / t))
        pool.close()

    lines = [
        f"Default model: {len(named)} tensors, {nbytes / 1e6:.0f} MB fp32; engine tp_size=1 on "
        "CPU; trainer stand-in in a spawned process over gloo (loopback). Distributed rows: "
        f"median of {args.iters} rounds after {WARMUP} warm-ups, each paired with a raw "
        "broadcast of the same bytes taken just before it (ratio = median of the paired "
        f"ratios). Local rows: median of {args.iters}, against the median raw broadcast of "
        f"the run ({raw:.3f} s = {gb / raw:.2f} GB/s).",
        "",
        "| path | seconds | GB/s | raw broadcast (s) | vs raw broadcast |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t, r, ratio in rows:
        lines.append(f"| {name} | {t:.3f} | {gb / t:.2f} | {r:.3f} | {ratio:.2f}x |")
    write_section("Refit (weight sync)", "\n".join(lines))


if __name__ == "__main__":
    main()
