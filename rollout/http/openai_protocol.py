"""OpenAI request bodies (``/v1/completions``, ``/v1/chat/completions``) with SGLang's
extensions (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, ``skip_special_tokens``, ``rid``, ``chat_template_kwargs``,
``return_prompt_token_ids``, ``return_meta_info``; vLLM's ``return_token_ids``). Unknown
fields and wrong types are a 400 naming the field; OpenAI fields this engine cannot honour
are accepted only at their neutral value (``NEUTRAL``).

Numbers and flags are strict, as OpenAI's API: ``"0.5"`` or ``true`` for ``temperature`` is a
400 naming the field (an int is a float: JSON clients write ``1`` for ``1.0``). OpenAI's
documented ranges are checked here (``temperature`` [0, 2], ``top_logprobs`` /
completions' ``logprobs`` [0, 20]); the engine's own ranges (``top_p``, penalties, ...) are
checked by ``openai_adapter`` under the OpenAI field's name."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

Temperature = Annotated[StrictFloat, Field(ge=0, le=2)]
TopLogprobs = Annotated[StrictInt, Field(ge=0, le=20)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str | None = None
    n: StrictInt = 1
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    temperature: Temperature | None = None
    top_p: StrictFloat | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: StrictFloat | None = 0.0
    presence_penalty: StrictFloat | None = 0.0
    logit_bias: dict[str, StrictFloat] | None = None
    # SGLang's extensions (``min_tokens`` is SGLang's ``min_new_tokens``)
    repetition_penalty: StrictFloat | None = 1.0
    min_tokens: StrictInt = 0
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    no_stop_trim: StrictBool = False
    rid: str | None = None
    return_prompt_token_ids: StrictBool = False
    return_token_ids: StrictBool = False
    return_meta_info: StrictBool = False


# OpenAI/SGLang fields this engine has no way to honour: only these values are accepted.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "no_stop_trim": (False,),
    "echo": (False,),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
}


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: TopLogprobs | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: handed to the template

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: StrictBool = False
    separate_reasoning: StrictBool = True
