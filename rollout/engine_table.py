"""``EngineTable``: the engine actors a ``RolloutDriver`` routes to, and which are in rotation.

Per engine: its actor handle, its state -- ``up`` (in rotation), ``restarting`` (died; Ray is
restarting it), ``stale`` (came back on older weights than ``version``; out until a refit) or
``dead`` -- and its outstanding estimated tokens and groups. ``assign`` picks an engine for a
prompt group with the routing policy (waiting while every engine is restarting); ``mark_down``
takes a dead engine out and watches Ray restart it; ``recheck`` re-judges engines after a refit.

Pure asyncio over Ray handles; no torch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError

from rollout.policies import EngineLoad, GroupInfo, RoutingPolicy

_IN_ROTATION_OR_STALE = ("up", "stale")


class EngineTable:
    """The engines (index i is engine i), their states and loads, and the routing policy.
    ``version`` is what every engine in rotation serves."""

    def __init__(
        self,
        engines: list[Any],
        policy: RoutingPolicy,
        version: str,
        restart_timeout_s: float,
    ) -> None:
        self.policy = policy
        self.version = version
        self._restart_timeout_s = restart_timeout_s
        self._changed = asyncio.Condition()  # binds to the actor's event loop on first use
        self._watchers: set[asyncio.Task] = set()
        self._engines: list[Any] = []
        self.set_engines(engines)

    def set_engines(self, engines: list[Any]) -> None:
        """Replace the engine actors (index i is engine i), all up and idle."""
        for index in range(len(self._engines)):
            self.policy.engine_lost(index)  # what the policy knew of the old ones is void
        self._engines = list(engines)
        self._state = ["up"] * len(engines)
        self._tokens = [0] * len(engines)
        self._groups = [0] * len(engines)

    def engine(self, index: int) -> Any:
        return self._engines[index]

    def indices(self, *states: str) -> list[int]:
        """The engines in one of ``states``."""
        return [i for i, s in enumerate(self._state) if s in states]

    def states(self) -> list[dict[str, Any]]:
        """Per engine: state and outstanding estimated tokens and groups."""
        return [
            {"index": i, "state": s, "outstanding_tokens": t, "outstanding_groups": g}
            for i, (s, t, g) in enumerate(zip(self._state, self._tokens, self._groups))
        ]

    # ------------------------------------------------------------------ routing
    async def refresh_routing(self) -> None:
        """Before a batch is routed: the policy catches up (a cache-aware one drains events)."""
        await self.policy.refresh(self)

    async def assign(self, group: GroupInfo) -> int:
        """An engine for ``group`` from the policy, its load counted until ``release``; waits
        while every engine is restarting, raises RuntimeError when none can come back."""
        async with self._changed:
            while True:
                live = self.indices("up")
                if live:
                    loads = [EngineLoad(i, self._tokens[i], self._groups[i]) for i in live]
                    index = self.policy.choose(group, loads)
                    self._tokens[index] += group.est_tokens
                    self._groups[index] += 1
                    return index
                if "restarting" not in self._state:
                    raise RuntimeError(self._nothing_to_route_to())
                await self._changed.wait()

    def release(self, index: int, group: GroupInfo) -> None:
        """``group``'s call on engine ``index`` returned (or failed)."""
        self._tokens[index] -= group.est_tokens
        self._groups[index] -= 1

    def finished(self, group: GroupInfo, index: int) -> None:
        self.policy.on_finished(group, index)

    def _nothing_to_route_to(self) -> str:
        stale = self.indices("stale")
        if stale:
            return (
                f"engines {stale} restarted on older weights than the current version "
                f"{self.version!r} (pushed from memory, not reloadable) and no other engine is "
                "up: refit them first (e.g. WeightSync.update_weights)"
            )
        return (
            f"no engine is alive: all {len(self._state)} engines died and could not "
            "be restarted (max_restarts exhausted or restart_timeout_s passed)"
        )

    # ------------------------------------------------------------------ restarts
    def mark_down(self, index: int, exc: Exception) -> None:
        """A call to engine ``index`` failed with ``exc`` (it died): out of rotation, watched.
        The policy forgets its cache (a restarted engine starts empty)."""
        self.policy.engine_lost(index)
        if self._watch_restart(index):
            print(
                f"rollout driver: engine {index} is down ({type(exc).__name__}); re-sending its "
                "unfinished groups and waiting for its restart",
                flush=True,
            )

    def restarted(self, index: int) -> None:
        """Engine ``index`` says Ray restarted it (possibly outside any rollout): watched."""
        if 0 <= index < len(self._state):
            self.policy.engine_lost(index)
            self._watch_restart(index)

    def _watch_restart(self, index: int) -> bool:
        if self._state[index] != "up":
            return False
        self._state[index] = "restarting"
        task = asyncio.ensure_future(self._watch(index))
        self._watchers.add(task)  # a reference, so the task cannot be collected mid-way
        task.add_done_callback(self._watchers.discard)
        return True

    async def _watch(self, index: int) -> None:
        """Wait for Ray to restart engine ``index``; back in rotation once it answers health."""
        deadline = time.monotonic() + self._restart_timeout_s
        state = "dead"
        while time.monotonic() < deadline:
            try:
                health = await asyncio.wait_for(
                    self._engines[index].health.remote(), deadline - time.monotonic()
                )
            except ActorUnavailableError:
                await asyncio.sleep(0.5)  # restarting; calls are refused for a moment
                continue
            except (RayActorError, asyncio.TimeoutError):
                break
            state = "up" if health.get("ok") else "dead"
            break
        async with self._changed:
            # Compared under the lock: recheck may have moved the version meanwhile.
            if state == "up" and health.get("weight_version") != self.version:
                state = "stale"  # came back on the last checkpoint; the service moved on
            self._state[index] = state
            self._changed.notify_all()
        words = {"up": "back", "dead": "dead", "stale": "back on stale weights (out of rotation)"}
        print(f"rollout driver: engine {index} is {words[state]}", flush=True)

    # ------------------------------------------------------------------ versions
    async def recheck(self, version: str) -> None:
        """The service now serves ``version``: engines up or stale are asked theirs; those on it
        are (back) in rotation, the others stale. Restarting ones are judged by their watcher."""
        self.version = version
        candidates = self.refittable()
        versions = await asyncio.gather(*(self._version_of(i) for i in candidates))
        async with self._changed:
            for index, got in zip(candidates, versions):
                if got is not None and self._state[index] in _IN_ROTATION_OR_STALE:
                    self._state[index] = "up" if got == self.version else "stale"
            self._changed.notify_all()

    async def _version_of(self, index: int) -> str | None:
        """Engine ``index``'s weight version, or None if it does not answer (a failed call
        in a rollout, or its restart, will say what happened to it)."""
        try:
            health = await asyncio.wait_for(self._engines[index].health.remote(), 60)
        except Exception:
            return None
        return health.get("weight_version")

    def refittable(self) -> list[int]:
        """The engines a refit goes to: in rotation or stale."""
        return self.indices(*_IN_ROTATION_OR_STALE)

    async def health(self) -> list[dict[str, Any] | None]:
        """Each engine's ``health()``, or None for an engine that does not answer."""
        results: list[dict[str, Any] | None] = []
        for engine in self._engines:
            try:
                results.append(await asyncio.wait_for(engine.health.remote(), 30))
            except (RayActorError, asyncio.TimeoutError):
                results.append(None)
        return results
