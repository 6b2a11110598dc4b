"""Routing policies: which engine serves a prompt group (one prompt with its ``n`` samples).

A policy sees the group and the engines that are alive right now, with their outstanding work,
and returns one engine index. Groups are never split, so the ``n`` samples of a prompt share one
engine's prefix cache. Add a policy by subclassing ``RoutingPolicy`` and decorating it with
``@register_policy("name")``; ``ServiceConfig.policy`` accepts every registered name. The
cache-aware policy (``cache_aware``) lives in ``rollout.routing``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from rollout.routing.config import RouterConfig


@dataclass(frozen=True)
class GroupInfo:
    """What a policy may look at for one prompt group. ``est_tokens`` is the driver's estimate
    of the KV tokens the group will hold (prompt once, plus ``n`` times ``max_new_tokens``).
    ``input_ids`` are the prompt's token ids (for a text prompt: only when the policy
    ``needs_token_ids``, tokenized as the engine does); ``session_key`` names its conversation
    (``rollout.routing.sessions``), None if it has none; ``cache_salt`` the request's SGLang
    cache salt (cached pages are shared, and hashed, per salt)."""

    index: int
    prompt: str | None
    input_ids: tuple[int, ...] | None
    n: int
    est_tokens: int
    session_key: str | None = None
    cache_salt: str | None = None  # SGLang's: its pages are named under this salt


@dataclass(frozen=True)
class EngineLoad:
    """One live engine as seen by the driver: outstanding estimated tokens and groups."""

    index: int
    outstanding_tokens: int
    outstanding_groups: int


class EngineHandles(Protocol):
    """What a policy's ``refresh`` may use: the engines in a state, and their actor handles."""

    def indices(self, *states: str) -> list[int]: ...

    def engine(self, index: int) -> Any: ...


class RoutingPolicy(ABC):
    """Chooses an engine for each group. Instances live in the driver (one per service) and may
    keep state; ``choose`` is only called with a non-empty ``engines``. ``needs_token_ids``:
    the driver tokenizes text prompts for it (``GroupInfo.input_ids``)."""

    needs_token_ids: ClassVar[bool] = False

    @classmethod
    def from_router_config(cls, config: RouterConfig) -> RoutingPolicy:
        """A fresh instance; policies without tunables ignore ``config``."""
        return cls()

    async def refresh(self, engines: EngineHandles) -> None:  # noqa: B027
        """Called before a batch is routed (a cache-aware policy drains the engines' events)."""

    def engine_lost(self, index: int) -> None:  # noqa: B027
        """Engine ``index`` died or was replaced: whatever the policy knew of its cache is gone."""

    def stats(self) -> dict[str, Any]:
        """Counters for ``RolloutDriver.routing_stats`` (empty for stateless policies)."""
        return {}

    @abstractmethod
    def choose(self, group: GroupInfo, engines: Sequence[EngineLoad]) -> int:
        """Return the ``index`` of one of ``engines``."""

    def on_finished(self, group: GroupInfo, engine_index: int) -> None:  # noqa: B027
        """Called when a group finished on an engine (a cache-aware policy records the prefix)."""


POLICIES: dict[str, type[RoutingPolicy]] = {}


def register_policy(name: str) -> Callable[[type[RoutingPolicy]], type[RoutingPolicy]]:
    """Class decorator adding a policy under ``name``."""

    def add(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
        POLICIES[name] = cls
        return cls

    return add


def make_policy(name: str, router: RouterConfig | None = None) -> RoutingPolicy:
    """A fresh policy instance (``router``: the cache-aware tunables, defaults if None);
    unknown names raise ValueError listing the known ones."""
    from rollout.routing.config import RouterConfig

    if name not in POLICIES:
        raise ValueError(f"invalid policy={name!r}: unknown; known: {sorted(POLICIES)}")
    return POLICIES[name].from_router_config(router or RouterConfig())


@register_policy("round_robin")
class RoundRobin(RoutingPolicy):
    """Cycles over engine indices; an engine that is down is skipped, not waited for."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, group: GroupInfo, engines: Sequence[EngineLoad]) -> int:
        ordered = sorted(e.index for e in engines)
        # First live index at or after the cursor (wrapping), so the order survives a dead engine.
        pick = next((i for i in ordered if i >= self._next), ordered[0])
        self._next = pick + 1
        return pick


@register_policy("least_load")
class LeastLoad(RoutingPolicy):
    """The engine with the fewest outstanding estimated tokens (ties: fewer groups, lower index)."""

    def choose(self, group: GroupInfo, engines: Sequence[EngineLoad]) -> int:
        best = min(engines, key=lambda e: (e.outstanding_tokens, e.outstanding_groups, e.index))
        return best.index


# Registered last: the cache-aware policy subclasses RoutingPolicy from this module.
import rollout.routing.cache_aware  # noqa: E402, F401
