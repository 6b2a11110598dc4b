"""Your own trainer, colocated with the rollout engines in one placement group.

The trainer keeps an ``engine_core.PolicyModel`` (so its logprobs equal the rollout's bit for
bit), samples through the service, takes a step and refits the engines through shared memory.

    python examples/colocated_trainer.py [MODEL_DIR]
"""

import sys

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import rollout
from engine_core.default_model import ensure_default_model


@ray.remote
class Trainer:
    def __init__(self, model_dir: str):
        from engine_core import PolicyModel

        torch.set_num_threads(2)  # as the engines: bitwise logprobs need the same thread count
        self.policy = PolicyModel.from_pretrained(model_dir, deterministic=True)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=1e-5)

    def step(self, seqs, prompt_lens, rollout_logprobs, rewards):
        from engine_core import logprob_diff

        logprobs = self.policy.token_logprobs(seqs, prompt_lens)
        mean = sum(rewards) / len(rewards)
        loss = -sum((r - mean) * lp.sum() for r, lp in zip(rewards, logprobs)) / len(rewards)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return logprob_diff(rollout_logprobs, logprobs)

    def refit(self, engines, version):
        from weight_sync import push_colocated

        named = [(n, p.detach()) for n, p in self.policy.named_parameters()]
        apply = lambda handles: ray.get(  # noqa: E731
            [
                e.update_weights_from_tensor.remote(
                    handles, "flattened_bucket", weight_version=version
                )
                for e in engines
            ]
        )
        push_colocated(named, "example-refit", apply)


model = sys.argv[1] if len(sys.argv) > 1 else ensure_default_model()
config = {
    "mode": "colocated",
    "model_path": model,
    "num_engines": 1,
    "cpus_per_rank": 1.0,
    "bundle": {"CPU": 2.0},
    "engine": {"deterministic": True, "num_threads": 2},
}
with rollout.deploy(config) as service:
    where = PlacementGroupSchedulingStrategy(service.placement_group, 0)
    trainer = Trainer.options(num_cpus=1, scheduling_strategy=where).remote(model)
    prompts = [[1, 450, 7483, 338], [1, 3374, 338, 263]]  # token ids of your prompts
    for step in range(2):
        outs = service.generate(
            input_ids=prompts,
            return_logprob=True,
            sampling_params={"n": 4, "max_new_tokens": 8, "temperature": 1.0},
        )
        seqs = [prompts[i // 4] + o["output_ids"] for i, o in enumerate(outs)]
        lens = [len(prompts[i // 4]) for i in range(len(outs))]
        lps = [[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in outs]
        rewards = [float(len(o["output_ids"])) for o in outs]  # your reward here
        diff = ray.get(trainer.step.remote(seqs, lens, lps, rewards))
        ray.get(trainer.refit.remote(service.engines, f"step-{step + 1}"))
        print(f"step {step}: max |rollout - trainer logprob| = {diff}")
