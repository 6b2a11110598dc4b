"""The demo's task and its verifiable reward (pure Python, deterministic).

"Pick a number": each prompt asks for a whole number in a range and names the one that wins
(``target``); the reward is 1.0 when the first number in the completion is the target, 0.1 for
any other number in range (the format is right), 0 otherwise. A base model answers with many
numbers, so groups of samples disagree (GRPO has a signal from the first step) and the reward
rises as the policy learns which answer wins — for any seed, within a few steps.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Prompt:
    text: str  # the user message
    target: int
    low: int
    high: int


def reward(completion: str, prompt: Prompt) -> float:
    match = _NUMBER.search(completion)
    if match is None:
        return 0.0
    value = int(match.group())
    if value == prompt.target:
        return 1.0
    return 0.1 if prompt.low <= value <= prompt.high else 0.0


def make_prompts(count: int, seed: int, target: int = 7) -> list[Prompt]:
    """``count`` differently worded prompts whose winning answer is ``target``."""
    rng = random.Random(seed)
    asks = [
        "Pick a number from {lo} to {hi}. Answer with the number only.",
        "Choose one whole number between {lo} and {hi}. Reply with just the number.",
        "Say a number in the range {lo}-{hi}. Only the number, please.",
        "Give me a random integer from {lo} to {hi}. Write only the number.",
    ]
    prompts = []
    for i in range(count):
        lo, hi = rng.choice([(1, 10), (1, 9), (0, 10), (2, 12)])
        text = asks[i % len(asks)].format(lo=lo, hi=hi)
        prompts.append(Prompt(text, target, lo, hi))
    return prompts
