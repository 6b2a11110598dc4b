"""Turns a ``GenerateRequest`` into validated ``Request``s and tracks which ids are in flight.

Validation is all-or-nothing for a batch: every prompt, sampling dict and flag is checked (and
tokenized) before any request exists, so a bad item raises ``InvalidRequestError`` naming the
field and value and nothing is queued. One call may expand to at most
``EngineConfig.max_requests_per_call`` requests (batch size x ``n``); the count is checked before
the prompts are tokenized or any request is built, so an oversized call fails at once.
"""

from __future__ import annotations

import itertools
import random
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine_core.config import DEFAULT_MAX_REQUESTS_PER_CALL
from engine_core.errors import InvalidRequestError
from engine_core.requests.generate_request import GenerateItem, GenerateRequest
from engine_core.requests.item_checks import (
    check_ids,
    check_logprob_args,
    check_request_count,
    check_rid,
    check_salt,
    max_prompt_chars,
)
from engine_core.requests.request import Request
from engine_core.requests.sampling_params import SamplingParams
from engine_core.scheduling.page_pool import PagePool, pages_needed

_GOLDEN = 0x9E3779B97F4A7C15  # mixes a sample index into a seed


@dataclass
class SeqSpec:
    """One prompt after validation; ``n`` samples of it become ``n`` requests."""

    prompt_ids: list[int]
    params: SamplingParams
    rid: str | None
    return_logprob: bool
    logprob_start_len: int
    top_logprobs_num: int
    token_ids_logprob: list[int] | None = None
    return_hidden_states: bool = False
    cache_salt: str | None = None


