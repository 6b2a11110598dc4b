"""``RolloutDriver``: shards a batch of prompts over the engine actors and survives engine death.

A batch is cut into prompt groups (one prompt with its ``n`` samples); the routing policy picks
one engine per group, so the samples of a prompt share that engine's prefix cache. Each group is
one asyncio task and one engine call: when the call fails with ``RayActorError`` (the engine
died), the task marks the engine down and re-sends the group to a live engine, so every group's
result is recorded exactly once. A watcher waits for Ray to restart the engine (``max_restarts``)
and puts it back in rotation; on restart the engine itself asks this driver for the last
checkpoint (``weights_source``), so it rejoins on the current version -- or, if the current
weights were pushed from memory since (``note_refit``), stays out as "stale" until a refit.

This module imports no torch: the driver is a light, CPU-free actor.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from rollout.batch import Rollout, per_item_args
from rollout.engine_actor import WeightsSource
from rollout.partial_driver import PartialRolloutMixin
from rollout.policies import EngineLoad, GroupInfo, make_policy
from rollout.weights_registry import WeightsRegistryMixin

_KEEP_PROGRESS = 32  # finished rollouts whose progress stays queryable


@ray.remote
class RolloutDriver(WeightsRegistryMixin, PartialRolloutMixin):
    """Routes rollouts over ``engines`` (actor handles; index i is engine i) using ``policy``.
    Partial rollouts (stop early, resume later): ``generate_partial``/``resume_partial``."""

    def __init__(
        self,
        engines: list[Any],
        policy: str,
        weights: WeightsSource,
        restart_timeout_s: float = 300.0,
    ):
        self._policy = make_policy(policy)
        self._weights = weights
        self._version = weights.weight_version  # what every engine in rotation serves
        self._restart_timeout_s = restart_timeout_s
        self._rollouts: dict[str, Rollout] = {}
        self._changed: asyncio.Condition | None = None
        self.set_engines(engines)

    def set_engines(self, engines: list[Any]) -> None:
        """Replace the engine actors to route to (index i is engine i)."""
        self._engines = list(engines)
        self._state = ["up"] * len(engines)
        self._tokens = [0] * len(engines)
        self._groups = [0] * len(engines)

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # created on the actor's event loop
            self._changed = asyncio.Condition()
        return self._changed

    # ------------------------------------------------------------------ status
    def progress(self, rollout_id: str | None = None) -> dict[str, Any] | None:
        """Counts, tokens and tok/s of a rollout (default: the latest one); None if unknown."""
        if rollout_id is None:
            rollout_id = next(reversed(self._rollouts), None)
        rollout = self._rollouts.get(rollout_id) if rollout_id else None
        return rollout.snapshot() if rollout else None

    def engine_states(self) -> list[dict[str, Any]]:
        """Per engine: state (up / restarting / stale: restarted on older weights, out of
        rotation until a refit / dead) and outstanding estimated tokens and groups."""
        return [
            {"index": i, "state": s, "outstanding_tokens": t, "outstanding_groups": g}
            for i, (s, t, g) in enumerate(zip(self._state, self._tokens, self._groups))
        ]

    # ------------------------------------------------------------------ rollout
    async def generate(
        self,
        prompt=None,
        input_ids=None,
        sampling_params=None,
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        rollout_id: str | None = None,
    ):
        """Engine-shaped generate over all engines: one prompt gives a dict (a list if n > 1), a
        batch gives a list in input order with the n samples of prompt i adjacent. Each output's
        ``meta_info`` gains ``engine_index``. Poll ``progress(rollout_id)`` meanwhile."""
        if (prompt is None) == (input_ids is None):
            raise ValueError("invalid request: pass exactly one of prompt, input_ids")
        items, is_batch = self._items(prompt, input_ids)
        batch = len(items)
        params, flags = per_item_args(
            batch, sampling_params, return_logprob, logprob_start_len, top_logprobs_num
        )
        rollout_id = rollout_id or uuid.uuid4().hex[:12]
        groups = [self._group(i, items[i], params[i], prompt is not None) for i in range(batch)]
        rollout = Rollout(rollout_id, batch, sum(g.n for g in groups))
        self._remember(rollout)
        calls = [
            {
                "prompt" if prompt is not None else "input_ids": [items[i]],
                "sampling_params": [params[i]],
                "return_logprob": [flags[0][i]],
                "logprob_start_len": [flags[1][i]],
                "top_logprobs_num": [flags[2][i]],
            }
            for i in range(batch)
        ]
        tasks = [asyncio.ensure_future(self._run(g, calls[g.index], rollout)) for g in groups]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException as exc:
            rollout.error = f"{type(exc).__name__}: {exc}"
            for task in tasks:
                task.cancel()
            self._abort(rollout)
            raise
        finally:
            rollout.ended = time.monotonic()
        outputs = [out for group in results for out in group]
        return outputs if is_batch or len(outputs) > 1 else outputs[0]

    @staticmethod
    def _items(prompt: Any, input_ids: Any) -> tuple[list[Any], bool]:
        if prompt is not None:
            return (list(prompt), True) if isinstance(prompt, (list, tuple)) else ([prompt], False)
        if input_ids and isinstance(input_ids[0], (list, tuple)):
            return [list(x) for x in input_ids], True
        return [list(input_ids)], False

    @staticmethod
    def _group(index: int, item: Any, params: dict | None, is_text: bool) -> GroupInfo:
        params = params or {}
        n = params.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"invalid sampling_params[{index}].n={n!r}: must be a positive int")
        # Rough token count for load balancing (the driver has no tokenizer): ~4 chars/token.
        prompt_tokens = len(item) // 4 + 1 if is_text else len(item)
        new_tokens = params.get("max_new_tokens", 128)
        est = prompt_tokens + n * (new_tokens if isinstance(new_tokens, int) else 128)
        return GroupInfo(
            index=index,
            prompt=item if is_text else None,
            input_ids=None if is_text else tuple(item),
            n=n,
            est_tokens=est,
        )

    def _remember(self, rollout: Rollout) -> None:
        self._rollouts[rollout.id] = rollout
        while len(self._rollouts) > _KEEP_PROGRESS:
            self._rollouts.pop(next(iter(self._rollouts)))

    async def _run(self, group: GroupInfo, call: dict[str, Any], rollout: Rollout) -> list:
        """Serve one group, re-sending it to a live engine each time its engine dies."""
        attempt = 0
        while True:
            index = await self._pick(group)
            # A fresh id per attempt: a re-send can never clash with a copy still in flight.
            rid = f"{rollout.id}-{group.index}" + (f".r{attempt}" if attempt else "")
            self._tokens[index] += group.est_tokens
            self._groups[index] += 1
            rollout.inflight[group.index] = (index, rid, group.n)
            try:
                outputs = await self._engines[index].generate.remote(**call, rid=[rid])
            except RayActorError as exc:
                self._engine_down(index, exc)
                rollout.resent_groups += 1
                attempt += 1
                continue
            finally:
                self._tokens[index] -= group.est_tokens
                self._groups[index] -= 1
                rollout.inflight.pop(group.index, None)
            for out in outputs:
                out["meta_info"]["engine_index"] = index
            rollout.finished_groups += 1
            rollout.finished_samples += len(outputs)
            rollout.completion_tokens += sum(o["meta_info"]["completion_tokens"] for o in outputs)
            self._policy.on_finished(group, index)
            return outputs

    async def _pick(self, group: GroupInfo) -> int:
        """An engine for ``group`` from the policy; waits while every engine is restarting."""
        cond = self._cond()
        async with cond:
            while True:
                live = [i for i, s in enumerate(self._state) if s == "up"]
                if live:
                    loads = [EngineLoad(i, self._tokens[i], self._groups[i]) for i in live]
                    return self._policy.choose(group, loads)
                if "restarting" not in self._state:
                    raise RuntimeError(self._nothing_to_route_to())
                await cond.wait()

    def _nothing_to_route_to(self) -> str:
        stale = [i for i, s in enumerate(self._state) if s == "stale"]
        if stale:
            return (
                f"engines {stale} restarted on older weights than the current version "
                f"{self._version!r} (pushed from memory, not reloadable) and no other engine is "
                "up: refit them first (e.g. WeightSync.update_weights)"
            )
        return (
            f"no engine is alive: all {len(self._state)} engines died and could not "
            "be restarted (max_restarts exhausted or restart_timeout_s passed)"
        )

    def _engine_down(self, index: int, exc: Exception) -> None:
        if self._state[index] != "up":
            return
        self._state[index] = "restarting"
        print(
            f"rollout driver: engine {index} is down ({type(exc).__name__}); re-sending its "
            "unfinished groups and waiting for its restart",
            flush=True,
        )
        asyncio.ensure_future(self._watch(index))

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
        cond = self._cond()
        async with cond:
            # Compared under the lock: note_refit may have moved the version meanwhile.
            if state == "up" and health.get("weight_version") != self._version:
                state = "stale"  # came back on the last checkpoint; the service moved on
            self._state[index] = state
            cond.notify_all()
        words = {"up": "back", "dead": "dead", "stale": "back on stale weights (out of rotation)"}
        print(f"rollout driver: engine {index} is {words[state]}", flush=True)

    def _abort(self, rollout: Rollout) -> None:
        """Best-effort abort of a failed rollout's requests still running on engines."""
        for index, rid, n in list(rollout.inflight.values()):
            sample_ids = [rid] if n == 1 else [f"{rid}-{i}" for i in range(n)]
            for sample_id in sample_ids:
                self._engines[index].abort_request.remote(rid=sample_id)

    async def health(self) -> list[dict[str, Any] | None]:
        """Each engine's ``health()``, or None for an engine that does not answer."""
        results: list[dict[str, Any] | None] = []
        for engine in self._engines:
            try:
                results.append(await asyncio.wait_for(engine.health.remote(), 30))
            except (RayActorError, asyncio.TimeoutError):
                results.append(None)
        return results
