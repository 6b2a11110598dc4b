"""``RouterConfig``: the cache-aware router's tunables (``ServiceConfig.router``), validated.

Defaults follow SGLang's router (``sgl-router``, policy ``cache_aware``): ``cache_threshold``
0.3 and ``balance_rel_threshold`` 1.5 as there; SGLang's ``balance_abs_threshold`` is 64
*requests*, this router measures load in outstanding estimated KV tokens (the driver's
``EngineLoad``), so its default is 64 requests of ~128 tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def _bad(name: str, value: object, reason: str) -> ValueError:
    return ValueError(f"invalid config router.{name}={value!r}: {reason}")


@dataclass(frozen=True)
class RouterConfig:
    """Tunables of the ``cache_aware`` policy (see ``rollout.routing.cache_aware``).

    - ``balance_abs_threshold`` / ``balance_rel_threshold``: load is imbalanced when the most
      loaded live engine has more than ``abs`` outstanding tokens over the least loaded one
      *and* more than ``rel`` times its load; then the least loaded engine is chosen.
    - ``cache_threshold``: a cached match is followed only if it covers more than this fraction
      of the prompt's tokens (else the least loaded engine).
    - ``max_entries``: at most this many prefix hashes are indexed (LRU forgetting).
    - ``provisional_ttl_s``: how long a routing decision counts as "that engine will cache this
      prefix" before an event confirms it.
    - ``max_sessions``: session pins kept (LRU).
    - ``refresh_interval_s``: cache events are drained at most this often (before a batch).
    - ``drain_timeout_s``: an engine that does not answer a drain within this keeps its
      entries until the next drain.
    """

    balance_abs_threshold: int = 8192
    balance_rel_threshold: float = 1.5
    cache_threshold: float = 0.3
    max_entries: int = 262_144
    provisional_ttl_s: float = 60.0
    max_sessions: int = 65_536
    refresh_interval_s: float = 0.05
    drain_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("balance_abs_threshold", "max_entries", "max_sessions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _bad(name, value, "must be an int >= 0")
        for name in ("max_entries", "max_sessions"):
            if getattr(self, name) == 0:
                raise _bad(name, 0, "must be a positive int")
        for name in (
            "balance_rel_threshold",
            "cache_threshold",
            "provisional_ttl_s",
            "refresh_interval_s",
            "drain_timeout_s",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise _bad(name, value, "must be a number >= 0")
        if self.balance_rel_threshold < 1:
            raise _bad("balance_rel_threshold", self.balance_rel_threshold, "must be >= 1")
        if self.cache_threshold >= 1:
            raise _bad("cache_threshold", self.cache_threshold, "must be below 1")
        if self.drain_timeout_s == 0:
            raise _bad("drain_timeout_s", 0, "must be positive")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> RouterConfig:
        """From ``ServiceConfig.router``; unknown keys raise ValueError naming them."""
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ValueError(f"invalid config router={values!r}: must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise _bad(key, value, f"unknown field; known: {sorted(known)}")
        return cls(**values)
