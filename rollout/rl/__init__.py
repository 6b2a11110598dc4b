"""A GRPO loop on the rollout service: a trainer actor holding ``engine_core.PolicyModel``,
engines that sleep while it trains, refits after every step, zero-KL logprobs (``rollout demo``)."""
