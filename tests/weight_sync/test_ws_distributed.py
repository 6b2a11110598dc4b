"""Multi-process gloo tests: sender -> receivers over standalone groups (CPU, spawn)."""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from pathlib import Path

import torch
from ws_workers import (
    Collector,
    big_named,
    entry,
    fetch,
    join_world,
    make_named,
    mismatches,
    post,
    run_world,
)

from weight_sync import (
    DEFAULT_BUCKET_BYTES,
    UpdatePlan,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
    WeightSyncTimeout,
    create_group,
    free_port,
    metas_of,
    plan_buckets,
    push_distributed,
    receive,
)


def _three_rank_world(rank: int, workdir: str, port: int, aux_port: int) -> dict:
    """Rank 0 sends four updates; ranks 1-2 receive. Exercises abort, drain and a 2nd group."""
    main = create_group("127.0.0.1", port, rank, 3, "ws-test-main", "gloo", timeout_s=30)
    aux = create_group("127.0.0.1", aux_port, rank, 3, "ws-test-aux", "gloo", timeout_s=30)
    out: dict = {}
    with main, aux:
        if rank == 0:
            sender = WeightSender(main, bucket_bytes=4096)  # several buckets per dtype
            for version in (1, 2, 3, 4):
                named = make_named(seed=version)
                if version == 2:  # a bad tensor: wrong shape for a name in the plan
                    plan = sender.plan(named, version)
                    post(workdir, f"plan-{version}", plan.to_json())
                    named["model.token_ids"] = torch.zeros(8, dtype=torch.int64)
                    try:
                        sender.send(named, plan)
                    except ValueError as exc:
                        out["v2_sender_error"] = str(exc)
                    continue
                if version == 4:
                    push_distributed(
                        sender, named, lambda p: post(workdir, "plan-4", p.to_json()), version
                    )
                    continue
                plan = sender.plan(named, version)
                post(workdir, f"plan-{version}", plan.to_json())
                out[f"v{version}_buckets"] = sender.send(named, plan).num_buckets
            aux.broadcast(torch.arange(5, dtype=torch.float64), src=0)
            sender.close()
            return out
        # Rank 1 reuses its buffers across updates; rank 2 uses the one-shot function.
        reusable = WeightReceiver(main)
        for version in (1, 2, 3, 4):
            plan = UpdatePlan.from_json(fetch(workdir, f"plan-{version}"))
            collector = Collector()
            load_fn = collector
            if version == 3 and rank == 2:
                load_fn = _failing_loader(collector, fail_at_call=2)
            try:
                if rank == 1:
                    reusable.receive(plan, load_fn)
                else:
                    receive(main, plan, load_fn)
                out[f"v{version}_bad"] = mismatches(collector.tensors, make_named(seed=version))
                out[f"v{version}_calls"] = collector.calls
            except Exception as exc:  # reported
                out[f"v{version}_error"] = f"{type(exc).__name__}: {exc}"
        got = torch.zeros(5, dtype=torch.float64)
        aux.broadcast(got, src=0)
        out["aux"] = got.tolist()
    return out


def _failing_loader(collector: Collector, fail_at_call: int):
    def load_fn(pairs) -> None:
        if collector.calls + 1 == fail_at_call:
            raise RuntimeError("engine rejected the weights")
        collector(pairs)

    return load_fn


