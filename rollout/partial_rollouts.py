"""``PartialRollouts``: the driver's partial rollouts (see ``rollout.partial`` for the contract).

``generate`` rolls out prompt groups like a whole rollout but stops at ``deadline_s`` or once
``min_groups`` groups finished, returning every group with its samples, finished or cut short.
``resume`` continues the cut samples of such a result (typically after a refit) and returns the
same shape, so a rollout can be stopped and resumed any number of times.

Stopping aborts the rollout's requests on their engines (only these: other rollouts keep
going) and repeats the abort until every call returned, since an abort can overtake its
request on the way to the engine. Groups run on the driver's ``GroupRunner``, so dead engines
are handled as in whole rollouts.
"""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass
from typing import Any

from engine_core.errors import InvalidRequestError
from engine_core.requests.generate_request import GenerateRequest
from rollout.group_runner import GroupRunner, PromptGroup, Rollout, new_rollout_id
from rollout.partial import (
    continuation,
    is_done,
    item_request,
    make_sample,
    merge,
    sample_requests,
    summarize,
)

_REABORT_S = 0.1  # how often a stopping rollout re-sends aborts to calls still out

Unit = tuple[int, dict[str, Any]]  # (group index, one engine request: a ``partial`` request)


@dataclass(frozen=True)
class StopRule:
    """When a partial rollout stops: after ``deadline_s`` seconds, or once ``min_groups``
    groups (a prompt's ``n`` samples) all finished; None: no such limit."""

    deadline_s: float | None = None
    min_groups: int | None = None

    def __post_init__(self) -> None:
        groups = self.min_groups
        if groups is not None and (not isinstance(groups, int) or groups < 1):
            raise InvalidRequestError("min_groups", groups, "must be a positive int")


class PartialRollouts:
    """Partial rollouts run on ``runner`` (the driver's group runner)."""

    def __init__(self, runner: GroupRunner) -> None:
        self._runner = runner

    async def generate(
        self, request: GenerateRequest, stop: StopRule, rollout_id: str | None = None
    ) -> dict[str, Any]:
        """Roll out ``request`` (token ids, ``rollout.partial.partial_request``) until ``stop``."""
        requests = [item_request(item) for item in request.items()]
        groups: list[dict[str, Any]] = [
            {"index": i, "request": r, "samples": []} for i, r in enumerate(requests)
        ]
        rollout_id = rollout_id or new_rollout_id()
        results = await self._run_units(rollout_id, list(enumerate(requests)), stop)
        for g, outputs in enumerate(results):
            singles = sample_requests(requests[g])
            groups[g]["samples"] = [
                make_sample(g, j, singles[j], out) for j, out in enumerate(outputs)
            ]
        return summarize(rollout_id, groups)

    async def resume(
        self, partial: dict[str, Any], stop: StopRule, rollout_id: str | None = None
    ) -> dict[str, Any]:
        """Continue every cut sample of ``partial`` (see ``RolloutDriver.resume_partial``)."""
        groups = copy.deepcopy(partial["groups"])
        units: list[Unit] = []
        where: list[tuple[int, int]] = []
        for gi, group in enumerate(groups):
            for si, sample in enumerate(group["samples"]):
                request = continuation(sample)
                if request is not None:
                    units.append((gi, request))
                    where.append((gi, si))
        rollout_id = rollout_id or new_rollout_id()
        results = await self._run_units(rollout_id, units, stop)
        for (gi, si), outputs in zip(where, results):
            groups[gi]["samples"][si] = merge(groups[gi]["samples"][si], outputs[0])
        return summarize(rollout_id, groups)

    async def _run_units(
        self, rollout_id: str, units: list[Unit], stop: StopRule
    ) -> list[list[dict]]:
        """Run the units (one engine call each) as one rollout until ``stop``. Outputs per
        unit, in order."""
        groups = []
        for k, (_, unit) in enumerate(units):
            request = GenerateRequest(**unit)
            groups.append(PromptGroup.of(k, request, request.items()[0]))

        def until(rollout: Rollout, tasks: list[asyncio.Task]):
            return self._wait_or_stop(rollout, units, tasks, stop)

        return await self._runner.run(rollout_id, groups, until)

    async def _wait_or_stop(
        self, rollout: Rollout, units: list[Unit], tasks: list[asyncio.Task], stop: StopRule
    ) -> None:
        deadline_s, min_groups = stop.deadline_s, stop.min_groups
        left: dict[int, int] = {}
        for group, _ in units:
            left[group] = left.get(group, 0) + 1
        clean = dict.fromkeys(left, True)  # no unit of the group came back cut short
        unit_of = {task: k for k, task in enumerate(tasks)}
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        pending, finished, stopping = set(tasks), 0, False
        while pending:
            if stopping:
                timeout = _REABORT_S
            else:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                group = units[unit_of[task]][0]
                outputs = task.result()  # raises the unit's error (handled by the runner)
                left[group] -= 1
                clean[group] &= all(is_done(o) for o in outputs)
                finished += left[group] == 0 and clean[group]
            past_deadline = deadline is not None and time.monotonic() >= deadline
            stopping = (
                stopping or past_deadline or (min_groups is not None and finished >= min_groups)
            )
            if stopping and pending:
                self._runner.abort(rollout)