class RequestFactory:
    """Builds requests for one engine; owns the unseeded-request RNG and the in-flight ids."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        context_length: int,
        pool: PagePool,
        seed: int,
        max_requests_per_call: int = DEFAULT_MAX_REQUESTS_PER_CALL,
        hidden_states_enabled: bool = False,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.pool = pool
        self.max_requests_per_call = max_requests_per_call
        self.hidden_states_enabled = hidden_states_enabled
        self.max_prompt_chars = max_prompt_chars(tokenizer, context_length)
        self._rng = random.Random(seed)
        self._arrival = itertools.count()
        self._lock = threading.Lock()
        self._active: set[str] = set()

    def release(self, rids: Iterable[str]) -> None:
        """Forget finished (or never submitted) ids so they can be reused."""
        with self._lock:
            self._active.difference_update(rids)

    def build(self, request: GenerateRequest) -> tuple[list[Request], bool]:
        """Validate everything, then create one request per sample; returns (requests, batch?)."""
        batch = request.batch_size
        field = "prompt" if request.is_text else "input_ids"
        limit = self.max_requests_per_call
        check_request_count(batch or 1, limit, field, f"<{batch} prompts>")
        items = request.items()
        sps = _sampling_params(items)
        total = sum(sp.n for sp in sps)  # checked before anything is tokenized or built
        count_field = "sampling_params.n" if batch is None else f"{field} x sampling_params.n"
        check_request_count(total, limit, count_field, total)
        specs = [self._spec(item, sp, field) for item, sp in zip(items, sps)]
        return self._expand(specs), batch is not None

    def _check_hidden_states(self, value: Any, where: str) -> bool:
        """SGLang refuses ``return_hidden_states`` unless the server enables it."""
        field = f"return_hidden_states{where}"
        if not isinstance(value, bool):
            raise InvalidRequestError(field, value, "must be a bool")
        if value and not self.hidden_states_enabled:
            raise InvalidRequestError(
                field,
                value,
                "the engine is not configured to return hidden states; construct it with "
                "enable_return_hidden_states=True",
            )
        return value

    def _spec(self, item: GenerateItem, sp: SamplingParams, field: str) -> SeqSpec:
        where = item.where
        ids = self._tokenize(item.input, f"{field}{where}")
        check_logprob_args(
            item.return_logprob,
            item.logprob_start_len,
            item.top_logprobs_num,
            "",
            self.vocab_size,
        )
        check_rid(item.rid, f"rid{where}")
        token_ids = item.token_ids_logprob
        if token_ids is not None:
            token_ids = check_ids(token_ids, f"token_ids_logprob{where}", self.vocab_size)
        asked = isinstance(item.sampling_params, dict) and (
            item.sampling_params.get("max_new_tokens") is not None
        )
        self._check_fits(ids, sp, where, asked)
        self._check_text_stops(sp, where)
        return SeqSpec(
            ids,
            sp,
            item.rid,
            item.return_logprob,
            item.logprob_start_len,
            item.top_logprobs_num,
            list(token_ids) if token_ids is not None else None,
            self._check_hidden_states(item.return_hidden_states, where),
            check_salt(item.cache_salt, f"cache_salt{where}"),
        )

    def _tokenize(self, item: Any, field: str) -> list[int]:
        if isinstance(item, str):
            if not item:
                raise InvalidRequestError(field, item, "empty prompt")
            if self.tokenizer is None:
                raise InvalidRequestError(
                    field, item, "text prompts need a tokenizer; pass input_ids"
                )
            self._check_text(item, field)
            item = self.tokenizer.encode(item)
        return check_ids(item, field, self.vocab_size)

    def _check_text(self, text: str, field: str) -> None:
        """Refuse, before tokenizing it, text that cannot be a prompt: too long for the context
        whatever its tokens (tokenizing megabytes takes seconds), or not encodable."""
        if len(text) > self.max_prompt_chars:
            raise InvalidRequestError(
                field,
                f"<{len(text)} characters>",
                f"longer than any prompt of at most {self.context_length} tokens "
                f"({self.max_prompt_chars} characters)",
            )
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                reason = f"not valid Unicode text ({exc.reason})"
                raise InvalidRequestError(field, text, reason) from None

    def _check_fits(self, ids: list[int], sp: SamplingParams, where: str, asked: bool) -> None:
        """SGLang's length rules (``allow_auto_truncate=False``): the prompt must be shorter
        than the context, and prompt + ``max_new_tokens`` too when the caller gave it (the
        default is clipped to the context instead). Then the KV cache must hold it."""
        ctx = self.context_length
        if len(ids) >= ctx:
            raise InvalidRequestError(
                f"prompt{where}",
                f"<{len(ids)} tokens>",
                f"not shorter than the context length {ctx}",
            )
        if asked and len(ids) + sp.max_new_tokens >= ctx:
            raise InvalidRequestError(
                f"sampling_params{where}.max_new_tokens",
                sp.max_new_tokens,
                f"{len(ids)} prompt tokens + {sp.max_new_tokens} new ones reach the context "
                f"length {ctx}",
            )
        need = len(ids) + min(sp.max_new_tokens, self.context_length - len(ids))
        if pages_needed(need, self.pool.page_size) > self.pool.num_pages:
            raise InvalidRequestError(
                f"sampling_params{where}.max_new_tokens",
                sp.max_new_tokens,
                f"prompt + output need {need} tokens of KV cache, but it holds only "
                f"{self.pool.capacity_tokens}",
            )

    def _check_text_stops(self, sp: SamplingParams, where: str) -> None:
        """Stop strings and regexes match decoded text: without a tokenizer they raise, as in
        SGLang (``min_new_tokens`` works here: the EOS ids come from the model's config)."""
        if self.tokenizer is not None:
            return
        for key in ("stop", "stop_regex"):
            if getattr(sp, key):
                raise InvalidRequestError(
                    f"sampling_params{where}.{key}",
                    getattr(sp, key),
                    "needs a tokenizer to decode the output (skip_tokenizer_init=True)",
                )

    def _expand(self, specs: list[SeqSpec]) -> list[Request]:
        reqs = []
        for spec in specs:
            base = spec.rid if spec.rid is not None else uuid.uuid4().hex
            for i in range(spec.params.n):
                rid = base if spec.params.n == 1 else f"{base}-{i}"
                reqs.append(self._new_request(spec, rid, i))
        rids = [r.rid for r in reqs]
        with self._lock:
            clash = next((r for r in rids if r in self._active), None)
            if clash is not None or len(set(rids)) != len(rids):
                raise InvalidRequestError("rid", clash or rids, "duplicates a request in flight")
            self._active.update(rids)
        return reqs

    def _new_request(self, spec: SeqSpec, rid: str, index: int) -> Request:
        sp = spec.params
        if sp.sampling_seed is None:
            seed = self._rng.getrandbits(63)
        else:
            seed = (sp.sampling_seed + index * _GOLDEN) % (1 << 63)
        req = Request(
            rid=rid,
            prompt_ids=list(spec.prompt_ids),
            params=sp,
            seed=seed,
            arrival=next(self._arrival),
            return_logprob=spec.return_logprob,
            logprob_start_len=spec.logprob_start_len,
            top_logprobs_num=spec.top_logprobs_num,
            token_ids_logprob=spec.token_ids_logprob if spec.return_logprob else None,
            max_new_tokens=min(sp.max_new_tokens, self.context_length - len(spec.prompt_ids)),
            return_hidden_states=spec.return_hidden_states,
            cache_salt=spec.cache_salt,
        )
        if req.return_logprob and req.input_logprob_start == 0:
            req.input_logprobs.append(None)  # the first token has no context to score it
            req.input_top_logprobs.append(None)
            req.input_token_ids_logprobs.append(None)
        return req


def _sampling_params(items: list[GenerateItem]) -> list[SamplingParams]:
    """Each item's validated SamplingParams. A dict broadcast to every prompt is validated
    once and its SamplingParams shared (as the ``n`` samples of a prompt share one): a batch of
    thousands with one dict costs one validation."""
    done: dict[int, SamplingParams] = {}
    out = []
    for item in items:
        key = id(item.sampling_params)
        if key not in done:
            done[key] = SamplingParams.from_dict(
                item.sampling_params, f"sampling_params{item.where}"
            )
        out.append(done[key])
    return out