def test_three_process_broadcast_abort_drain_and_second_group(tmp_path: Path) -> None:
    ports = (free_port(), free_port())
    results = run_world_checked(_three_rank_world, 3, tmp_path, ports)
    sender, r1, r2 = (r["data"] for r in results)
    assert sender["v1_buckets"] >= 6 and sender["v3_buckets"] == sender["v1_buckets"]
    assert sender["v2_sender_error"] == "model.token_ids: shape (8,) does not match plan (7,)"
    for rx in (r1, r2):
        assert rx["v1_bad"] == [] and rx["v1_calls"] == sender["v1_buckets"]
        assert rx["v2_error"].startswith("WeightSyncError") and "aborted" in rx["v2_error"]
        assert rx["v4_bad"] == [] and rx["v4_calls"] == sender["v1_buckets"]
        assert rx["aux"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert r1["v3_bad"] == []
    assert r2["v3_error"] == "RuntimeError: engine rejected the weights"


def run_world_checked(fn, world_size: int, workdir: Path, args: tuple) -> list[dict]:
    results = run_world(fn, world_size, workdir, args, timeout_s=60)
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed[0].get("traceback", failed)
    return results


def _named_with_big(seed: int) -> dict[str, torch.Tensor]:
    named = make_named(seed=seed)
    named.update(big_named(seed=seed + 100, n=2, numel=300_000))  # 1.2 MB > bucket: alone
    return named


def _two_rank_world(rank: int, workdir: str, port: int, short_port: int, third_port: int) -> dict:
    """Four updates (load_fn, owned iterator, abandoned iterator, load_fn) with a reused
    receiver; then, on two more groups with short timeouts, a plan mismatch and a sender that
    never sends."""
    group = create_group("127.0.0.1", port, rank, 2, "ws-test-a", "gloo", timeout_s=30)
    short = create_group("127.0.0.1", short_port, rank, 2, "ws-test-b", "gloo", timeout_s=2)
    third = create_group("127.0.0.1", third_port, rank, 2, "ws-test-c", "gloo", timeout_s=2)
    out: dict = {}
    with group, short, third:
        if rank == 0:
            sender = WeightSender(group, bucket_bytes=1 << 20)
            for step in range(4):
                named = _named_with_big(seed=step)
                plan = sender.plan(named, weight_version=f"step-{step}")
                post(workdir, f"plan-{step}", plan.to_json())
                out[f"buckets-{step}"] = sender.send(named, plan).num_buckets
            short.broadcast(torch.ones(3), src=0)
            named = _named_with_big(seed=0)
            try:  # the receiver holds another plan: it refuses the stream, we time out
                WeightSender(third).send(named, WeightSender(third).plan(named, "mine"))
            except WeightSyncError as exc:
                out["mismatch"] = f"{type(exc).__name__}: {exc}"
            group.barrier()  # keep `short` alive until the receiver has timed out on it
            return out
        receiver = WeightReceiver(group)

        def plan(step: int) -> UpdatePlan:  # the sender posts plan k after sending update k-1
            return UpdatePlan.from_json(fetch(workdir, f"plan-{step}"))

        collector = Collector()
        receiver.receive(plan(0), collector)
        out["bad-0"] = mismatches(collector.tensors, _named_with_big(seed=0))
        # Holding every tensor until the end is safe with the owned iterator.
        out["bad-1"] = mismatches(dict(receiver.iter_pairs(plan(1))), _named_with_big(seed=1))
        abandoned = receiver.iter_pairs(plan(2))
        out["first-2"] = next(abandoned)[0]
        abandoned.close()  # drains the rest of update 2
        collector = Collector()
        receiver.receive(plan(3), collector)
        out["bad-3"] = mismatches(collector.tensors, _named_with_big(seed=3))
        out["version-3"] = plan(3).weight_version
        got = torch.zeros(3)
        short.broadcast(got, src=0)
        out["short"] = got.tolist()
        try:
            named = _named_with_big(seed=0)
            buckets = plan_buckets(metas_of(named.items()), DEFAULT_BUCKET_BYTES)
            receive(third, UpdatePlan(tuple(buckets), "theirs"), Collector())
        except WeightSyncError as exc:
            out["mismatch"] = str(exc)
        start = time.monotonic()
        try:
            receive(short, plan(0), Collector())  # the sender never sends this update
        except WeightSyncTimeout as exc:
            out["timeout"] = str(exc)
        out["waited"] = time.monotonic() - start
        group.barrier()
    return out


def test_two_process_reused_receiver_iterators_and_timeout(tmp_path: Path) -> None:
    ports = (free_port(), free_port(), free_port())
    results = run_world_checked(_two_rank_world, 2, tmp_path, ports)
    sender, rx = results[0]["data"], results[1]["data"]
    assert all(sender[f"buckets-{step}"] >= 5 for step in range(4))
    assert rx["bad-0"] == [] and rx["bad-1"] == [] and rx["bad-3"] == []
    assert rx["first-2"] == "model.embed_tokens.weight" and rx["version-3"] == "step-3"
    assert rx["short"] == [1.0, 1.0, 1.0]
    assert "ws-test-b" in rx["timeout"] and "header 0/" in rx["timeout"]
    # the 2 s timeout was honoured (not a speed claim: the upper bound only catches a hang)
    assert rx["waited"] >= 1.5 and rx["waited"] < 120
    assert "does not match the plan at bucket 0" in rx["mismatch"] and "ws-test-c" in rx["mismatch"]
    assert sender["mismatch"].startswith("WeightSyncTimeout") and "ws-test-c" in sender["mismatch"]


KILL_TIMEOUT_S = 3.0


def _kill_world(rank: int, workdir: str, port: int) -> dict:
    group = create_group("127.0.0.1", port, rank, 2, "ws-test-kill", timeout_s=KILL_TIMEOUT_S)
    if rank == 0:
        # 8 buckets of 16 MB: more than the socket buffers can hold, so the sender cannot
        # finish while the receiver sits in its first load_fn call.
        named = {f"layer.{i}.weight": torch.full((4 << 20,), float(i)) for i in range(8)}
        sender = WeightSender(group, bucket_bytes=16 << 20)
        plan = sender.plan(named, weight_version=1)
        post(workdir, "plan", plan.to_json())
        sender.send(named, plan)
        return {"finished": True}  # must not happen: the test kills this process

    def slow_loader(pairs) -> None:
        if not (Path(workdir) / "first-bucket").exists():
            post(workdir, "first-bucket", "")
            time.sleep(1.0)  # the test kills the sender meanwhile

    plan = UpdatePlan.from_json(fetch(workdir, "plan"))
    try:
        receive(group, plan, slow_loader)
    except WeightSyncError as exc:
        killed_at = float(fetch(workdir, "killed-at"))
        return {"error": f"{type(exc).__name__}: {exc}", "after_kill": time.time() - killed_at}
    finally:
        group.destroy()
    return {"error": None}


def test_sender_killed_mid_send_raises_within_timeout(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=entry, args=(_kill_world, r, str(tmp_path), (port,)), daemon=True)
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        fetch(str(tmp_path), "first-bucket", timeout_s=60)
    finally:
        procs[0].kill()  # SIGKILL the sender mid-update (also cleans up if it never got there)
        post(str(tmp_path), "killed-at", repr(time.time()))
    results = join_world(procs, tmp_path, timeout_s=30)
    assert procs[0].exitcode == -signal.SIGKILL and results[0] == {"ok": None}
    rx = results[1]
    assert rx["ok"], rx
    assert rx["data"]["error"].startswith("WeightSync"), rx["data"]
    assert "ws-test-kill" in rx["data"]["error"]
    assert rx["data"]["after_kill"] < KILL_TIMEOUT_S + 3
