"""engine_core: one paged-KV, continuous-batching inference engine (never imports Ray).

``Engine``, ``PolicyModel`` (the trainer's aligned model) and ``logprob_diff`` are imported on
first use, so light users of the package (the Ray driver builds ``engine_core.requests``
objects) do not import torch.
"""

from typing import Any

from engine_core.config import EngineConfig
from engine_core.errors import (
    EngineReleasedError,
    EngineStoppedError,
    InvalidConfigError,
    InvalidRequestError,
    MemoryStateError,
    ModelLoadError,
)
from engine_core.requests.generate_request import GenerateRequest
from engine_core.requests.sampling_params import SamplingParams

__all__ = [
    "Engine",
    "EngineConfig",
    "PolicyModel",
    "logprob_diff",
    "GenerateRequest",
    "SamplingParams",
    "InvalidRequestError",
    "InvalidConfigError",
    "ModelLoadError",
    "EngineStoppedError",
    "EngineReleasedError",
    "MemoryStateError",
]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from engine_core.engine import Engine

        return Engine
    if name in ("PolicyModel", "logprob_diff"):
        from engine_core.training import policy_model

        return getattr(policy_model, name)
    raise AttributeError(f"module 'engine_core' has no attribute {name!r}")
