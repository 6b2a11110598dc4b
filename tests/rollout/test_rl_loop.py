"""A short GRPO run on the Ray service with a tiny model: the reward rises, every step's
rollout logprobs equal the trainer's bit for bit, weight versions advance, no request is lost."""

from __future__ import annotations

import pytest

from rollout.rl.grpo import group_advantages, policy_loss
from rollout.rl.loop import GRPOConfig, run_grpo
from rollout.rl.task import Prompt, Task, make_prompts
from rollout.rl.task import reward as number_reward


def _letter_e(completion: str, prompt: Prompt) -> float:
    """Share of the completion's letters that are 'e': learnable by a random tiny model."""
    letters = [c for c in completion if c.isalpha()]
    return sum(c == "e" for c in letters) / len(letters) if letters else 0.0


@pytest.mark.parametrize("disaggregated", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_short_grpo_run(ray_local, tiny_model, tmp_path, disaggregated):
    import ray

    if disaggregated:
        ray.shutdown()  # the run simulates its own two-node cluster
    cfg = GRPOConfig(
        model_path=tiny_model,
        steps=8,
        prompts_per_step=4,
        n=8,
        max_new_tokens=8,
        lr=2e-2,
        trainable_layers=2,
        disaggregated=disaggregated,
        threads=1,
        kv_cache_memory_bytes=4 << 20,
        plot_path=str(tmp_path / "grpo.png"),
    )
    lines: list[str] = []
    result = run_grpo(cfg, report=lines.append, progress=False, task=Task(reward=_letter_e))
    rows = result["rows"]
    assert len(rows) == 8 and len(lines) == 2 + 8  # info line, header, one row per step
    assert all(r["logprob_diff"] == 0.0 for r in rows)
    assert [r["weight_version"] for r in rows] == ["default"] + [f"step-{i}" for i in range(1, 8)]
    assert all(r["samples"] == 4 * 8 for r in rows)
    first = sum(r["reward"] for r in rows[:2]) / 2
    last = sum(r["reward"] for r in rows[-2:]) / 2
    assert last > first + 0.05, [round(r["reward"], 3) for r in rows]
    assert (tmp_path / "grpo.png").stat().st_size > 1000
    assert all(r["refit_s"] > 0 and r["sleep_wake_s"] > 0 for r in rows)


def test_group_advantages_and_loss():
    adv = group_advantages([1.0, 0.0, 1.0, 1.0, 0.5, 0.5], 3)
    assert adv[3] == pytest.approx(1.4142, abs=1e-3)
    assert adv[4] == adv[5] == pytest.approx(-0.7071, abs=1e-3)
    assert sum(adv[:3]) == pytest.approx(0.0, abs=1e-9) and adv[1] < 0 < adv[0]
    with pytest.raises(ValueError, match="groups of n=4"):
        group_advantages([1.0, 2.0, 3.0], 4)
    import torch

    lp = [torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-0.5], requires_grad=True)]
    loss = policy_loss(lp, [[-1.0, -2.0], [-0.5]], [1.0, -1.0])
    loss.backward()
    # ratio 1 on an on-policy step: d(-A * ratio)/d lp = -A, averaged per sequence
    assert lp[0].grad.tolist() == [-0.25, -0.25] and lp[1].grad.tolist() == [0.5]


def test_number_reward():
    prompt = Prompt("Pick a number from 1 to 10.", 1, 10)
    assert number_reward("7", prompt) == 1.0
    assert number_reward(" 7 is nice", prompt) == 1.0
    assert number_reward("I pick 7", prompt) == 0.5
    assert number_reward("42", prompt) == 0.2
    assert number_reward("none", prompt) == 0.0
    assert len(make_prompts(5, 0)) == 5
    with pytest.raises(ValueError, match="n=1"):
        GRPOConfig(n=1)
