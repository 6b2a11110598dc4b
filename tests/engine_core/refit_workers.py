"""A trainer stand-in for the distributed refit tests: a spawned process that joins the
weight-update group as rank 0 and streams checkpoint tensors (or misbehaves on purpose).

Lives in its own module (not a test file) so spawned children can import it. The plan travels
through a file in ``workdir`` (the stand-in for the trainer's one RPC).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

GROUP = "refit-test"


@dataclass
class Step:
    """One update the sender performs. ``mode``: ``ok`` (bucket protocol), ``sglang`` (one
    plain broadcast per tensor), ``die`` (exit once the receivers wait inside bucket 1),
    ``silent`` (send nothing for ``sleep_s``). ``mutate``: ``(kind, name)`` with kind
    ``rename`` / ``reshape`` / ``dtype`` to corrupt one tensor."""

    model_path: str
    version: str
    mode: str = "ok"
    mutate: tuple[str, str] | None = None
    sleep_s: float = 0.0
    names: list[str] | None = field(default=None)  # a subset of the checkpoint's tensors


def tensors_for(step: Step) -> dict[str, torch.Tensor]:
    """The tensors a step sends (also computed by the tests, which need the same plan)."""
    named = load_file(os.path.join(step.model_path, "model.safetensors"))
    if step.names is not None:
        named = {n: named[n] for n in step.names}
    if step.mutate is not None:
        kind, name = step.mutate
        tensor = named.pop(name)
        if kind == "rename":
            named[name.replace("layers.1", "layers.7")] = tensor
        elif kind == "reshape":
            named[name] = tensor.reshape(-1)[: tensor.numel() - 1].clone()
        elif kind == "dtype":
            named[name] = tensor.to(torch.bfloat16)
        else:
            raise ValueError(kind)
    return named


def post(workdir: str, key: str, text: str) -> None:
    tmp = Path(workdir) / f".{key}.tmp"
    tmp.write_text(text)
    os.replace(tmp, Path(workdir) / key)


def fetch(workdir: str, key: str, timeout_s: float = 60.0) -> str:
    path = Path(workdir) / key
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key} never posted")
        time.sleep(0.01)
    return path.read_text()


def sender_main(
    workdir: str, port: int, world: int, steps: list[Step], bucket_bytes: int, timeout_s: float
) -> None:
    torch.set_num_threads(1)
    try:
        _send_all(workdir, port, world, steps, bucket_bytes, timeout_s)
        post(workdir, "sender-result", json.dumps({"ok": True}))
    except BaseException as exc:  # reported to the test
        post(workdir, "sender-result", json.dumps({"ok": False, "error": repr(exc)}))
        post(workdir, "sender-traceback", traceback.format_exc())


def _send_all(workdir, port, world, steps, bucket_bytes, timeout_s) -> None:
    from weight_sync import WeightSender, create_group
    from weight_sync.header import STATUS_OK, send_header

    group = create_group("127.0.0.1", port, 0, world, GROUP, "gloo", timeout_s=timeout_s)
    sender = WeightSender(group, bucket_bytes=bucket_bytes)
    try:
        for k, step in enumerate(steps):
            named = tensors_for(step)
            plan = sender.plan(named, step.version)
            post(workdir, f"plan-{k}", plan.to_json())
            if step.mode == "ok":
                sender.send(named, plan)
            elif step.mode == "sglang":
                for tensor in named.values():
                    group.broadcast(tensor.contiguous(), 0)
            elif step.mode == "silent":
                time.sleep(step.sleep_s)
            elif step.mode == "die":
                from weight_sync.bucket import as_bytes, pack

                fingerprint = plan.fingerprint()
                send_header(group, 0, plan, fingerprint, 0, STATUS_OK).wait()
                group.broadcast(as_bytes(pack(named, plan.buckets[0])), 0)
                send_header(group, 0, plan, fingerprint, 1, STATUS_OK).wait()
                time.sleep(0.5)  # the receivers are now waiting inside bucket 1
                os._exit(17)
            else:
                raise ValueError(step.mode)
    finally:
        sender.close()
        group.destroy()


class SenderProcess:
    """Owns the spawned sender; ``close`` joins it (killing it past ``join_s``)."""

    def __init__(self, workdir: Path, port: int, world: int, steps: list[Step], **kwargs):
        ctx = mp.get_context("spawn")
        args = (
            str(workdir),
            port,
            world,
            steps,
            kwargs.get("bucket_bytes", 32 << 10),
            kwargs.get("timeout_s", 60.0),
        )
        self.workdir = workdir
        self.proc = ctx.Process(target=sender_main, args=args, daemon=True)
        self.proc.start()

    def wait_listening(self, port: int, timeout_s: float = 60.0) -> None:
        """Block until the sender hosts its store on ``port``: a test that gives the rendezvous
        a short timeout (to test collective timeouts) must not race the child's start-up, which
        takes seconds on a loaded machine (spawn + import torch)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline or not self.proc.is_alive():
                    raise TimeoutError(f"sender never listened on port {port}") from None
                time.sleep(0.05)

    def plan(self, k: int) -> str:
        return fetch(str(self.workdir), f"plan-{k}")

    def close(self, join_s: float = 60.0) -> dict:
        self.proc.join(join_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        path = Path(self.workdir) / "sender-result"
        return json.loads(path.read_text()) if path.exists() else {"ok": None}
