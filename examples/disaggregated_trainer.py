"""Your own trainer on its own node; rollout engines on others, refitted over a gloo group.

On a real cluster start the engine nodes with ``ray start --resources='{"rollout_engine": 1}'``
and pass ``address="auto"``; here a two-node cluster is simulated on this machine.

    python examples/disaggregated_trainer.py [MODEL_DIR]
"""

import sys

import ray
import torch

import rollout
from engine_core.default_model import ensure_default_model
from rollout.ray_env import init_ray, make_cluster, node_args


@ray.remote(num_cpus=1)
class Trainer:
    def __init__(self, model_dir: str, engines, driver):
        from engine_core import PolicyModel
        from rollout.weight_sync_actor import WeightSync

        torch.set_num_threads(2)  # as the engines: bitwise logprobs need the same thread count
        self.policy = PolicyModel.from_pretrained(model_dir, deterministic=True)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=1e-5)
        self.sync = WeightSync(engines, driver=driver)  # this process sends (group rank 0)

    def step(self, seqs, prompt_lens, rollout_logprobs, rewards, version):
        from engine_core import logprob_diff

        logprobs = self.policy.token_logprobs(seqs, prompt_lens)
        mean = sum(rewards) / len(rewards)
        loss = -sum((r - mean) * lp.sum() for r, lp in zip(rewards, logprobs)) / len(rewards)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sync.update_weights(list(self.policy.named_parameters()), version)  # all or none
        return logprob_diff(rollout_logprobs, logprobs)


model = sys.argv[1] if len(sys.argv) > 1 else ensure_default_model()
cluster = make_cluster({"num_cpus": 1})  # the trainer's node
cluster.add_node(**node_args(1, resources={"rollout_engine": 1}))  # an engine node
init_ray(cluster.address)
config = {
    "mode": "disaggregated",
    "model_path": model,
    "num_engines": 1,
    "cpus_per_rank": 1.0,
    "engine_resource": "rollout_engine",
    "engine": {"deterministic": True, "num_threads": 2},
}
with rollout.deploy(config) as service:
    trainer = Trainer.remote(model, service.engines, service.driver)
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
        diff = ray.get(trainer.step.remote(seqs, lens, lps, rewards, f"step-{step + 1}"))
        print(f"step {step}: max |rollout - trainer logprob| = {diff}")
    ray.kill(trainer)
ray.shutdown()
cluster.shutdown()
