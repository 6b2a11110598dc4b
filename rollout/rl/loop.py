"""``run_grpo``: GRPO on the rollout service, end to end (the README's main job).

Per step: the engines generate ``n`` samples per prompt through the driver (deterministic
mode, with logprobs) -> a verifiable reward (``rl.task``) -> group-normalized advantages ->
the engines release their memory (sleep) while the trainer actor recomputes the logprobs
(equal to the rollout's bit for bit), takes a policy-gradient step -> the engines wake with
empty weights, the trainer refits them all (colocated: shared memory; disaggregated: a gloo
group) and the next rollout runs on the new version.

Colocated: one placement-group bundle holds the engine and the trainer. Disaggregated: a
simulated two-node cluster (``ray.cluster_utils.Cluster``), engines on the node with the
``rollout_engine`` resource, the trainer on the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import ray

from rollout.rl.grpo import group_advantages
from rollout.rl.task import PICK_A_NUMBER, Prompt, Task


@dataclass(frozen=True)
class GRPOConfig:
    model_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    steps: int = 10
    prompts_per_step: int = 8
    n: int = 4
    max_new_tokens: int = 6
    temperature: float = 1.0
    lr: float = 2e-4
    trainable_layers: int = 2
    disaggregated: bool = False
    seed: int = 0
    threads: int = 2
    kv_cache_memory_bytes: int = 64 << 20
    plot_path: str | None = "grpo_demo.png"

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "n", "max_new_tokens", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid {name}={value!r}: must be a positive int")
        if self.n < 2:
            raise ValueError(f"invalid n={self.n}: GRPO needs at least 2 samples per prompt")
        if not 0 < self.temperature <= 2:
            raise ValueError(f"invalid temperature={self.temperature}: must be in (0, 2]")
        if not 0 < self.lr < 1:
            raise ValueError(f"invalid lr={self.lr}: must be in (0, 1)")


@dataclass
class StepRow:
    step: int
    reward: float
    rollout_tok_s: float
    refit_s: float
    sleep_wake_s: float
    logprob_diff: float
    weight_version: str  # the version the step's rollout ran on
    samples: int
    train_s: float

    HEADER = (
        f"{'step':>4} {'reward':>7} {'rollout tok/s':>13} {'refit s':>8} "
        f"{'sleep/wake s':>12} {'max|Δlogprob|':>14}  weights"
    )

    def line(self) -> str:
        return (
            f"{self.step:>4} {self.reward:>7.3f} {self.rollout_tok_s:>13.1f} "
            f"{self.refit_s:>8.2f} {self.sleep_wake_s:>12.2f} {self.logprob_diff:>14.1f}  "
            f"{self.weight_version}"
        )


class _Deployment:
    """Ray, the rollout service and the trainer actor of one run; ``close`` stops them all."""

    def __init__(self, cfg: GRPOConfig, model_path: str) -> None:
        from rollout import deploy
        from rollout.rl.trainer import TrainerActor

        self.cluster = None
        engine = {
            "device": "cpu",
            "deterministic": True,
            "num_threads": cfg.threads,
            "kv_cache_memory_bytes": cfg.kv_cache_memory_bytes,
            "seed": cfg.seed,
        }
        trainer_args = (model_path, cfg.trainable_layers, cfg.lr, cfg.threads, cfg.seed)
        if cfg.disaggregated:
            from rollout.ray_env import init_ray, make_cluster, node_args

            if ray.is_initialized():
                raise RuntimeError("--disaggregated simulates its own cluster: stop Ray first")
            self.cluster = make_cluster({"num_cpus": 1})
            self.cluster.add_node(**node_args(1, resources={"rollout_engine": 1}))
            init_ray(self.cluster.address)
            config = {
                "mode": "disaggregated",
                "engine_resource": "rollout_engine",
                "cpus_per_rank": 1.0,
            }
            options: dict[str, Any] = {"num_cpus": 1}
        else:
            config = {"mode": "colocated", "bundle": {"CPU": 2.0}, "cpus_per_rank": 1.0}
            options = {}
        config.update(model_path=model_path, num_engines=1, engine=engine, max_restarts=0)
        self.service = deploy(config)
        if not cfg.disaggregated:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options = {
                "num_cpus": 1,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.service.placement_group, placement_group_bundle_index=0
                ),
            }
        self.trainer = TrainerActor.options(**options).remote(*trainer_args)
        self.disaggregated = cfg.disaggregated

    def refit(self, version: str) -> float:
        engines, driver = self.service.engines, self.service.driver
        if self.disaggregated:
            return ray.get(self.trainer.push_distributed.remote(engines, driver, version))
        seconds = ray.get(self.trainer.push_colocated.remote(engines, version))
        ray.get(driver.note_refit.remote(version))  # the version every engine now serves
        return seconds

    def on_engines(self, verb: str, *args: Any) -> float:
        started = time.perf_counter()
        ray.get([getattr(e, verb).remote(*args) for e in self.service.engines])
        return time.perf_counter() - started

    def close(self) -> None:
        try:
            ray.get(self.trainer.close.remote(), timeout=60)
        except Exception:  # shutting down anyway
            pass
        ray.kill(self.trainer)
        self.service.shutdown()
        if self.cluster is not None:
            ray.shutdown()
            self.cluster.shutdown()


def run_grpo(
    cfg: GRPOConfig,
    report: Callable[[str], None] = print,
    progress: bool | None = None,
    task: Task = PICK_A_NUMBER,
) -> dict[str, Any]:
    """Run the loop; ``report`` gets the header and one line per step. Returns the rows, the
    trainer's info and the plot's path."""
    from transformers import AutoTokenizer

    from engine_core.default_model import ensure_default_model

    started = time.perf_counter()
    path = cfg.model_path or ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    pool = task.make(max(32, cfg.prompts_per_step), cfg.seed)
    deployment = _Deployment(cfg, path)
    rows: list[StepRow] = []
    try:
        info = ray.get(deployment.trainer.info.remote())
        report(
            f"model {path}: training {info['trainable_parameters'] / 1e6:.1f}M of "
            f"{info['parameters'] / 1e6:.1f}M parameters (last {cfg.trainable_layers} layers), "
            f"{'disaggregated' if cfg.disaggregated else 'colocated'}, "
            f"{info['threads']} threads, matmul: {info['matmul']}"
        )
        report(StepRow.HEADER)
        for step in range(cfg.steps):
            start = step * cfg.prompts_per_step % len(pool)
            prompts = [pool[(start + i) % len(pool)] for i in range(cfg.prompts_per_step)]
            row = _step(cfg, deployment, tokenizer, task, prompts, step, progress)
            rows.append(row)
            report(row.line())
    finally:
        deployment.close()
    elapsed = time.perf_counter() - started
    plot = _plot(rows, cfg.plot_path) if cfg.plot_path else None
    return {
        "rows": [asdict(r) for r in rows],
        "trainer": info,
        "plot": plot,
        "seconds": elapsed,
    }


def _chat_ids(tokenizer, prompt: Prompt) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):  # a base model: the text as it is
        return tokenizer.encode(prompt.text)
    messages = [{"role": "user", "content": prompt.text}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text)  # as the engine tokenizes a text prompt


def _step(cfg: GRPOConfig, dep: _Deployment, tokenizer, task, prompts, step, progress) -> StepRow:
    ids = [_chat_ids(tokenizer, p) for p in prompts]
    params = {
        "n": cfg.n,
        "temperature": cfg.temperature,
        "max_new_tokens": cfg.max_new_tokens,
        "sampling_seed": cfg.seed * 1_000_003 + step,
    }
    began = time.perf_counter()
    outs = dep.service.generate(
        input_ids=ids, sampling_params=params, return_logprob=True, progress=progress
    )
    rollout_s = time.perf_counter() - began
    if len(outs) != len(ids) * cfg.n:
        raise RuntimeError(f"lost requests: {len(outs)} outputs for {len(ids) * cfg.n} samples")
    aborted = [o for o in outs if o["meta_info"]["finish_reason"]["type"] == "abort"]
    if aborted:
        raise RuntimeError(f"{len(aborted)} requests aborted: {aborted[0]['meta_info']}")
    rewards = [task.reward(o["text"], prompts[i // cfg.n]) for i, o in enumerate(outs)]
    sequences = [ids[i // cfg.n] + o["output_ids"] for i, o in enumerate(outs)]
    prompt_lens = [len(ids[i // cfg.n]) for i in range(len(outs))]
    rollout_lps = [[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in outs]
    advantages = group_advantages(rewards, cfg.n)
    sleep_s = dep.on_engines("release_memory_occupation")  # both tags: weights and KV
    stats = ray.get(
        dep.trainer.train_step.remote(
            sequences, prompt_lens, rollout_lps, advantages, cfg.temperature
        )
    )
    wake_s = dep.on_engines("resume_memory_occupation", ["weights"], "empty")
    version = f"step-{step + 1}"
    refit_s = dep.refit(version)
    wake_s += dep.on_engines("resume_memory_occupation", ["kv_cache"])
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return StepRow(
        step=step,
        reward=sum(rewards) / len(rewards),
        rollout_tok_s=tokens / rollout_s,
        refit_s=refit_s,
        sleep_wake_s=sleep_s + wake_s,
        logprob_diff=stats["logprob_diff"],
        weight_version=outs[0]["meta_info"]["weight_version"],
        samples=len(outs),
        train_s=stats["train_s"],
    )


def _plot(rows: list[StepRow], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in rows]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(steps, [r.reward for r in rows], "o-", color="tab:blue", label="reward")
    left.set_xlabel("GRPO step")
    left.set_ylabel("mean reward", color="tab:blue")
    right = left.twinx()
    right.plot(steps, [r.rollout_tok_s for r in rows], "s--", color="tab:orange")
    right.set_ylabel("rollout tok/s", color="tab:orange")
    left.set_title("rl-rollout GRPO demo: reward and rollout throughput per step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
