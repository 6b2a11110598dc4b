"""engine_core: one paged-KV, continuous-batching inference engine (never imports Ray).

``Engine`` is imported on first use, so light users of the package (the Ray driver builds
``engine_core.requests`` objects) do not import torch.
"""

from typing import Any

from engine_core.config import EngineConfig
from engine_core.errors import (
    EngineReleasedError,
    EngineStoppedError,
    InvalidConfigError,
    InvalidRequestError,
    ModelLoadError,
)
from engine_core.requests.generate_request import GenerateRequest
from engine_core.requests.sampling_params import SamplingParams

__all__ = [
    "Engine",
    "EngineConfig",
    "GenerateRequest",
    "SamplingParams",
    "InvalidRequestError",
    "InvalidConfigError",
    "ModelLoadError",
    "EngineStoppedError",
    "EngineReleasedError",
]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from engine_core.engine import Engine

        return Engine
    raise AttributeError(f"module 'engine_core' has no attribute {name!r}")
