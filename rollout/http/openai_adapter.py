"""OpenAI requests -> engine ``GenerateRequest``s.

Prompts are tokenized here (the tokenizer's chat template for chat, ``tokenizer.encode`` for a
text completion, exactly as the engine would) so the server can hand back the exact prompt ids
a trainer trains on. ``seed`` becomes ``sampling_seed``, ``max_tokens`` /
``max_completion_tokens`` ``max_new_tokens`` (None: the rest of the context, within the KV
cache), ``min_tokens`` ``min_new_tokens`` (as SGLang's ``serving_completions``), the penalties
the engine's penalties, ``logprobs`` / ``top_logprobs`` the engine's logprob arguments. The
params are validated here so a bad value is a 400 naming the OpenAI field."""

from __future__ import annotations

from typing import Any

from engine_core.errors import InvalidRequestError
from engine_core.requests.generate_request import GenerateRequest
from engine_core.requests.sampling_params import SamplingParams
from rollout.http.errors import HTTPError, bad_request
from rollout.http.openai_protocol import (
    NEUTRAL,
    ChatCompletionRequest,
    CompletionRequest,
)


def check_model(model: str | None, served: tuple[str, ...]) -> None:
    """A named model must be one this server serves (404 naming it, as SGLang's
    ``/v1/models/{model}``)."""
    if model is not None and model not in served:
        raise HTTPError(
            404,
            f"invalid model={model!r}: the model does not exist; served: {list(served)}",
            "model",
            "model_not_found",
        )


def check_neutral(req: Any) -> None:
    for name, allowed in NEUTRAL.items():
        if name in type(req).model_fields:
            value = getattr(req, name)
            if value not in allowed:
                raise bad_request(name, value, f"not supported by this engine; only {allowed}")


def completion_prompts(req: CompletionRequest, tokenizer: Any) -> list[list[int]]:
    """Every prompt of a completion request as token ids (a batch of one or more)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt", req.prompt, "empty prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    out = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            if not item:
                raise bad_request(f"prompt[{i}]", item, "empty prompt")
            if tokenizer is None:
                raise bad_request(f"prompt[{i}]", item, "text needs a tokenizer; send ids")
            item = tokenizer.encode(item)
        if not isinstance(item, list) or not item:
            raise bad_request(f"prompt[{i}]", item, "must be a non-empty str or list of ids")
        out.append(item)
    return out


def _text_content(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{j}]", part, "only text parts are supported")
        parts.append(part["text"])
    return "".join(parts)


# ``apply_chat_template`` arguments a client may not pass in ``chat_template_kwargs``: the server
# renders the template into one list of token ids itself, so keys that change what the call
# returns (tensors, dicts, masks, padding), the ones it sets from the request's own fields, and
# a replacement template (arbitrary code for the template engine) are refused.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "tokenize",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "padding",
        "truncation",
        "max_length",
        "tokenizer_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "tools",
    }
)


def check_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The client's ``chat_template_kwargs`` (template variables such as ``enable_thinking``);
    a reserved key is a 400 naming it."""
    for key in kwargs or {}:
        if key in RESERVED_TEMPLATE_KWARGS:
            raise bad_request(
                f"chat_template_kwargs.{key}",
                kwargs[key],
                "not a template variable: it changes how the server applies the template "
                f"(refused: {sorted(RESERVED_TEMPLATE_KWARGS)})",
            )
    return kwargs or {}


