"""engine_core: one paged-KV, continuous-batching inference engine (never imports Ray)."""

from engine_core.config import EngineConfig
from engine_core.engine import Engine
from engine_core.errors import (
    EngineReleasedError,
    EngineStoppedError,
    InvalidConfigError,
    InvalidRequestError,
    ModelLoadError,
)
from engine_core.sampling_params import SamplingParams

__all__ = [
    "Engine",
    "EngineConfig",
    "SamplingParams",
    "InvalidRequestError",
    "InvalidConfigError",
    "ModelLoadError",
    "EngineStoppedError",
    "EngineReleasedError",
]
