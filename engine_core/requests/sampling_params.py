"""Per-request sampling parameters with SGLang's key names, validated at the boundary."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from engine_core.errors import InvalidRequestError

_INT_KEYS = ("max_new_tokens", "top_k", "n")
_FLOAT_KEYS = ("temperature", "top_p", "min_p")
_BOOL_KEYS = ("ignore_eos", "skip_special_tokens")
_INT64_MAX = (1 << 63) - 1
# Temperatures in (0, GREEDY_BELOW) sample as greedy, as in SGLang: dividing the logits by
# them overflows float32 (NaN probabilities) long before the draw differs from the argmax.
GREEDY_BELOW = 1e-5


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature == 0`` means greedy.

    ``top_k < 0`` (SGLang uses -1; stored as -1) disables top-k. ``0 < temperature < 1e-5``
    samples greedily (as in SGLang). ``sampling_seed`` makes the draws a pure function of (seed,
    position), independent of batch partners; unseeded requests get a seed from the engine's
    own generator (``EngineConfig.seed``). Every field is type-checked: a wrong type or range
    raises ``InvalidRequestError`` naming ``sampling_params.<key>``. How many samples one call
    may ask for (``n`` x batch size) is bounded by ``EngineConfig.max_requests_per_call``.
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
            if not _is_int(value):
                raise InvalidRequestError(f"{prefix}.{key}", value, "must be an int")
        for key in _FLOAT_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequestError(f"{prefix}.{key}", value, "must be a number")
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                number = math.inf
            if not math.isfinite(number):
                raise InvalidRequestError(f"{prefix}.{key}", value, "must be a finite number")
            setattr(self, key, number)
        for key in _BOOL_KEYS:
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise InvalidRequestError(f"{prefix}.{key}", value, "must be a bool")
        self._check_ranges(prefix)
        if 0.0 < self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        if self.top_k < 0:
            self.top_k = -1
        self.stop = self._check_stop(prefix)
        self.stop_token_ids = self._check_stop_token_ids(prefix)
        if self.sampling_seed is not None and not _is_int(self.sampling_seed):
            raise InvalidRequestError(
                f"{prefix}.sampling_seed", self.sampling_seed, "must be an int or None"
            )

    def _check_stop(self, prefix: str) -> list[str]:
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise InvalidRequestError(
                f"{prefix}.stop", stop, "must be a str or a list of non-empty str"
            )
        if not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError(f"{prefix}.stop", stop, "must be non-empty strings")
        return list(stop)

    def _check_stop_token_ids(self, prefix: str) -> list[int]:
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise InvalidRequestError(
                f"{prefix}.stop_token_ids", ids, "must be a list of token ids (ints >= 0)"
            )
        if not all(_is_int(t) and t >= 0 for t in ids):
            raise InvalidRequestError(f"{prefix}.stop_token_ids", ids, "must be ints >= 0")
        return list(ids)

    def _check_ranges(self, prefix: str) -> None:
        if self.max_new_tokens < 0:
            raise InvalidRequestError(
                f"{prefix}.max_new_tokens", self.max_new_tokens, "must be >= 0"
            )
        if self.temperature < 0:
            raise InvalidRequestError(f"{prefix}.temperature", self.temperature, "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"{prefix}.top_p", self.top_p, "must be in (0, 1]")
        if self.top_k == 0 or self.top_k > _INT64_MAX:
            raise InvalidRequestError(
                f"{prefix}.top_k", self.top_k, "must be in [1, 2**63), or -1 to disable"
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
