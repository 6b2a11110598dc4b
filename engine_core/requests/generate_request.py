"""``GenerateRequest``: the arguments of one ``generate`` call, as one value.

Built once where a call enters (``Engine.generate``, ``EngineActor.generate``,
``RolloutService.generate``) and passed on as it is, so the SGLang argument list is written in
one place. ``items()`` is the one broadcast of per-prompt arguments: a scalar applies to every
prompt, a list gives one value per prompt. Pure Python (no torch): the Ray driver imports it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine_core.errors import InvalidRequestError


def _empty(value: Any) -> bool:
    """None, False, or a (nested) list of those: SGLang's "not given" for per-item args."""
    if isinstance(value, list):
        return all(_empty(v) for v in value)
    return value is None or value is False


def _dp_rank(value: Any) -> bool:
    # SGLang ignores rank 0 when dp_size is 1 and rejects any other rank as out of range.
    return value is None or (type(value) is int and value == 0)


# SGLang generate arguments this engine cannot honour: accepted while they ask for nothing
# (None / False / empty), else InvalidRequestError naming the field.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "image_data": (_empty, "text only"),
    "audio_data": (_empty, "text only"),
    "video_data": (_empty, "text only"),
    "mm_hashes": (_empty, "text only"),
    "mm_content_hashes": (_empty, "text only"),
    "lora_path": (_empty, "no LoRA"),
    "custom_logit_processor": (_empty, "no custom logit processors"),
    "require_reasoning": (_empty, "no reasoning models"),
    "return_routed_experts": (_empty, "no MoE models"),
    "bootstrap_host": (_empty, "no prefill/decode disaggregation"),
    "bootstrap_port": (_empty, "no prefill/decode disaggregation"),
    "bootstrap_room": (_empty, "no prefill/decode disaggregation"),
    "routed_dp_rank": (_dp_rank, "one data-parallel rank (dp_size 1): only 0"),
    "data_parallel_rank": (_dp_rank, "one data-parallel rank (dp_size 1): only 0"),
    "disagg_prefill_dp_rank": (_dp_rank, "no prefill/decode disaggregation"),
    "session_params": (_empty, "no sessions: send the whole prompt"),
}
# Accepted whatever their value, as SGLang's defaults treat them: priority without priority
# scheduling, trace headers without tracing; a session id routes in the service (the driver's
# cache_aware policy) and has no effect on one engine.
NO_EFFECT = (
    "routed_experts_start_len",
    "external_trace_header",
    "priority",
    "session_id",
    "kv_router_hint",
)


