"""Whether integer (W8A16 / W8A8) matmuls could beat fp32 FMAs on this CPU: the per-core issue
rate of each inner-loop instruction chain, side by side in one run.

An int8 GEMM only pays off at batch 32+ (compute-bound) if its multiply-adds issue faster than
fp32 FMAs. This times register-only chains (``benchmarks/csrc/isa_peak.c``, six-plus independent
accumulators so latency is hidden) and reports multiply-adds per second and the ratio to fp32:

- fp32: ``vfmadd231ps`` (8 MACs);
- W8A16: ``vpmaddwd`` + ``vpaddd`` (16 MACs; int16 activations, int8 weights widened);
- W8A8 exact: ``vpmaddubsw`` + ``vpmaddwd`` by ones + ``vpaddd`` (32 MACs);
- W8A8 7-bit: two ``vpmaddubsw`` summed in int16 before widening (64 MACs; only correct when
  operands are limited to 7 bits so that four products fit in int16).

x86-64 with AVX2 and FMA only. ``python benchmarks/bench_isa_peak.py [--seconds 0.5]``
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import write_section  # noqa: E402

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "isa_peak.c")
# (kind passed to the C function, name, multiply-adds per loop iteration)
CHAINS = (
    (0, "fp32 `vfmadd231ps`", 12 * 8),
    (1, "W8A16 `vpmaddwd`+`vpaddd`", 6 * 16),
    (2, "W8A8 exact `vpmaddubsw`+`vpmaddwd`+`vpaddd`", 6 * 32),
    (3, "W8A8 7-bit operands (two `vpmaddubsw` per widening)", 6 * 64),
)


def build(directory: str) -> ctypes.CDLL:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("no C compiler (cc/gcc) on PATH")
    target = os.path.join(directory, "isa_peak.so")
    flags = ["-O2", "-mavx2", "-mfma", "-shared", "-fPIC"]
    subprocess.run([compiler, *flags, SOURCE, "-o", target], check=True)
    lib = ctypes.CDLL(target)
    lib.isa_peak_seconds.restype = ctypes.c_double
    lib.isa_peak_seconds.argtypes = [ctypes.c_int, ctypes.c_long]
    return lib


def rate(lib: ctypes.CDLL, kind: int, macs: int, seconds: float) -> float:
    """Best of three timed runs of about ``seconds`` each, in multiply-adds per second."""
    iters = 1_000_000
    while lib.isa_peak_seconds(kind, iters) < seconds / 4:
        iters *= 2
    iters *= 4
    return max(iters * macs / lib.isa_peak_seconds(kind, iters) for _ in range(3))


def cpu_model() -> str:
    """Model name, family and model number (the micro-architecture) from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return (
        f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, "
        f"model {fields.get('model', '?')})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    model = cpu_model()
    with tempfile.TemporaryDirectory() as directory:
        lib = build(directory)
        rates = {name: rate(lib, kind, macs, args.seconds) for kind, name, macs in CHAINS}
    base = rates[CHAINS[0][1]]
    rows = ["| chain | GMAC/s per core | vs fp32 |", "|---|---|---|"]
    rows += [f"| {name} | {r / 1e9:.1f} | {r / base:.2f}x |" for name, r in rates.items()]
    body = (
        f"CPU: {model}. One thread, register operands only (no memory traffic): the issue-rate "
        "ceiling of each GEMM inner loop, best of three runs.\n\n" + "\n".join(rows)
    )
    write_section("Integer vs fp32 multiply-add issue rate (issue 15)", body)


if __name__ == "__main__":
    main()
