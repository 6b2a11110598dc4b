"""``rollout generate`` / ``rollout serve`` from a YAML in configs/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import ray

from rollout import cli

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
LOCAL_YAML = os.path.join(ROOT, "configs", "local.yaml")
SMALL = ["--set", "num_engines=1", "--set", "cpus_per_rank=0.5", "--set", "engine={device: cpu}"]
PARAMS = '{"n": 2, "max_new_tokens": 4, "temperature": 0, "ignore_eos": true}'


def _prompts(tmp_path) -> str:
    path = tmp_path / "prompts.jsonl"
    rows = [
        "hello world",
        {"prompt": "the quick brown fox"},
        {"prompt": "the end", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _check_output(text: str) -> None:
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert [(r["index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert [r["meta_info"]["completion_tokens"] for r in rows] == [4, 4, 4, 4, 3]


def test_generate_writes_one_line_per_sample(ray_local, tiny_model, tmp_path):
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--config", LOCAL_YAML, "--model-path", tiny_model, *SMALL]
    argv += ["--prompts", _prompts(tmp_path), "--output", str(out), "--sampling-params", PARAMS]
    assert cli.main(argv) == 0
    _check_output(out.read_text())


def test_serve_until_stopped(ray_local, tiny_model):
    argv = ["serve", "--config", LOCAL_YAML, "--model-path", tiny_model, *SMALL]
    args = cli.build_parser().parse_args([*argv, "--set", "name=cli-serve-test", "--port", "0"])
    stop = threading.Event()
    server = threading.Thread(target=cli.cmd_serve, args=(args, stop), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 120
        while True:  # the driver is a named actor another Ray job can look up
            try:
                driver = ray.get_actor("cli-serve-test", namespace="rollout")
                out = ray.get(
                    driver.generate.remote(
                        input_ids=[1, 2, 3],
                        sampling_params={"max_new_tokens": 2, "ignore_eos": True},
                    )
                )
                break
            except ValueError:
                assert time.monotonic() < deadline and server.is_alive()
                time.sleep(0.2)
        assert out["meta_info"]["completion_tokens"] == 2
    finally:
        stop.set()
        server.join(timeout=60)
    assert not server.is_alive()
    with pytest.raises(ValueError):
        ray.get_actor("cli-serve-test", namespace="rollout")


def test_bad_prompts_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"input_ids": [1, 2]}\n')
    with pytest.raises(ValueError, match="mixes 'prompt' and 'input_ids'"):
        cli.read_prompts(str(path))
    path.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: need a string or an object"):
        cli.read_prompts(str(path))


@pytest.mark.slow
def test_generate_subprocess_starts_its_own_quiet_loopback_ray(tiny_model, tmp_path):
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--config", LOCAL_YAML, "--model-path", tiny_model, *SMALL]
    argv += ["--prompts", _prompts(tmp_path), "--output", str(out), "--sampling-params", PARAMS]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "rollout", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_output(out.read_text())
    assert "5 samples" in proc.stderr
    assert "dashboard" not in proc.stderr.lower() and "usage stats" not in proc.stderr.lower()
