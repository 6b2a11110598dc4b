"""``GRPOTrainer``: the trainer side of the demo's RL loop (a Ray actor: ``TrainerActor``).

It holds an ``engine_core.PolicyModel`` (the engine's layers and kernels, so its logprobs equal
the rollout's bit for bit) and its optimizer, takes one GRPO step on a batch of samples, and
pushes its weights to the engines: through shared memory when colocated
(``update_weights_from_tensor``), over a weight-update group when disaggregated (``WeightSync``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import ray
import torch

from rollout.rl.grpo import policy_loss


def last_layers(num_layers: int, trainable_layers: int):
    """``trainable(name)`` for the last ``trainable_layers`` decoder layers and the final norm
    (the rest stays frozen: a step's backward then stops early, which keeps the demo fast)."""
    first = max(0, num_layers - trainable_layers)
    keep = tuple(f"model.layers.{i}." for i in range(first, num_layers))
    return lambda name: name.startswith(keep) or name == "model.norm.weight"


class GRPOTrainer:
    """One trainer process. ``threads`` must equal the engines' torch thread count: the
    deterministic matmul's start-up proof, and so the bits, are per thread count."""

    def __init__(
        self,
        model_path: str,
        trainable_layers: int = 2,
        lr: float = 2e-5,
        threads: int | None = None,
        seed: int = 0,
        max_grad_norm: float = 1.0,
    ) -> None:
        from engine_core import PolicyModel
        from engine_core.model_config import load_model_config

        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        layers = load_model_config(model_path).num_layers
        self.policy = PolicyModel.from_pretrained(
            model_path, deterministic=True, trainable=last_layers(layers, trainable_layers)
        )
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=lr, weight_decay=0.0)
        self.max_grad_norm = max_grad_norm
        self._segments = None  # weight_sync.SegmentPool of colocated refits (kept: reused)
        self._prefix = f"rlr-trainer-{uuid.uuid4().hex[:10]}"
        self._sync: Any = None  # rollout.weight_sync_actor.WeightSync of disaggregated refits

    def info(self) -> dict[str, Any]:
        return {
            "threads": torch.get_num_threads(),
            "trainable_parameters": sum(p.numel() for p in self.trainable),
            "parameters": sum(p.numel() for p in self.policy.parameters()),
            "matmul": self.policy.matmul,
        }

    def train_step(
        self,
        sequences: Sequence[Sequence[int]],
        prompt_lens: Sequence[int],
        rollout_logprobs: Sequence[Sequence[float]],
        advantages: Sequence[float],
        temperature: float = 1.0,
    ) -> dict[str, float]:
        """Recompute the samples' logprobs, compare them with the rollout's, take one step."""
        from engine_core import logprob_diff

        started = time.perf_counter()
        logprobs = self.policy.token_logprobs(sequences, prompt_lens, temperature)
        diff = logprob_diff(rollout_logprobs, logprobs)
        loss = policy_loss(logprobs, rollout_logprobs, advantages)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        return {
            "loss": float(loss.detach()),
            "grad_norm": float(grad_norm),
            "logprob_diff": diff,
            "train_s": time.perf_counter() - started,
        }

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, p.detach()) for name, p in self.policy.named_parameters()]

    def push_colocated(self, engines: list[Any], weight_version: str) -> float:
        """Refit every engine through shared memory (no copy through Ray); returns seconds."""
        from weight_sync import DEFAULT_BUCKET_BYTES, SegmentPool, push_colocated

        started = time.perf_counter()
        if self._segments is None:
            self._segments = SegmentPool()

        def apply(handles):
            refs = [
                e.update_weights_from_tensor.remote(
                    handles, load_format="flattened_bucket", weight_version=weight_version
                )
                for e in engines
            ]
            return ray.get(refs)

        push_colocated(
            self.named_tensors(),
            self._prefix,
            apply,
            DEFAULT_BUCKET_BYTES,
            weight_version,
            pool=self._segments,
        )
        return time.perf_counter() - started

    def push_distributed(self, engines: list[Any], driver: Any, weight_version: str) -> float:
        """Refit every engine over a gloo/NCCL group this process leads (all or none)."""
        from rollout.weight_sync_actor import WeightSync

        started = time.perf_counter()
        if self._sync is None:
            self._sync = WeightSync(engines, driver=driver)
        self._sync.update_weights(self.named_tensors(), weight_version)
        return time.perf_counter() - started

    def close(self) -> None:
        """Leave the weight-update group and unlink the shared segments."""
        if self._sync is not None:
            self._sync.close()
            self._sync = None
        if self._segments is not None:
            self._segments.close()
            self._segments = None


TrainerActor = ray.remote(GRPOTrainer)
