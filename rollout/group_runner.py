"""``GroupRunner``: runs a rollout's prompt groups on the engines, and keeps its progress.

A rollout is cut into prompt groups (one prompt with its ``n`` samples); the engine table's
policy picks one engine per group, so the samples of a prompt share that engine's prefix cache.
Each group is one asyncio task and one engine call, ``request.for_items([item], rids=[rid])``
(``rid``: the caller's, held unique by ``rollout.caller_rids``, else the driver's): when the
call fails with ``RayActorError`` (the engine died), the task marks the engine down and re-sends
the group to a live engine (under a fresh driver rid, or the caller's own), so every group's
result is recorded exactly once. ``generate`` (whole rollouts) and ``PartialRollouts`` both run
on it.

Pure asyncio over Ray handles; no torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError

from engine_core.errors import InvalidRequestError
from engine_core.requests.generate_request import GenerateItem, GenerateRequest, per_item
from engine_core.requests.sampling_params import SamplingParams
from rollout.caller_rids import CallerRids
from rollout.engine_table import EngineTable
from rollout.policies import GroupInfo
from rollout.routing.prompt_tokens import PromptTokens
from rollout.routing.sessions import session_key

_KEEP_PROGRESS = 32  # finished rollouts whose progress stays queryable
_DEFAULT_MAX_NEW = SamplingParams.max_new_tokens  # the engine's default


def new_rollout_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class PromptGroup:
    """One prompt of a request with its ``n`` samples: what the policy sees (``info``) and
    the item of ``request`` it is sent as."""

    info: GroupInfo
    request: GenerateRequest
    item: GenerateItem

    @classmethod
    def of(
        cls,
        index: int,
        request: GenerateRequest,
        item: GenerateItem,
        token_ids: tuple[int, ...] | None = None,
        session_id: object = None,
    ) -> PromptGroup:
        """Group ``index`` of a rollout, with the driver's estimate of the KV tokens it holds
        (a text prompt's ``token_ids`` when the driver tokenized it, else ~4 chars/token) and
        its session key (``session_id``, else the item's rid: ``rollout.routing.sessions``)."""
        params = {} if item.sampling_params is None else item.sampling_params
        if not isinstance(params, dict):
            raise InvalidRequestError(f"sampling_params[{index}]", params, "must be a dict")
        n = params.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidRequestError(f"sampling_params[{index}].n", n, "must be a positive int")
        text = request.is_text
        if not text:
            token_ids = tuple(item.input)
        prompt_tokens = len(token_ids) if token_ids is not None else len(item.input) // 4 + 1
        new_tokens = params.get("max_new_tokens", _DEFAULT_MAX_NEW)
        new_tokens = new_tokens if isinstance(new_tokens, int) else _DEFAULT_MAX_NEW
        info = GroupInfo(
            index=index,
            prompt=item.input if text else None,
            input_ids=token_ids,
            n=n,
            est_tokens=prompt_tokens + n * new_tokens,
            session_key=session_key(session_id, item.rid),
            cache_salt=item.cache_salt if isinstance(item.cache_salt, str) else None,
        )
        return cls(info, request, item)

    def call(self, rid: str) -> GenerateRequest:
        """The engine request of this group (a batch of one prompt) under request id ``rid``."""
        return self.request.for_items([self.item], rids=[rid])


class Rollout:
    """Book-keeping of one rollout (progress and in-flight requests)."""

    def __init__(self, rollout_id: str, groups: int, samples: int) -> None:
        self.id = rollout_id
        self.total_groups = groups
        self.total_samples = samples
        self.finished_groups = 0
        self.finished_samples = 0
        self.completion_tokens = 0
        self.resent_groups = 0
        self.started = time.monotonic()
        self.ended: float | None = None
        self.error: str | None = None
        self.inflight: dict[int, tuple[int, str, int]] = {}  # group -> (engine, rid, n)

    def record(self, engine_index: int, outputs: list[dict]) -> None:
        """A group finished on ``engine_index``: tag its outputs and count them."""
        for out in outputs:
            out["meta_info"]["engine_index"] = engine_index
        self.finished_groups += 1
        self.finished_samples += len(outputs)
        self.completion_tokens += sum(o["meta_info"]["completion_tokens"] for o in outputs)

    def snapshot(self) -> dict[str, Any]:
        elapsed = (self.ended or time.monotonic()) - self.started
        return {
            "rollout_id": self.id,
            "finished_samples": self.finished_samples,
            "total_samples": self.total_samples,
            "finished_groups": self.finished_groups,
            "total_groups": self.total_groups,
            "completion_tokens": self.completion_tokens,
            "resent_groups": self.resent_groups,
            "elapsed_s": elapsed,
            "tokens_per_s": self.completion_tokens / elapsed if elapsed > 0 else 0.0,
            "done": self.ended is not None,
            "error": self.error,
        }


Until = Callable[[Rollout, list[asyncio.Task]], Awaitable[Any]]


class GroupRunner:
    """Runs prompt groups on ``engines`` (the driver's table); owns the rollouts' progress.
    ``tokens`` tokenizes text prompts for a policy that ``needs_token_ids``."""

    def __init__(self, engines: EngineTable, tokens: PromptTokens | None = None) -> None:
        self._engines = engines
        self._tokens = tokens
        self._rollouts: dict[str, Rollout] = {}
        self._caller_rids = CallerRids()

    def progress(self, rollout_id: str | None = None) -> dict[str, Any] | None:
        """Counts, tokens and tok/s of a rollout (default: the latest one); None if unknown."""
        if rollout_id is None:
            rollout_id = next(reversed(self._rollouts), None)
        rollout = self._rollouts.get(rollout_id) if rollout_id else None
        return rollout.snapshot() if rollout else None

    async def generate(self, request: GenerateRequest, rollout_id: str | None = None):
        """A whole rollout of ``request``: a dict for one prompt (a list if n > 1), a list in
        input order for a batch, the n samples of prompt i adjacent."""
        if request.stream:
            raise InvalidRequestError(
                "stream", True, "a rollout returns one value; stream from one EngineActor"
            )
        groups = self._groups(request)
        with self._caller_rids.claimed([g.item for g in groups]):
            results = await self.run(rollout_id or new_rollout_id(), groups)
        outputs = [out for group in results for out in group]
        return outputs if request.batch_size is not None or len(outputs) > 1 else outputs[0]

    def _groups(self, request: GenerateRequest) -> list[PromptGroup]:
        """One group per prompt; text is tokenized here only for a policy that routes by
        tokens. ``session_id``: one for every prompt, or a list of one per prompt."""
        items = request.items()
        sessions = per_item(request.session_id, request.batch_size, "session_id")
        for item, session in zip(items, sessions):
            if session is not None and not isinstance(session, str):
                raise InvalidRequestError(
                    f"session_id{item.where}", session, "must be a str (or None)"
                )
        tokenize = (
            request.is_text and self._tokens is not None and self._engines.policy.needs_token_ids
        )
        return [
            PromptGroup.of(
                item.index,
                request,
                item,
                self._tokens.encode(item.input) if tokenize else None,
                session,
            )
            for item, session in zip(items, sessions)
        ]

    async def run(
        self, rollout_id: str, groups: list[PromptGroup], until: Until | None = None
    ) -> list[list[dict]]:
        """Run ``groups`` as rollout ``rollout_id`` until all returned (or ``until(rollout,
        tasks)`` returns); outputs per group, in order. On an error the rollout records it,
        its groups are cancelled and their requests aborted on the engines."""
        rollout = Rollout(rollout_id, len(groups), sum(g.info.n for g in groups))
        self._remember(rollout)
        await self._engines.refresh_routing()  # once per batch, not per routing decision
        tasks = [asyncio.ensure_future(self._serve(group, rollout)) for group in groups]
        try:
            await (until(rollout, tasks) if until is not None else asyncio.gather(*tasks))
        except BaseException as exc:
            rollout.error = f"{type(exc).__name__}: {exc}"
            for task in tasks:
                task.cancel()
            self.abort(rollout)
            raise
        finally:
            rollout.ended = time.monotonic()
        return [task.result() for task in tasks]

    async def stream(self, request: GenerateRequest) -> AsyncIterator[dict]:
        """Stream one prompt (n=1) from the engine the policy picks: its incremental chunks,
        each tagged with ``engine_index``. Not re-sent when the engine dies (chunks already
        went out): the stream raises instead."""
        session = request.session_id
        if session is not None and not isinstance(session, str):
            raise InvalidRequestError("session_id", session, "must be a str (or None)")
        group = PromptGroup.of(0, request, request.items()[0], session_id=session)
        if request.batch_size is not None or group.info.n != 1:
            raise InvalidRequestError("stream", True, "streaming takes one prompt with n=1")
        index = await self._engines.assign(group.info)
        try:
            call = dataclasses.replace(request, stream=False)
            async for ref in self._engines.engine(index).generate_stream.remote(call):
                chunk = await ref
                chunk["meta_info"]["engine_index"] = index
                yield chunk
        finally:
            self._engines.release(index, group.info)
        self._engines.finished(group.info, index)

    def _remember(self, rollout: Rollout) -> None:
        self._rollouts[rollout.id] = rollout
        while len(self._rollouts) > _KEEP_PROGRESS:
            self._rollouts.pop(next(iter(self._rollouts)))

    async def _serve(self, group: PromptGroup, rollout: Rollout) -> list[dict]:
        """Serve one group, re-sending it to a live engine each time its engine dies."""
        info, engines = group.info, self._engines
        attempt = 0
        while True:
            index = await engines.assign(info)
            rid = group.item.rid
            if rid is None:  # a fresh id per attempt: never clashes with a copy in flight
                rid = f"{rollout.id}-{info.index}" + (f".r{attempt}" if attempt else "")
            # (A caller's rid is kept on a re-send: the engine that had it is out of rotation.)
            rollout.inflight[info.index] = (index, rid, info.n)
            try:
                outputs = await engines.engine(index).generate.remote(group.call(rid))
            except RayActorError as exc:
                engines.mark_down(index, exc)
                rollout.resent_groups += 1
                attempt += 1
                continue
            finally:
                engines.release(index, info)
                rollout.inflight.pop(info.index, None)
            rollout.record(index, outputs)
            engines.finished(info, index)
            return outputs

    def abort(self, rollout: Rollout) -> None:
        """Best-effort abort of a rollout's requests still running on engines (only these)."""
        for index, rid, n in list(rollout.inflight.values()):
            sample_ids = [rid] if n == 1 else [f"{rid}-{i}" for i in range(n)]
            for sample_id in sample_ids:
                self._engines.engine(index).abort_request.remote(rid=sample_id)
