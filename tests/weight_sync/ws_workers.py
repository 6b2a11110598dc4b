"""Helpers for the weight_sync tests: deterministic tensors and a tiny spawn-based world.

Lives in its own module (not a test file) so spawned children can import the worker functions.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SPECS: list[tuple[str, tuple[int, ...], torch.dtype]] = [
    ("model.embed_tokens.weight", (96, 32), torch.float32),
    ("model.layers.0.self_attn.q_proj.weight", (32, 32), torch.bfloat16),
    ("model.layers.0.input_layernorm.weight", (32,), torch.float16),
    ("model.layers.0.mlp.up_proj.weight", (64, 32), torch.bfloat16),
    ("model.step", (), torch.int64),
    ("model.empty", (0, 4), torch.float32),
    ("model.layers.0.mlp.down_proj.weight", (32, 64), torch.float32),
    ("model.token_ids", (7,), torch.int64),
    ("model.scalar_half", (), torch.float16),
    ("lm_head.weight", (96, 32), torch.bfloat16),
]


def make_named(seed: int, specs=SPECS) -> dict[str, torch.Tensor]:
    """Deterministic mixed-dtype tensors (same seed -> bitwise identical in any process)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape, dtype in specs:
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=gen).to(dtype)
        else:
            out[name] = torch.randint(-(2**40), 2**40, shape, generator=gen, dtype=dtype)
    return out


def big_named(seed: int, n: int, numel: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer.{i}.weight": torch.randn(numel, generator=gen) for i in range(n)}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def mismatches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """Names missing, extra or not bitwise equal (empty list = perfect match)."""
    bad = sorted(set(got) ^ set(want))
    bad += [n for n in want if n in got and not bitwise_equal(got[n], want[n])]
    return bad


class Collector:
    """A load_fn that copies every received tensor (as an engine would) and counts calls."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.calls = 0

    def __call__(self, pairs) -> None:
        self.calls += 1
        for name, tensor in pairs:
            if name in self.tensors:
                raise AssertionError(f"{name} delivered twice")
            self.tensors[name] = tensor.clone()


def post(workdir: str, key: str, text: str) -> None:
    """Stand-in for the one RPC that carries the plan: an atomically written file."""
    tmp = Path(workdir) / f".{key}.tmp"
    tmp.write_text(text)
    os.replace(tmp, Path(workdir) / key)


def fetch(workdir: str, key: str, timeout_s: float = 30.0) -> str:
    path = Path(workdir) / key
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key} never posted")
        time.sleep(0.01)
    return path.read_text()


def entry(fn: Callable[..., Any], rank: int, workdir: str, args: tuple) -> None:
    result: dict[str, Any]
    try:
        result = {"ok": True, "data": fn(rank, workdir, *args)}
    except BaseException as exc:  # reported to the test process
        result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        result["traceback"] = traceback.format_exc()
    post(workdir, f"result-{rank}.json", json.dumps(result))


def run_world(
    fn: Callable[..., Any], world_size: int, workdir: Path, args: tuple = (), timeout_s=60.0
) -> list[dict[str, Any]]:
    """Run ``fn(rank, workdir, *args)`` in ``world_size`` spawned processes; return results."""
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=entry, args=(fn, rank, str(workdir), args), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    return join_world(procs, workdir, timeout_s)


def join_world(procs: list, workdir: Path, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not hung, f"ranks {hung} hung for more than {timeout_s}s"
    results = []
    for rank in range(len(procs)):
        path = Path(workdir) / f"result-{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {"ok": None})
    return results
