"""``RolloutDriver``: shards a batch of prompts over the engine actors and survives engine death.

The actor's methods are the RPC; each delegates to the component that owns it, all built here:

- ``EngineTable`` (``rollout.engine_table``): the engines, which are in rotation (up /
  restarting / stale / dead), their outstanding load, the routing policy (``cache_aware``:
  ``rollout.routing``, fed by the engines' cache events), restart watching.
- ``GroupRunner`` (``rollout.group_runner``): runs a rollout's prompt groups (one prompt with
  its ``n`` samples, one engine call each), re-sending a group when its engine dies; progress.
- ``WeightsRegistry`` (``rollout.weights_registry``): the weights a restarted engine loads and
  the version every engine in rotation serves.
- ``PartialRollouts`` (``rollout.partial_rollouts``): rollouts stopped early and resumed.

On restart an engine asks this driver for the last checkpoint (``weights_source``), so it rejoins
on the current version -- or, if the current weights were pushed from memory since
(``note_refit``), stays out as "stale" until a refit. This module imports no torch: the driver
is a light, CPU-free actor.
"""

from __future__ import annotations

from typing import Any

import ray

from engine_core.requests.generate_request import GenerateRequest, takes_generate_request
from rollout.engine_actor import WeightsSource
from rollout.engine_table import EngineTable
from rollout.group_runner import GroupRunner
from rollout.partial import partial_request, takes_partial_request
from rollout.partial_rollouts import PartialRollouts, StopRule
from rollout.policies import make_policy
from rollout.routing.config import RouterConfig
from rollout.routing.prompt_tokens import PromptTokens
from rollout.weights_registry import WeightsRegistry


@ray.remote
class RolloutDriver:
    """Routes rollouts over ``engines`` (actor handles; index i is engine i) using ``policy``
    (``router``: the ``cache_aware`` tunables, ``RouterConfig`` fields). Partial rollouts
    (stop early, resume later): ``generate_partial``/``resume_partial``."""

    def __init__(
        self,
        engines: list[Any],
        policy: str,
        weights: WeightsSource,
        restart_timeout_s: float = 300.0,
        router: dict[str, Any] | None = None,
    ):
        routing = make_policy(policy, RouterConfig.from_dict(router))
        self._engines = EngineTable(engines, routing, weights.weight_version, restart_timeout_s)
        self._weights = WeightsRegistry(self._engines, weights)
        # The tokenizer of the model the engines were built from (they keep it across refits).
        self._groups = GroupRunner(self._engines, PromptTokens(weights.model_path))
        self._partials = PartialRollouts(self._groups)

    def set_engines(self, engines: list[Any]) -> None:
        """Replace the engine actors to route to (index i is engine i)."""
        self._engines.set_engines(engines)

    # ------------------------------------------------------------------ status
    def progress(self, rollout_id: str | None = None) -> dict[str, Any] | None:
        """Counts, tokens and tok/s of a rollout (default: the latest one); None if unknown."""
        return self._groups.progress(rollout_id)

    def engine_states(self) -> list[dict[str, Any]]:
        """Per engine: state (up / restarting / stale: restarted on older weights, out of
        rotation until a refit / dead) and outstanding estimated tokens and groups."""
        return self._engines.states()

    async def health(self) -> list[dict[str, Any] | None]:
        """Each engine's ``health()``, or None for an engine that does not answer."""
        return await self._engines.health()

    def routing_stats(self) -> dict[str, Any]:
        """The routing policy's counters (``cache_aware``: decisions per rule -- imbalanced /
        session / hit / miss --, indexed prefixes, sessions, page size, event drains)."""
        return {"policy": type(self._engines.policy).__name__, **self._engines.policy.stats()}

    # ------------------------------------------------------------------ rollouts
    @takes_generate_request
    async def generate(self, *args: Any, rollout_id: str | None = None, **kwargs: Any):
        """Engine-shaped generate over all engines (``GenerateRequest``'s arguments, or one):
        one prompt gives a dict (a list if n > 1), a batch gives a list in input order with the
        n samples of prompt i adjacent. Each output's ``meta_info`` gains ``engine_index``.
        Poll ``progress(rollout_id)`` meanwhile."""
        return await self._groups.generate(GenerateRequest.of(*args, **kwargs), rollout_id)

    @takes_generate_request
    async def generate_stream(self, *args: Any, **kwargs: Any):
        """Streaming generator (one prompt, n=1) on the engine the policy picks: refs of
        incremental chunks (``EngineActor.generate_stream``), ``meta_info.engine_index`` set."""
        async for chunk in self._groups.stream(GenerateRequest.of(*args, **kwargs)):
            yield chunk

    @takes_partial_request
    async def generate_partial(
        self,
        *args: Any,
        deadline_s: float | None = None,
        min_groups: int | None = None,
        rollout_id: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Roll out ``input_ids`` (one prompt or a batch; token ids only), stopping at
        ``deadline_s`` seconds or once ``min_groups`` groups (a prompt's ``n`` samples) all
        finished. Returns ``{"rollout_id", "groups": [{"index", "done", "request", "samples"}],
        "finished_groups", "partial_groups"}``, groups in input order; each sample is an engine
        output plus ``group``, ``sample``, ``request`` (``rollout.partial``)."""
        request = partial_request(*args, **kwargs)
        stop = StopRule(deadline_s, min_groups)
        return await self._partials.generate(request, stop, rollout_id)

    async def resume_partial(
        self,
        partial: dict[str, Any],
        deadline_s: float | None = None,
        min_groups: int | None = None,
        rollout_id: str | None = None,
    ) -> dict[str, Any]:
        """Continue every cut sample of ``partial`` (a ``generate_partial``/``resume_partial``
        result) on the engines' current weights: input_ids = prompt + output so far, the rest of
        ``max_new_tokens``, the sample's own seed. Stops like ``generate_partial``
        (``min_groups`` counts groups this call works on); returns the same shape."""
        stop = StopRule(deadline_s, min_groups)
        return await self._partials.resume(partial, stop, rollout_id)

    # ------------------------------------------------------------------ weights
    async def weights_source(self, restarting: int | None = None) -> WeightsSource:
        """The last weights a restarted engine can load (a checkpoint directory); ``restarting``
        is the index of the engine asking after Ray restarted it (the driver watches it)."""
        return self._weights.source(restarting)

    def set_weights_source(self, model_path: str, weight_version: str) -> None:
        """Record the current weights without pushing them (engines already have them)."""
        self._weights.set_source(model_path, weight_version)

    async def note_refit(self, weight_version: str) -> None:
        """The service's weights are now ``weight_version`` (pushed from memory): engines on
        another version stay out of rotation ("stale") until a refit reaches them."""
        await self._weights.note_refit(weight_version)

    async def update_weights_from_disk(
        self, model_path: str, weight_version: str | None = None
    ) -> list[Any]:
        """Load ``model_path`` on every live engine (the path is the version if none given);
        engines restarting meanwhile come up on it too."""
        return await self._weights.update_weights_from_disk(model_path, weight_version)
