"""Partial rollouts: stop a rollout early, keep what was generated, continue it later.

A rollout stops at a deadline or once K of its N prompt groups finished: the driver aborts the
requests still in flight, and each engine returns their partial outputs (tokens, logprobs,
per-token weight versions so far; finish_reason ``abort``). A stopped sample continues later,
typically after a refit, as a new request: ``input_ids`` = prompt + its output so far,
``max_new_tokens`` reduced by what it has, ``n=1`` with the sample's own seed. The sampler
draws from (seed, position) with position = tokens before the sampled one, so a seeded (or
greedy) sample continued on unchanged weights draws exactly what it would have drawn
uninterrupted; in deterministic mode its logprobs match bitwise too (the prefix is recomputed
in one prefill, which deterministic mode makes batch- and chunking-invariant).

Samples are plain dicts (Ray-serializable): an engine output (``text``, ``output_ids``,
``meta_info``) plus ``group`` and ``sample`` (indices) and ``request`` (what this one sample
was asked: ``input_ids``, ``sampling_params`` with n=1 and its seed, logprob options). Merged
outputs concatenate ``output_ids``, ``text``, ``weight_versions`` and the output logprobs, and
count ``meta_info.num_resumes``. Limits: prompts must be token ids (the driver has no
tokenizer); a stop *string* spanning the cut is not seen (stop token ids are); the engine's
random seed of an unseeded sample is not known here, so only seeded samples reproduce.

This module imports neither Ray nor torch: the driver (``RolloutDriver``, via
``rollout.partial_rollouts.PartialRollouts``) and plain-engine users share it.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from engine_core.requests.generate_request import GenerateItem, GenerateRequest
from engine_core.requests.sampling_params import SamplingParams

GOLDEN = 0x9E3779B97F4A7C15  # engine_core's per-sample seed stride (RequestFactory)
_DEFAULT_MAX_NEW = SamplingParams.max_new_tokens  # the engine's default

# ``GenerateRequest``'s arguments that a partial rollout takes: token ids only (no ``prompt``),
# no ``rid`` (the driver names requests), no ``stream``; ``input_ids`` first and required.
_PARAMETERS = [
    inspect.Parameter(
        f.name,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=inspect.Parameter.empty if f.name == "input_ids" else f.default,
    )
    for f in dataclasses.fields(GenerateRequest)
    if f.name not in ("prompt", "rid", "stream")
]
_SIGNATURE = inspect.Signature(_PARAMETERS)


def partial_request(*args: Any, **kwargs: Any) -> GenerateRequest:
    """The ``GenerateRequest`` of a partial rollout from its arguments (``input_ids``,
    ``sampling_params``, logprob options); anything else is a TypeError."""
    return GenerateRequest(**_SIGNATURE.bind(*args, **kwargs).arguments)


def takes_partial_request(fn: Callable) -> Callable:
    """Give a ``(*args, **kwargs)`` method ``partial_request``'s arguments as its signature
    (``help()``, and the arguments Ray checks), plus its own keyword-only ones."""
    own = inspect.signature(fn).parameters.values()
    extra = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    fn.__signature__ = inspect.Signature([self, *_PARAMETERS, *extra])  # type: ignore[attr-defined]
    return fn


def item_request(item: GenerateItem) -> dict[str, Any]:
    """One prompt's ``request`` (the sample contract above) from a request's item."""
    params = item.sampling_params or {}
    return {
        "input_ids": list(item.input),
        "sampling_params": dict(params) if isinstance(params, dict) else params,
        "return_logprob": item.return_logprob,
        "logprob_start_len": item.logprob_start_len,
        "top_logprobs_num": item.top_logprobs_num,
    }


def sample_seed(sampling_seed: int | None, index: int) -> int | None:
    """The seed the engine gives sample ``index`` of a request seeded ``sampling_seed``."""
    if sampling_seed is None:
        return None
    return (sampling_seed + index * GOLDEN) % (1 << 63)


def sample_requests(request: dict[str, Any]) -> list[dict[str, Any]]:
    """Split one prompt's request (``input_ids``, ``sampling_params`` with ``n``, logprob
    options) into its ``n`` single-sample requests, each with that sample's seed."""
    params = dict(request.get("sampling_params") or {})
    n = params.pop("n", 1)
    out = []
    for i in range(n):
        one = dict(request, sampling_params=dict(params, n=1))
        if params.get("sampling_seed") is not None:
            one["sampling_params"]["sampling_seed"] = sample_seed(params["sampling_seed"], i)
        out.append(one)
    return out