@dataclass
class GenerateRequest:
    """SGLang's ``generate`` arguments (``prompt`` or ``input_ids``, one or a batch).

    ``sampling_params``, ``return_logprob``, ``logprob_start_len``, ``top_logprobs_num`` and
    ``rid`` are one value for every prompt or a list of one per prompt; ``None`` means SGLang's
    default (``False`` / ``-1``: no prompt logprobs / ``0``). ``token_ids_logprob`` (with
    ``return_logprob``): token ids whose logprobs are reported at every position, one list for
    every prompt or a list of lists. SGLang's positional order ``(prompt, sampling_params,
    input_ids)`` is accepted too. SGLang's other arguments (``image_data``, ``lora_path``, ...)
    are accepted while they ask for nothing; a value raises ``InvalidRequestError`` naming the
    field (``UNSUPPORTED``).
    """

    prompt: Any = None
    input_ids: Any = None
    sampling_params: Any = None
    return_logprob: Any = False
    logprob_start_len: Any = None
    top_logprobs_num: Any = None
    rid: Any = None
    stream: bool = False
    image_data: Any = None
    audio_data: Any = None
    video_data: Any = None
    mm_hashes: Any = None
    mm_content_hashes: Any = None
    token_ids_logprob: Any = None
    lora_path: Any = None
    custom_logit_processor: Any = None
    require_reasoning: Any = False
    return_hidden_states: Any = False
    return_routed_experts: Any = False
    routed_experts_start_len: Any = 0
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    routed_dp_rank: Any = None
    disagg_prefill_dp_rank: Any = None
    data_parallel_rank: Any = None
    external_trace_header: Any = None
    session_params: Any = None
    priority: Any = None
    session_id: Any = None
    cache_salt: Any = None
    kv_router_hint: Any = None

    def __post_init__(self) -> None:
        if looks_like_sampling_params(self.input_ids):
            self.input_ids, self.sampling_params = self.sampling_params, self.input_ids
        if not isinstance(self.stream, bool):
            raise InvalidRequestError("stream", self.stream, "must be a bool")
        for name, (accepted, note) in UNSUPPORTED.items():
            value = getattr(self, name)
            if not accepted(value):
                raise InvalidRequestError(name, value, f"not supported by this engine: {note}")

    @classmethod
    def of(cls, *args: Any, **kwargs: Any) -> GenerateRequest:
        """From ``generate``'s arguments, or a ``GenerateRequest`` given as the only one.
        An unknown argument raises ``InvalidRequestError`` naming it."""
        if len(args) == 1 and not kwargs and isinstance(args[0], GenerateRequest):
            return args[0]
        known = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in known:
                raise InvalidRequestError(
                    key, kwargs[key], f"unknown argument; known: {sorted(known)}"
                )
        if len(args) > len(known):
            raise InvalidRequestError("args", args, f"at most {len(known)} positional arguments")
        return cls(*args, **kwargs)

    @property
    def is_text(self) -> bool:
        return self.prompt is not None

    @property
    def batch_size(self) -> int | None:
        """None for a single prompt, else the number of prompts."""
        prompt, input_ids = self.prompt, self.input_ids
        if (prompt is None) == (input_ids is None):
            raise InvalidRequestError(
                "prompt/input_ids",
                (prompt is not None, input_ids is not None),
                "give exactly one of prompt or input_ids",
            )
        if prompt is not None:
            if isinstance(prompt, str):
                return None
            if not isinstance(prompt, list) or not prompt:
                raise InvalidRequestError(
                    "prompt", prompt, "must be a non-empty str or list of str"
                )
            for i, item in enumerate(prompt):
                if not isinstance(item, str):
                    raise InvalidRequestError(
                        f"prompt[{i}]", item, "must be a str (token ids go in input_ids)"
                    )
            return len(prompt)
        if not isinstance(input_ids, list) or not input_ids:
            raise InvalidRequestError("input_ids", input_ids, "must be a non-empty list of ints")
        return len(input_ids) if isinstance(input_ids[0], list) else None

    def items(self) -> list[GenerateItem]:
        """One ``GenerateItem`` per prompt (validates the batch shape, not the values)."""
        batch = self.batch_size
        field = "prompt" if self.is_text else "input_ids"
        inputs = per_item(self.prompt if self.is_text else self.input_ids, batch, field)
        columns = [
            per_item(getattr(self, name), batch, name)
            for name in (
                "sampling_params",
                "return_logprob",
                "logprob_start_len",
                "top_logprobs_num",
                "rid",
            )
        ]
        hidden = per_item(self.return_hidden_states, batch, "return_hidden_states")
        salts = per_item(self.cache_salt, batch, "cache_salt")
        token_ids = token_ids_per_item(self.token_ids_logprob, batch)
        items = [
            GenerateItem(
                i,
                batch is not None,
                inputs[i],
                *(column[i] for column in columns),
                token_ids[i],
                hidden[i],
                salts[i],
            )
            for i in range(len(inputs))
        ]
        for item in items:  # SGLang's None: the defaults
            item.return_logprob = False if item.return_logprob is None else item.return_logprob
            item.logprob_start_len = (
                -1 if item.logprob_start_len is None else item.logprob_start_len
            )
            item.top_logprobs_num = 0 if item.top_logprobs_num is None else item.top_logprobs_num
        return items

    def for_items(self, items: list[GenerateItem], rids: list[str] | None = None):
        """A batch request of ``items`` only (e.g. one prompt group sent to one engine)."""
        return GenerateRequest(
            **{"prompt" if self.is_text else "input_ids": [item.input for item in items]},
            sampling_params=[item.sampling_params for item in items],
            return_logprob=[item.return_logprob for item in items],
            logprob_start_len=[item.logprob_start_len for item in items],
            top_logprobs_num=[item.top_logprobs_num for item in items],
            rid=rids if rids is not None else [item.rid for item in items],
            token_ids_logprob=[item.token_ids_logprob for item in items],
            return_hidden_states=[item.return_hidden_states for item in items],
            cache_salt=[item.cache_salt for item in items],
        )


@dataclass
class GenerateItem:
    """One prompt of a ``GenerateRequest`` with its own arguments (``where`` names it in
    errors: ``""`` for a single prompt, ``"[i]"`` in a batch)."""

    index: int
    in_batch: bool
    input: Any  # the prompt text or its token ids
    sampling_params: Any
    return_logprob: Any
    logprob_start_len: Any
    top_logprobs_num: Any
    rid: Any
    token_ids_logprob: Any = None
    return_hidden_states: Any = False
    cache_salt: Any = None

    @property
    def where(self) -> str:
        return f"[{self.index}]" if self.in_batch else ""


def looks_like_sampling_params(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def token_ids_per_item(value: Any, batch: int | None) -> list[Any]:
    """SGLang's broadcast of ``token_ids_logprob``: empty -> None; one id or one list of ids ->
    the same for every prompt; in a batch, a list of lists -> one per prompt."""
    if not value and not isinstance(value, int):
        return [None] * (batch or 1)
    if not isinstance(value, list):
        value = [value]
    if batch is not None and all(v is None or isinstance(v, list) for v in value):
        items = per_item(value, batch, "token_ids_logprob")
        return [ids if ids else None for ids in items]
    return [value] * (batch or 1)


def per_item(value: Any, batch: int | None, field: str) -> list[Any]:
    """Broadcast an argument to the batch (``batch`` None: one prompt), or check that a
    per-prompt list has one value per prompt."""
    if batch is None:
        return [value]
    if isinstance(value, list):
        if len(value) != batch:
            raise InvalidRequestError(
                field, value, f"has {len(value)} items for a batch of {batch}"
            )
        return value
    return [value] * batch


def takes_generate_request(fn: Callable) -> Callable:
    """Give a ``(*args, **kwargs)`` entry point ``GenerateRequest``'s signature (``help()``,
    ``inspect``), so the argument list is declared once."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default)
        for f in dataclasses.fields(GenerateRequest)
    ]
    extra = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    fn.__signature__ = inspect.Signature(params + extra)  # type: ignore[attr-defined]
    return fn
