"""Release/resume and sleep-on-idle on the default model (SmolLM2-135M fp32), measured as the
resident memory of a fresh process: release gives back >= 90% of what the engine holds, resume
takes it back, outputs after a wake equal those before, and the wake latency is reported.

"What the engine holds" is the RSS after creating it minus the RSS just before, in a process
that already imported the code the engine runs (torch, engine_core, kernels/triton, the
tokenizer classes): code pages are not memory an engine can release.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import gc, json, sys, time
from engine_core import Engine
from engine_core.default_model import ensure_default_model
from engine_core.control.rank_memory import process_tree_rss
from engine_core.tokenizer import load_tokenizer

MB = 1 << 20
cold = process_tree_rss()
path = ensure_default_model()
import kernels  # noqa: F401  (imports triton, as the engine does)
from kernels import cpu_attention
cpu_attention.available()
del_me = load_tokenizer(path); del del_me; gc.collect()
r = {"cold_mb": cold / MB, "base_mb": process_tree_rss() / MB}
G = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
P = ["The capital of France is", "def fibonacci(n):"]
with Engine(path, device="cpu", sleep_on_idle_s=2.0, sleep_on_idle_weights=True) as e:
    before = e.generate(P, G)
    r["loaded_mb"] = process_tree_rss() / MB
    r["release"] = e.release_memory_occupation()
    r["released_mb"] = process_tree_rss() / MB
    r["resume"] = e.resume_memory_occupation()
    r["resumed_mb"] = process_tree_rss() / MB
    t = time.perf_counter()
    after = e.generate(P, G)
    r["awake_request_s"] = time.perf_counter() - t
    r["same_after_resume"] = [o["output_ids"] for o in after] == [o["output_ids"] for o in before]
    deadline = time.monotonic() + 30.0  # idle 2 s, then the release itself (~1 s, more when slow)
    while not e.get_server_info()["memory"]["asleep_on_idle"] and time.monotonic() < deadline:
        time.sleep(0.1)
    r["asleep"] = e.get_server_info()["memory"]["asleep_on_idle"]
    r["asleep_mb"] = process_tree_rss() / MB
    t = time.perf_counter()
    woken = e.generate(P, G)
    r["woken_request_s"] = time.perf_counter() - t
    r["same_after_wake"] = [o["text"] for o in woken] == [o["text"] for o in before]
    r["memory"] = e.get_server_info()["memory"]
    r["texts"] = [o["text"] for o in before]
print("RESULT " + json.dumps(r))
"""


@pytest.mark.slow
def test_default_model_release_returns_memory_and_wakes_to_same_outputs():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=280,
        env=dict(os.environ, PYTHONPATH=root),
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT ") :])
    print(json.dumps(r, indent=1))  # the numbers, for the log (-s)
    held = r["loaded_mb"] - r["base_mb"]
    assert held > 900  # ~538 MB of weights + 512 MB of KV cache
    assert r["loaded_mb"] - r["released_mb"] >= 0.9 * held
    assert r["resumed_mb"] - r["released_mb"] >= 0.9 * held
    assert r["release"]["freed_bytes"]["weights"] > 500 << 20
    assert r["same_after_resume"] and r["same_after_wake"]
    assert r["asleep"] and r["loaded_mb"] - r["asleep_mb"] >= 0.9 * held
    memory = r["memory"]
    assert memory["num_idle_sleeps"] == 1 and memory["num_wakes"] == 1
    assert 0 < memory["last_wake_latency_s"] < r["woken_request_s"]
