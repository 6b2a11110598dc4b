"""The official ``openai`` client against ``rollout serve``: chat, completions, streaming,
n > 1, logprobs, token ids; the oracle is an in-process ``Engine`` on the same weights fed the
same ids (the tokenizer's chat template for chat)."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from engine_core import Engine

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oracle(chat_model):
    with Engine(chat_model, device="cpu", max_total_tokens=4096) as engine:
        yield engine


@pytest.fixture(scope="module")
def chat_ids(chat_model) -> list[int]:
    tok = AutoTokenizer.from_pretrained(chat_model)
    ids = tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_greedy_matches_the_engine_with_token_ids(client, oracle, chat_ids):
    out = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_completion_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    want = oracle.generate(
        input_ids=chat_ids,
        sampling_params={"temperature": 0, "max_new_tokens": 7, "ignore_eos": True},
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want["text"]
    assert choice.finish_reason == "length"
    extra = choice.model_extra
    assert extra["prompt_token_ids"] == chat_ids and extra["token_ids"] == want["output_ids"]
    assert extra["weight_versions"] == ["default"] * 7
    assert out.model_extra["weight_version"] == "default"
    assert out.usage.prompt_tokens == len(chat_ids) and out.usage.completion_tokens == 7


def test_completions_n_seed_logprobs(client, oracle, chat_model):
    params = {"temperature": 1.0, "max_new_tokens": 5, "ignore_eos": True, "n": 3}
    out = client.completions.create(
        model="tiny",
        prompt="the quick brown fox",
        max_tokens=5,
        n=3,
        seed=11,
        logprobs=2,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    ids = AutoTokenizer.from_pretrained(chat_model).encode("the quick brown fox")
    want = oracle.generate(
        input_ids=ids, sampling_params=params | {"sampling_seed": 11}, return_logprob=True
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.model_extra["token_ids"] for c in out.choices] == [w["output_ids"] for w in want]
    assert [c.text for c in out.choices] == [w["text"] for w in want]
    for choice, w in zip(out.choices, want):
        lps = [row[0] for row in w["meta_info"]["output_token_logprobs"]]
        assert choice.logprobs.token_logprobs == pytest.approx(lps, abs=1e-5)
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
        assert choice.model_extra["prompt_token_ids"] == ids
    again = client.completions.create(
        model="tiny",
        prompt="the quick brown fox",
        max_tokens=5,
        n=3,
        seed=11,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 15


def test_completion_batch_of_token_prompts(client, oracle):
    out = client.completions.create(
        model="tiny",
        prompt=[[1, 2, 3], [4, 5]],
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    want = oracle.generate(
        input_ids=[[1, 2, 3], [4, 5]],
        sampling_params={"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
    )
    assert [c.model_extra["token_ids"] for c in out.choices] == [w["output_ids"] for w in want]


def test_chat_logprobs(client, oracle, chat_ids):
    out = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    want = oracle.generate(
        input_ids=chat_ids,
        sampling_params={"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
        return_logprob=True,
    )
    content = out.choices[0].logprobs.content
    lps = [row[0] for row in want["meta_info"]["output_token_logprobs"]]
    assert [c.logprob for c in content] == pytest.approx(lps, abs=1e-5)
    assert all(len(c.top_logprobs) == 3 for c in content)
    # greedy: the chosen token is the most likely one
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5) for c in content)


def test_chat_stream_concatenates_to_the_full_answer(client):
    kwargs = dict(
        model="tiny",
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_completion_stream_n2(client):
    kwargs = dict(
        model="tiny",
        prompt="hello",
        max_tokens=5,
        temperature=0,
        n=2,
        extra_body={"ignore_eos": True},
    )
    full = [c.text for c in client.completions.create(**kwargs).choices]
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert [texts[0], texts[1]] == full  # greedy: both samples equal the non-streamed ones


def test_stop_string(client):
    probe = (
        client.completions.create(
            model="tiny",
            prompt="hello",
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    stop = probe[2:4]
    assert stop
    out = client.completions.create(
        model="tiny",
        prompt="hello",
        max_tokens=8,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert out.finish_reason == "stop" and stop not in out.text and probe.startswith(out.text)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(model="other"), "model"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(extra_body={"bogus_field": 1}), "bogus_field"),
        (dict(extra_body={"top_k": "x"}), "top_k"),
        (dict(frequency_penalty=2.5), "frequency_penalty"),
        (dict(presence_penalty=-3.0), "presence_penalty"),
        (dict(extra_body={"repetition_penalty": 0.0}), "repetition_penalty"),
        (dict(extra_body={"min_tokens": 5}), "min_tokens"),
        (dict(extra_body={"min_tokens": -1}), "min_tokens"),
        (dict(messages=[]), "messages"),
    ],
)
def test_bad_chat_requests_name_the_field(client, kwargs, field):
    args = dict(model="tiny", messages=MESSAGES, max_tokens=2) | kwargs
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**args)
    assert 400 <= info.value.status_code < 500
    assert field in info.value.message
    ok = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert ok.choices[0].message.content is not None


PENALTIES = {"frequency_penalty": 0.7, "presence_penalty": 0.4, "repetition_penalty": 1.6}


def test_penalized_completion_matches_the_engine(client, oracle, chat_model):
    """OpenAI's penalties and SGLang's ``repetition_penalty`` / ``min_tokens`` reach the
    engine: the completion equals the in-process engine's with the same params, and differs
    from the unpenalized one (so the penalties did something)."""
    ids = AutoTokenizer.from_pretrained(chat_model).encode("the quick brown fox")
    base = {"temperature": 0, "max_new_tokens": 12}
    want = oracle.generate(input_ids=ids, sampling_params=base | PENALTIES | {"min_new_tokens": 12})
    plain = oracle.generate(input_ids=ids, sampling_params=base | {"ignore_eos": True})
    out = client.completions.create(
        model="tiny",
        prompt="the quick brown fox",
        max_tokens=12,
        temperature=0,
        frequency_penalty=0.7,
        presence_penalty=0.4,
        extra_body={"repetition_penalty": 1.6, "min_tokens": 12, "return_token_ids": True},
    ).choices[0]
    assert out.model_extra["token_ids"] == want["output_ids"] and out.text == want["text"]
    assert len(want["output_ids"]) == 12 and want["output_ids"] != plain["output_ids"]


def test_penalized_chat_matches_the_engine(client, oracle, chat_ids):
    want = oracle.generate(
        input_ids=chat_ids,
        sampling_params={"temperature": 0, "max_new_tokens": 8, "ignore_eos": True} | PENALTIES,
    )
    out = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_completion_tokens=8,
        temperature=0,
        frequency_penalty=0.7,
        presence_penalty=0.4,
        extra_body={"repetition_penalty": 1.6, "ignore_eos": True, "return_token_ids": True},
    ).choices[0]
    assert out.model_extra["token_ids"] == want["output_ids"]
