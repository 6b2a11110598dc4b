"""Per-request sampling parameters with SGLang's key names, validated at the boundary."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine_core.errors import InvalidRequestError

_INT_KEYS = ("max_new_tokens", "top_k", "n")
_FLOAT_KEYS = ("temperature", "top_p", "min_p")


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature == 0`` means greedy.

    ``top_k <= 0`` (SGLang uses -1) disables top-k. ``sampling_seed`` makes the draws a pure
    function of (seed, position), independent of batch partners; unseeded requests get a seed
    from the engine's own generator (``EngineConfig.seed``).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    sampling_seed: int | None = None
    skip_special_tokens: bool = True

    @classmethod
    def from_dict(cls, params: dict[str, Any] | None, field_prefix: str = "sampling_params"):
        """Validate a user dict; raise ``InvalidRequestError`` naming the bad key and value."""
        if params is None:
            params = {}
        if isinstance(params, SamplingParams):
            params = dataclasses.asdict(params)
        if not isinstance(params, dict):
            raise InvalidRequestError(field_prefix, params, "must be a dict")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in params:
            if key not in known:
                raise InvalidRequestError(
                    f"{field_prefix}.{key}",
                    params[key],
                    f"unknown sampling key; known: {sorted(known)}",
                )
        values = {k: v for k, v in params.items() if v is not None or k == "sampling_seed"}
        sp = cls(**values)
        sp._normalize(field_prefix)
        return sp

    def _normalize(self, prefix: str) -> None:
        for key in _INT_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequestError(f"{prefix}.{key}", value, "must be an int")
        for key in _FLOAT_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequestError(f"{prefix}.{key}", value, "must be a number")
            setattr(self, key, float(value))
        self._check_ranges(prefix)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError(f"{prefix}.stop", self.stop, "must be non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise InvalidRequestError(
                f"{prefix}.stop_token_ids", self.stop_token_ids, "must be ints"
            )
        if self.sampling_seed is not None and (
            isinstance(self.sampling_seed, bool) or not isinstance(self.sampling_seed, int)
        ):
            raise InvalidRequestError(
                f"{prefix}.sampling_seed", self.sampling_seed, "must be an int"
            )

    def _check_ranges(self, prefix: str) -> None:
        if self.max_new_tokens < 0:
            raise InvalidRequestError(
                f"{prefix}.max_new_tokens", self.max_new_tokens, "must be >= 0"
            )
        if self.temperature < 0:
            raise InvalidRequestError(f"{prefix}.temperature", self.temperature, "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"{prefix}.top_p", self.top_p, "must be in (0, 1]")
        if self.top_k == 0:
            raise InvalidRequestError(
                f"{prefix}.top_k", self.top_k, "must be > 0, or -1 to disable"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"{prefix}.min_p", self.min_p, "must be in [0, 1]")
        if self.n < 1:
            raise InvalidRequestError(f"{prefix}.n", self.n, "must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """Temperature the reported logprobs are computed at (1.0 for greedy)."""
        return 1.0 if self.greedy else self.temperature
