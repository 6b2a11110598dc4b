"""The demo's task and its verifiable reward (pure Python, deterministic).

"Pick a number": each prompt asks for a whole number in a range, answered with the number
only. The reward checks the completion: 1.0 when it starts with a number in the range, 0.5 when
such a number comes later, 0.2 for a number out of range, 0 for no number. A base model at
temperature 1 answers in many ways, so the samples of a group disagree (GRPO has a signal from
the first step), and the reward rises as the policy learns the format.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Prompt:
    text: str  # the user message
    low: int
    high: int


def reward(completion: str, prompt: Prompt) -> float:
    match = _NUMBER.search(completion)
    if match is None:
        return 0.0
    if not prompt.low <= int(match.group()) <= prompt.high:
        return 0.2
    return 1.0 if match.start() == len(completion) - len(completion.lstrip()) else 0.5


def make_prompts(count: int, seed: int) -> list[Prompt]:
    """``count`` differently worded prompts (ranges drawn with ``seed``)."""
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
        prompts.append(Prompt(text, lo, hi))
    return prompts


@dataclass(frozen=True)
class Task:
    """What the loop trains on: prompts (``make(count, seed)``) and a verifiable reward."""

    make: Callable[[int, int], list[Prompt]] = make_prompts
    reward: Callable[[str, Prompt], float] = reward


PICK_A_NUMBER = Task()
