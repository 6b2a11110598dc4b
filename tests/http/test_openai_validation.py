"""OpenAI routes refuse bad input at once with a 400 naming the OpenAI field the client sent:
wrong JSON types (strict, as OpenAI's API), OpenAI's ranges, ``n`` over the engine's per-call
bound (streamed too), ``chat_template_kwargs`` that would change what the template call
returns; the next request is served. Also ``/generate``'s ``session_id`` (SGLang: a str)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def body_for(path: str, **fields) -> dict:
    if path == CHAT:
        return {"messages": MESSAGES, "max_tokens": 2, **fields}
    return {"prompt": "hi", "max_tokens": 2, **fields}


def assert_400(response: httpx.Response, param: str, value: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["param"] == param, error
    assert param in error["message"] and value in error["message"], error


def assert_serving(client: httpx.Client) -> None:
    ok = client.post(CHAT, json=body_for(CHAT))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, ok.text


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("stream", [False, True])
def test_n_over_the_per_call_bound_is_an_immediate_400(client, path, stream):
    started = time.monotonic()
    response = client.post(path, json=body_for(path, max_tokens=1, n=200000, stream=stream))
    assert time.monotonic() - started < 5.0
    assert_400(response, "n", "200000")
    assert "max_requests_per_call=8192" in response.json()["message"]
    info = client.get("/get_server_info").json()
    assert info["num_running_requests"] == 0 and info["num_waiting_requests"] == 0
    assert_serving(client)


def test_a_batch_of_prompts_counts_against_the_bound(client):
    response = client.post(COMPLETIONS, json=body_for(COMPLETIONS, prompt=["a", "b"], n=5000))
    assert_400(response, "n", "5000")
    assert "2 prompt(s) x n = 10000" in response.json()["message"]


WRONG_TYPES = [
    ("temperature", "0.5"),
    ("temperature", True),
    ("top_p", "1"),
    ("min_p", "0.1"),
    ("frequency_penalty", "1"),
    ("presence_penalty", False),
    ("repetition_penalty", True),
]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("field, value", WRONG_TYPES)
def test_wrong_json_types_are_a_400_naming_the_field(client, path, field, value):
    assert_400(client.post(path, json=body_for(path, **{field: value})), field, repr(value))


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_an_int_is_a_float(client, path):
    response = client.post(path, json=body_for(path, temperature=1, top_p=1, presence_penalty=0))
    assert response.status_code == 200, response.text


RANGES = [
    (CHAT, {"temperature": 3}, "temperature", "3"),
    (COMPLETIONS, {"temperature": -0.5}, "temperature", "-0.5"),
    (CHAT, {"logprobs": True, "top_logprobs": 25}, "top_logprobs", "25"),
    (CHAT, {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "-1"),
    (CHAT, {"top_logprobs": 5}, "top_logprobs", "logprobs must be true"),
    (COMPLETIONS, {"logprobs": 1000}, "logprobs", "1000"),
    (COMPLETIONS, {"max_tokens": 1, "n": 9000}, "n", "9000"),
    (CHAT, {"messages": [{"role": "user", "content": "the " * 400}]}, "messages", "tokens"),
    (COMPLETIONS, {"prompt": "the " * 400}, "prompt", "tokens"),
    (COMPLETIONS, {"prompt": ["hi", "the " * 400]}, "prompt[1]", "tokens"),
]


@pytest.mark.parametrize("path, fields, param, value", RANGES)
def test_out_of_range_is_a_400_naming_the_openai_field(client, path, fields, param, value):
    assert_400(client.post(path, json=body_for(path, **fields)), param, value)
    assert_serving(client)


def test_a_too_long_chat_stream_names_messages(client):
    fields = {"messages": [{"role": "user", "content": "the " * 400}], "stream": True}
    assert_400(client.post(CHAT, json=body_for(CHAT, **fields)), "messages", "tokens")


@pytest.mark.parametrize(
    "key, value",
    [
        ("return_tensors", "pt"),
        ("return_tensors", "np"),
        ("tokenize", False),
        ("return_dict", True),
        ("add_generation_prompt", False),
        ("chat_template", "{{ 1 }}"),
    ],
)
def test_template_kwargs_that_change_the_call_are_refused(client, key, value):
    response = client.post(CHAT, json=body_for(CHAT, chat_template_kwargs={key: value}))
    assert_400(response, f"chat_template_kwargs.{key}", repr(value))
    assert_serving(client)


def test_a_failing_template_is_a_400_naming_chat_template_kwargs(server, client):
    # A template variable the template cannot use (the tiny template does m['content'] on it).
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=2,
            extra_body={"chat_template_kwargs": {"messages": 5}},
        )
    assert caught.value.body["param"] == "chat_template_kwargs", caught.value.body
    ok = client.post(CHAT, json=body_for(CHAT, chat_template_kwargs={"enable_thinking": False}))
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("session_id", [{"a": 1}, 5, ["s", 3]])
def test_generate_session_id_must_be_a_str(client, session_id):
    body = {"input_ids": [1, 2], "session_id": session_id, "sampling_params": {"max_new_tokens": 2}}
    assert_400(client.post("/generate", json=body), "session_id", repr(session_id))
    body["session_id"] = "conv-1"
    assert client.post("/generate", json=body).status_code == 200


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_max_tokens_past_the_context_is_a_400_and_none_runs_to_its_end(client, path):
    """SGLang (``allow_auto_truncate=False``): prompt + max_tokens must stay below the context
    length; without max_tokens a chat may use what is left of it."""
    field = "max_completion_tokens" if path == CHAT else "max_tokens"
    body = body_for(path, **{field: 10**9})
    body.pop("max_tokens", None) if path == CHAT else None
    assert_400(client.post(path, json=body), field, str(10**9))
    body = body_for(path, temperature=0, ignore_eos=True)
    body.pop("max_tokens")
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    if path == CHAT:
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 255  # a 256 context
    else:
        assert usage["completion_tokens"] == 16  # OpenAI's default for completions
    assert_serving(client)