def chat_prompt(req: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    """The conversation through the tokenizer's chat template (generation prompt added, or the
    last assistant message continued with ``continue_final_message``). Blocking (tokenizes):
    call it off the event loop. Any failure of the template is a 400 naming
    ``chat_template_kwargs`` when the client gave some, else ``messages``."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise bad_request("messages", "<chat>", "the model's tokenizer has no chat template")
    kwargs = check_template_kwargs(req.chat_template_kwargs)
    messages = []
    for i, msg in enumerate(req.messages):
        row = msg.model_dump(exclude_none=True)
        row["content"] = _text_content(msg.content, f"messages[{i}]")
        messages.append(row)
    cont = req.continue_final_message and messages[-1]["role"] == "assistant"
    field, value = ("chat_template_kwargs", kwargs) if kwargs else ("messages", "<chat>")
    try:
        out = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=not cont,
            continue_final_message=cont,
            **kwargs,
        )
    except Exception as exc:  # jinja errors (roles the template refuses, bad variables)
        raise bad_request(field, value, f"the chat template failed on messages: {exc}") from None
    ids = _token_ids(out)
    if ids is None:
        raise bad_request(field, value, "the chat template did not give a list of token ids")
    if not ids:
        raise bad_request("messages", "<chat>", "the chat template produced an empty prompt")
    return ids


def _token_ids(out: Any) -> list[int] | None:
    """The ids ``apply_chat_template`` returned (a list, or a dict / ``BatchEncoding`` holding
    one); None for anything else."""
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    if not isinstance(out, list):
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in out):
        return None
    return out


def max_new_tokens(value: int | None, field: str, prompt_len: int, backend: Any) -> int:
    if value is None:  # OpenAI: until a stop or the end of the context
        # SGLang's rule: prompt + max_new_tokens stays below the context length.
        room = min(backend.context_length - 1, backend.kv_capacity) - prompt_len
        return max(room, 1)
    if value < 0:
        raise bad_request(field, value, "must be >= 0")
    return value


# engine sampling key -> the OpenAI field it comes from (where the names differ)
_OPENAI_NAME = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "sampling_seed": "seed",
}


def sampling_params(req: Any, max_new: int) -> dict[str, Any]:
    """The engine's sampling params of an OpenAI request; ``InvalidRequestError`` naming the
    OpenAI field (``min_tokens``, ``frequency_penalty``, ...) for an out-of-range value."""
    params: dict[str, Any] = {"max_new_tokens": max_new, "n": req.n}
    if req.n < 1:
        raise bad_request("n", req.n, "must be >= 1")
    for ours, value in (
        ("temperature", req.temperature),
        ("top_p", req.top_p),
        ("top_k", req.top_k),
        ("min_p", req.min_p),
        ("stop", req.stop),
        ("stop_token_ids", req.stop_token_ids),
        ("sampling_seed", req.seed),
        ("frequency_penalty", req.frequency_penalty),
        ("presence_penalty", req.presence_penalty),
        ("repetition_penalty", req.repetition_penalty),
        ("min_new_tokens", req.min_tokens),
    ):
        if value is not None:
            params[ours] = value
    params["ignore_eos"] = req.ignore_eos
    params["skip_special_tokens"] = req.skip_special_tokens
    _validate(params)
    return params


def _validate(params: dict[str, Any]) -> None:
    try:
        SamplingParams.from_dict(params, field_prefix="")
    except InvalidRequestError as exc:
        key = exc.field.lstrip(".")
        raise bad_request(_OPENAI_NAME.get(key, key), exc.value, exc.reason) from None


def generate_request(
    prompts: list[list[int]], params: dict[str, Any], top_logprobs: int | None, rid: Any = None
) -> GenerateRequest:
    """One engine call for every prompt (``top_logprobs`` None: no logprobs)."""
    want = top_logprobs is not None
    return GenerateRequest(
        input_ids=prompts,
        sampling_params=params,
        return_logprob=want,
        top_logprobs_num=top_logprobs or 0,
        rid=rid,
    )


def stream_requests(
    prompts: list[list[int]], params: dict[str, Any], top_logprobs: int | None, rid: str
) -> list[GenerateRequest]:
    """One n=1 request per (prompt, sample), choice index order (the engine streams one
    sample per request). Sample ``i`` of a seeded request gets ``seed + i``."""
    out = []
    n = params["n"]
    for p, ids in enumerate(prompts):
        for i in range(n):
            one = dict(params, n=1)
            if "sampling_seed" in params and n > 1:
                one["sampling_seed"] = params["sampling_seed"] + i
            out.append(
                GenerateRequest(
                    input_ids=ids,
                    sampling_params=one,
                    return_logprob=top_logprobs is not None,
                    top_logprobs_num=top_logprobs or 0,
                    rid=f"{rid}-{p * n + i}",
                )
            )
    return out
