"""Turns ``generate`` arguments into validated ``Request``s and tracks which ids are in flight.

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
from typing import Any

from engine_core import inputs
from engine_core.config import DEFAULT_MAX_REQUESTS_PER_CALL
from engine_core.errors import InvalidRequestError
from engine_core.page_pool import PagePool, pages_needed
from engine_core.request import Request
from engine_core.sampling_params import SamplingParams

_GOLDEN = 0x9E3779B97F4A7C15  # mixes a sample index into a seed


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
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.pool = pool
        self.max_requests_per_call = max_requests_per_call
        self._rng = random.Random(seed)
        self._arrival = itertools.count()
        self._lock = threading.Lock()
        self._active: set[str] = set()

    def release(self, rids: Iterable[str]) -> None:
        """Forget finished (or never submitted) ids so they can be reused."""
        with self._lock:
            self._active.difference_update(rids)

    def build(
        self,
        prompt,
        input_ids,
        sampling_params,
        return_logprob,
        logprob_start_len,
        top_logprobs_num,
        rid,
    ) -> tuple[list[Request], bool]:
        """Validate everything, then create one request per sample; returns (requests, batch?)."""
        if inputs.looks_like_sampling_params(input_ids):
            # SGLang's positional order is (prompt, sampling_params, input_ids); accept it too.
            input_ids, sampling_params = sampling_params, input_ids
        batch = inputs.batch_size_of(prompt, input_ids)
        field = "prompt" if prompt is not None else "input_ids"
        limit = self.max_requests_per_call
        inputs.check_request_count(batch or 1, limit, field, f"<{batch} prompts>")
        prompts = inputs.per_item(prompt if prompt is not None else input_ids, batch, field)
        params = inputs.per_item(sampling_params, batch, "sampling_params")
        flags = [
            inputs.per_item(value, batch, name)
            for value, name in (
                (return_logprob, "return_logprob"),
                (logprob_start_len, "logprob_start_len"),
                (top_logprobs_num, "top_logprobs_num"),
                (rid, "rid"),
            )
        ]
        wheres = ["" if batch is None else f"[{i}]" for i in range(len(prompts))]
        sps = [SamplingParams.from_dict(p, f"sampling_params{w}") for p, w in zip(params, wheres)]
        total = sum(sp.n for sp in sps)  # checked before anything is tokenized or built
        count_field = "sampling_params.n" if batch is None else f"{field} x sampling_params.n"
        inputs.check_request_count(total, limit, count_field, total)
        specs = []
        for i, item in enumerate(prompts):
            where, sp = wheres[i], sps[i]
            ids = self._tokenize(item, f"{field}{where}")
            inputs.check_logprob_args(flags[0][i], flags[1][i], flags[2][i], "", self.vocab_size)
            inputs.check_rid(flags[3][i], f"rid{where}")
            self._check_fits(ids, sp, where)
            specs.append(inputs.SeqSpec(ids, sp, flags[3][i], *[f[i] for f in flags[:3]]))
        return self._expand(specs), batch is not None

    def _tokenize(self, item: Any, field: str) -> list[int]:
        if isinstance(item, str):
            if not item:
                raise InvalidRequestError(field, item, "empty prompt")
            if self.tokenizer is None:
                raise InvalidRequestError(
                    field, item, "text prompts need a tokenizer; pass input_ids"
                )
            item = self.tokenizer.encode(item)
        return inputs.check_ids(item, field, self.vocab_size)

    def _check_fits(self, ids: list[int], sp: SamplingParams, where: str) -> None:
        if len(ids) > self.context_length:
            raise InvalidRequestError(
                f"prompt{where}",
                f"<{len(ids)} tokens>",
                f"longer than the context length {self.context_length}",
            )
        need = len(ids) + min(sp.max_new_tokens, self.context_length - len(ids))
        if pages_needed(need, self.pool.page_size) > self.pool.num_pages:
            raise InvalidRequestError(
                f"sampling_params{where}.max_new_tokens",
                sp.max_new_tokens,
                f"prompt + output need {need} tokens of KV cache, but it holds only "
                f"{self.pool.capacity_tokens}",
            )

    def _expand(self, specs: list[inputs.SeqSpec]) -> list[Request]:
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

    def _new_request(self, spec: inputs.SeqSpec, rid: str, index: int) -> Request:
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
            max_new_tokens=min(sp.max_new_tokens, self.context_length - len(spec.prompt_ids)),
        )
        if req.return_logprob and req.input_logprob_start == 0:
            req.input_logprobs.append(None)  # the first token has no context to score it
            req.input_top_logprobs.append(None)
        return req
