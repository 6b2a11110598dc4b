"""``RolloutDriver``'s partial-rollout methods (see ``rollout.partial`` for the contract).

``generate_partial`` rolls out prompt groups like ``generate`` but stops at ``deadline_s`` or
once ``min_groups`` groups finished, returning every group with its samples, finished or cut
short. ``resume_partial`` continues the cut samples of such a result (typically after a refit)
and returns the same shape, so a rollout can be stopped and resumed any number of times.

Stopping aborts the rollout's requests on their engines (only these: other rollouts keep
going) and repeats the abort until every call returned, since an abort can overtake its
request on the way to the engine.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from typing import Any

from rollout.batch import Rollout, per_item_args
from rollout.partial import continuation, make_sample, merge, sample_requests, summarize

_REABORT_S = 0.1  # how often a stopping rollout re-sends aborts to calls still out


class PartialRolloutMixin:
    """Mixed into ``RolloutDriver``; uses its ``_items``, ``_group``, ``_run``, ``_remember``
    and ``_abort``."""

    async def generate_partial(
        self,
        input_ids,
        sampling_params=None,
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        deadline_s: float | None = None,
        min_groups: int | None = None,
        rollout_id: str | None = None,
    ) -> dict[str, Any]:
        """Roll out ``input_ids`` (one prompt or a batch; token ids only), stopping at
        ``deadline_s`` seconds or once ``min_groups`` groups (a prompt's ``n`` samples) all
        finished. Returns ``{"rollout_id", "groups": [{"index", "done", "request", "samples"}],
        "finished_groups", "partial_groups"}``, groups in input order; each sample is an engine
        output plus ``group``, ``sample``, ``request`` (``rollout.partial``)."""

        items, _ = self._items(None, input_ids)
        batch = len(items)
        params, flags = per_item_args(
            batch, sampling_params, return_logprob, logprob_start_len, top_logprobs_num
        )
        requests = [
            {
                "input_ids": list(items[i]),
                "sampling_params": dict(params[i] or {}),
                "return_logprob": flags[0][i],
                "logprob_start_len": flags[1][i],
                "top_logprobs_num": flags[2][i],
            }
            for i in range(batch)
        ]
        groups: list[dict[str, Any]] = [
            {"index": i, "request": r, "samples": []} for i, r in enumerate(requests)
        ]
        rollout_id = rollout_id or uuid.uuid4().hex[:12]
        results = await self._run_units(
            rollout_id, list(enumerate(requests)), deadline_s, min_groups
        )
        for g, outputs in enumerate(results):
            singles = sample_requests(requests[g])
            groups[g]["samples"] = [
                make_sample(g, j, singles[j], out) for j, out in enumerate(outputs)
            ]
        return summarize(rollout_id, groups)

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
        groups = copy.deepcopy(partial["groups"])
        units: list[tuple[int, dict[str, Any]]] = []
        where: list[tuple[int, int]] = []
        for gi, group in enumerate(groups):
            for si, sample in enumerate(group["samples"]):
                request = continuation(sample)
                if request is not None:
                    units.append((gi, request))
                    where.append((gi, si))
        rollout_id = rollout_id or uuid.uuid4().hex[:12]
        results = await self._run_units(rollout_id, units, deadline_s, min_groups)
        for (gi, si), outputs in zip(where, results):
            groups[gi]["samples"][si] = merge(groups[gi]["samples"][si], outputs[0])
        return summarize(rollout_id, groups)

    async def _run_units(
        self,
        rollout_id: str,
        units: list[tuple[int, dict[str, Any]]],
        deadline_s: float | None,
        min_groups: int | None,
    ) -> list[list[dict]]:
        """Run ``(group, request)`` units (one engine call each, through ``_run``, so dead
        engines are handled as in ``generate``); stop as asked. Outputs per unit, in order."""

        if min_groups is not None and (not isinstance(min_groups, int) or min_groups < 1):
            raise ValueError(f"invalid min_groups={min_groups!r}: must be a positive int")
        infos = [
            self._group(k, req["input_ids"], req["sampling_params"], False)
            for k, (_, req) in enumerate(units)
        ]
        rollout = Rollout(rollout_id, len(units), sum(i.n for i in infos))
        self._remember(rollout)
        calls = [
            {
                "input_ids": [req["input_ids"]],
                "sampling_params": [req["sampling_params"]],
                "return_logprob": [req.get("return_logprob", False)],
                "logprob_start_len": [req.get("logprob_start_len", -1)],
                "top_logprobs_num": [req.get("top_logprobs_num", 0)],
            }
            for _, req in units
        ]
        tasks = [asyncio.ensure_future(self._run(i, c, rollout)) for i, c in zip(infos, calls)]
        try:
            await self._wait_or_stop(rollout, units, tasks, deadline_s, min_groups)
        except BaseException as exc:
            rollout.error = f"{type(exc).__name__}: {exc}"
            for task in tasks:
                task.cancel()
            self._abort(rollout)
            raise
        finally:
            rollout.ended = time.monotonic()
        return [task.result() for task in tasks]

    async def _wait_or_stop(self, rollout, units, tasks, deadline_s, min_groups) -> None:
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
                outputs = task.result()  # raises the unit's error (handled by the caller)
                left[group] -= 1
                clean[group] &= all(
                    (o["meta_info"].get("finish_reason") or {}).get("type") != "abort"
                    for o in outputs
                )
                finished += left[group] == 0 and clean[group]
            past_deadline = deadline is not None and time.monotonic() >= deadline
            stopping = (
                stopping or past_deadline or (min_groups is not None and finished >= min_groups)
            )
            if stopping and pending:
                self._abort(rollout)
