"""Per-request sampling parameters with SGLang's key names, validated at the boundary."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from engine_core.errors import InvalidRequestError
from engine_core.requests.regex_safety import nested_repeat

_INT_KEYS = ("max_new_tokens", "top_k", "n", "min_new_tokens")
_FLOAT_KEYS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)
_BOOL_KEYS = ("ignore_eos", "skip_special_tokens", "no_stop_trim", "spaces_between_special_tokens")
_JSON_SCALARS = (type(None), bool, int, float, str)
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

    Penalties (SGLang's penalizers; they count *output* tokens only, never the prompt, and
    modify the sampled row's logits before temperature, filtering and logprobs):
    ``repetition_penalty`` in (0, 2] divides positive / multiplies negative logits of tokens
    already generated; ``frequency_penalty`` and ``presence_penalty`` in [-2, 2] subtract
    ``f * count`` and ``p * (count > 0)``; ``min_new_tokens`` in [0, max_new_tokens] sets the
    EOS and ``stop_token_ids`` logits to -inf until that many tokens exist (stop strings may
    still end a request earlier, as in SGLang). ``stop_regex``: a pattern (or list) searched
    in the output text after every token. ``no_stop_trim`` keeps the matched stop string (or
    stop token) in ``text``. ``spaces_between_special_tokens`` goes to the tokenizer's decode.
    ``custom_params`` (a JSON-like dict) is accepted and carried; no custom logit processor
    reads it here.
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
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    stop_regex: list[str] = field(default_factory=list)
    no_stop_trim: bool = False
    spaces_between_special_tokens: bool = True
    custom_params: dict[str, Any] | None = None

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
        # None means "the default" (as SGLang's __post_init__), except for the optional fields.
        optional = ("sampling_seed", "custom_params")
        values = {k: v for k, v in params.items() if v is not None or k in optional}
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
        self.stop_regex = self._check_stop_regex(prefix)
        self.custom_params = _check_custom_params(self.custom_params, f"{prefix}.custom_params")
        self.stop_token_ids = self._check_stop_token_ids(prefix)
        seed = self.sampling_seed
        if seed is not None and (not _is_int(seed) or not -(1 << 63) <= seed <= _INT64_MAX):
            raise InvalidRequestError(f"{prefix}.sampling_seed", seed, "must be an int64 (or None)")

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
        _check_count(f"{prefix}.stop", stop)
        return list(stop)

    def _check_stop_regex(self, prefix: str) -> list[str]:
        patterns = self.stop_regex
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, (list, tuple)) or not all(
            isinstance(p, str) and p for p in patterns
        ):
            raise InvalidRequestError(
                f"{prefix}.stop_regex", self.stop_regex, "must be a str or a list of non-empty str"
            )
        _check_count(f"{prefix}.stop_regex", patterns)
        for pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as exc:
                raise InvalidRequestError(
                    f"{prefix}.stop_regex", pattern, f"not a valid regular expression ({exc})"
                ) from None
            if nested_repeat(pattern):
                raise InvalidRequestError(
                    f"{prefix}.stop_regex",
                    pattern,
                    "a repeated group that repeats again inside can take exponential time to "
                    "search (use a possessive repeat such as x++ or an atomic group (?>...))",
                )
        return list(patterns)

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
        for key in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, key) <= 2.0:
                raise InvalidRequestError(
                    f"{prefix}.{key}", getattr(self, key), "must be in [-2, 2]"
                )
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidRequestError(
                f"{prefix}.repetition_penalty",
                self.repetition_penalty,
                "must be in (0, 2] (1.0 = no penalty)",
            )
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidRequestError(
                f"{prefix}.min_new_tokens",
                self.min_new_tokens,
                f"must be in [0, max_new_tokens={self.max_new_tokens}]",
            )

    @property
    def penalized(self) -> bool:
        """Whether any output-token penalty changes this request's logits."""
        return (
            self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """Temperature the reported logprobs are computed at (1.0 for greedy)."""
        return 1.0 if self.greedy else self.temperature


MAX_STOPS = 256  # each is searched in the output after every token


def _check_count(field: str, items: list | tuple) -> None:
    if len(items) > MAX_STOPS:
        raise InvalidRequestError(field, f"<{len(items)} items>", f"at most {MAX_STOPS}")


def _check_custom_params(value: Any, name: str) -> dict[str, Any] | None:
    """SGLang's ``custom_params``: None or a dict of str keys to JSON scalars, lists of
    scalars or dicts of scalars (what survives its IPC). Returned as a copy."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidRequestError(name, value, "must be None or a dict with str keys")
    for key, item in value.items():
        if isinstance(item, list):
            ok = all(isinstance(v, _JSON_SCALARS) for v in item)
        elif isinstance(item, dict):
            ok = all(isinstance(k, str) and isinstance(v, _JSON_SCALARS) for k, v in item.items())
        else:
            ok = isinstance(item, _JSON_SCALARS)
        if not ok:
            raise InvalidRequestError(
                f"{name}.{key}", item, "must be a JSON scalar, or a list / dict of JSON scalars"
            )
    return {
        k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
        for k, v in value.items()
    }
