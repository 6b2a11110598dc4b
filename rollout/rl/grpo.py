"""GRPO's pieces: group-normalized advantages and the clipped policy-gradient loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def group_advantages(rewards: Sequence[float], n: int, eps: float = 1e-4) -> list[float]:
    """``(r - mean) / (std + eps)`` within each group of ``n`` samples of one prompt (a group
    whose samples all scored the same has advantage 0: nothing to learn from it)."""
    if n < 1 or len(rewards) % n:
        raise ValueError(f"{len(rewards)} rewards do not form groups of n={n}")
    out: list[float] = []
    for start in range(0, len(rewards), n):
        group = torch.tensor(rewards[start : start + n], dtype=torch.float64)
        std = group.std(unbiased=False) if n > 1 else torch.tensor(0.0, dtype=torch.float64)
        out.extend(((group - group.mean()) / (std + eps)).tolist())
    return out


def policy_loss(
    logprobs: Sequence[torch.Tensor],
    rollout_logprobs: Sequence[Sequence[float]],
    advantages: Sequence[float],
    clip: float = 0.2,
) -> torch.Tensor:
    """PPO-clip surrogate per token, averaged per sequence, then over sequences (GRPO).

    The ratio is ``exp(trainer - rollout)`` against the engine's own logprobs: with zero-KL
    alignment it is exactly 1 on an on-policy step, so the clip never bites by mistake."""
    losses = []
    for lp, old, adv in zip(logprobs, rollout_logprobs, advantages, strict=True):
        if lp.numel() == 0:
            continue
        ratio = torch.exp(lp - torch.tensor(list(old), dtype=lp.dtype, device=lp.device))
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
        losses.append(-surrogate.mean())
    if not losses:
        return torch.zeros((), requires_grad=True)
    return torch.stack(losses).mean()
