"""Side-by-side peers for benchmarks: vLLM-CPU in its own virtualenv, run as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VLLM_VENV = os.path.expanduser("~/.cache/rl-rollout-peers/vllm-cpu")


def vllm_python(venv: str | None = None) -> str | None:
    """The vLLM-CPU venv's python, or None (then the caller prints how to get it)."""
    path = os.path.join(venv or DEFAULT_VLLM_VENV, "bin", "python")
    return path if os.access(path, os.X_OK) else None


def run_vllm(python: str, job: dict, threads: int, timeout_s: float = 3600) -> dict:
    """Run ``_vllm_peer.py`` with ``job`` on ``threads`` cores; returns its JSON result."""
    venv = os.path.dirname(os.path.dirname(python))
    env = dict(
        os.environ,
        VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CPU_KVCACHE_SPACE=str(job.get("kv_gib", 2)),
    )
    iomp = os.path.join(venv, "lib", "libiomp5.so")
    if os.path.exists(iomp):
        env["LD_PRELOAD"] = iomp
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [python, os.path.join(HERE, "_vllm_peer.py")],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM peer failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])