def make_sample(group: int, index: int, request: dict[str, Any], output: dict) -> dict:
    """A sample dict: ``output`` plus where it belongs and what it was asked."""
    return dict(output, group=group, sample=index, request=request)


def is_done(sample: dict[str, Any]) -> bool:
    """Finished for good (stop/length); False while it was cut short (finish_reason abort)."""
    reason = sample["meta_info"].get("finish_reason") or {}
    return reason.get("type") != "abort"


def remaining_tokens(sample: dict[str, Any]) -> int:
    params = sample["request"].get("sampling_params") or {}
    return params.get("max_new_tokens", _DEFAULT_MAX_NEW) - len(sample["output_ids"])


def continuation(sample: dict[str, Any]) -> dict[str, Any] | None:
    """The engine request that continues ``sample`` (kwargs of ``generate`` for one prompt), or
    None when it is done. Without output yet it is the original request."""
    if is_done(sample):
        return None
    request = sample["request"]
    if not sample["output_ids"]:
        return copy.deepcopy(request)
    params = dict(request.get("sampling_params") or {}, n=1)
    params["max_new_tokens"] = remaining_tokens(sample)
    return {
        "input_ids": list(request["input_ids"]) + list(sample["output_ids"]),
        "sampling_params": params,
        "return_logprob": request.get("return_logprob", False),
        # The prompt's logprobs came with the first part (its prefill ran before any token).
        "logprob_start_len": -1,
        "top_logprobs_num": request.get("top_logprobs_num", 0),
    }


_CONCAT = ("weight_versions", "output_token_logprobs", "output_top_logprobs")


def merge(sample: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
    """``sample`` continued by ``output`` (the result of its ``continuation``): one sample as if
    generated in one go, except that ``weight_versions`` show where weights changed."""
    old = sample["meta_info"]
    resumes = old.get("num_resumes", 0) + 1
    if not sample["output_ids"]:  # it was resubmitted whole
        meta = dict(output["meta_info"], num_resumes=resumes)
        return dict(
            sample, text=output["text"], output_ids=list(output["output_ids"]), meta_info=meta
        )
    new = output["meta_info"]
    meta = dict(new)
    for key in ("prompt_tokens", "input_token_logprobs", "input_top_logprobs"):
        if key in old:
            meta[key] = old[key]
    for key in _CONCAT:
        if key in old or key in new:
            meta[key] = list(old.get(key, [])) + list(new.get(key, []))
    meta["completion_tokens"] = old["completion_tokens"] + new["completion_tokens"]
    meta["num_resumes"] = resumes
    meta["ids"] = list(old.get("ids", [old.get("id")])) + [new.get("id")]
    return dict(
        sample,
        text=sample["text"] + output["text"],
        output_ids=list(sample["output_ids"]) + list(output["output_ids"]),
        meta_info=meta,
    )


def group_done(group: dict[str, Any]) -> bool:
    return all(is_done(s) for s in group["samples"])


def summarize(rollout_id: str, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The result of a partial rollout: every group (in input order) with ``done`` set."""
    for group in groups:
        group["done"] = group_done(group)
    finished = sum(g["done"] for g in groups)
    return {
        "rollout_id": rollout_id,
        "groups": groups,
        "finished_groups": finished,
        "partial_groups": len(groups) - finished,
    }
