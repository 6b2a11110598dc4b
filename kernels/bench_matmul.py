"""Cost of the batch-invariant torch linear vs ``F.linear`` (CPU).

Run: ``python -m kernels.bench_matmul [K N] [--threads 2]``.  For M in (1, 8, 32, 128) and tile
sizes 8/16/32 it prints microseconds per call (best of 5 medians of 60 calls, to be robust to other
load on a shared machine); the numbers are quoted in ``kernels/matmul.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from .matmul import linear_ref


def _median_us(fn, n: int, repeats: int = 5) -> float:
    """Best of ``repeats`` medians of ``n`` calls (robust to other load on a shared machine)."""
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best = min(best, statistics.median(times))
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("k", type=int, nargs="?", default=576)
    ap.add_argument("n", type=int, nargs="?", default=1536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    w = (torch.randn(args.n, args.k) * 0.05).to(dtype)
    tiles = (8, 16, 32)
    print(f"K={args.k} N={args.n} {args.dtype} threads={args.threads} (best median, us)")
    print("M".rjust(5), "F.linear".rjust(10), *(f"tile{t}".rjust(8) for t in tiles))
    for m in (1, 8, 32, 128):
        x = torch.randn(m, args.k).to(dtype)
        row = [_median_us(lambda x=x: F.linear(x, w), args.iters)]
        row += [_median_us(lambda t=t, x=x: linear_ref(x, w, tile_m=t), args.iters) for t in tiles]
        print(
            str(m).rjust(5), *(f"{v:10.0f}" if i == 0 else f"{v:8.0f}" for i, v in enumerate(row))
        )


if __name__ == "__main__":
    main()
