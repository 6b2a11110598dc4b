"""Bad input raises a ValueError subclass naming the field and value; the engine keeps serving."""

from __future__ import annotations

import time

import pytest

from engine_core import Engine, InvalidConfigError, InvalidRequestError

OK = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_dir("llama"), device="cpu", context_length=64) as eng:
        yield eng


CASES = [
    (dict(prompt=""), "prompt", "''"),
    (dict(input_ids=[]), "input_ids", "[]"),
    (dict(input_ids=[1, 2, 100000]), "input_ids", "100000"),
    (dict(input_ids=[1, -1]), "input_ids", "-1"),
    (dict(input_ids=list(range(1, 80))), "prompt", "79 tokens"),
    (dict(input_ids=[1, 2], sampling_params={"max_new_tokens": -1}), "max_new_tokens", "-1"),
    (dict(input_ids=[1, 2], sampling_params={"temperature": -0.5}), "temperature", "-0.5"),
    (dict(input_ids=[1, 2], sampling_params={"top_p": 0.0}), "top_p", "0.0"),
    (dict(input_ids=[1, 2], sampling_params={"top_p": 1.5}), "top_p", "1.5"),
    (dict(input_ids=[1, 2], sampling_params={"top_k": 0}), "top_k", "0"),
    (dict(input_ids=[1, 2], sampling_params={"bogus_key": 3}), "bogus_key", "3"),
    (dict(input_ids=[1, 2], sampling_params={"n": 0}), "n", "0"),
    (dict(prompt="hi", input_ids=[1, 2]), "prompt/input_ids", ""),
    (dict(), "prompt/input_ids", ""),
    (dict(input_ids=[[1, 2], [3]], sampling_params=[OK]), "sampling_params", ""),
    (dict(input_ids=[1, 2], return_logprob="yes"), "return_logprob", "yes"),
    (dict(input_ids=[[1, 2], [3, 4000]]), "input_ids[1]", "4000"),
]

# Wrong types and ranges of every SamplingParams field: the typed error names the field.
IDS = [1, 2]
BAD_SAMPLING = [
    ("stop", 5),
    ("stop", 2.5),
    ("stop", True),
    ("stop", {"a": 1}),
    ("stop", b"ab"),
    ("stop", [1]),
    ("stop", ["ok", 3]),
    ("stop", [b"ab"]),
    ("stop", [""]),
    ("stop", [["nested"]]),
    ("stop_token_ids", 5),
    ("stop_token_ids", "ab"),
    ("stop_token_ids", {"a": 1}),
    ("stop_token_ids", [1.5]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", [-1]),
    ("ignore_eos", "yes"),
    ("ignore_eos", 1),
    ("skip_special_tokens", 0),
    ("skip_special_tokens", "no"),
    ("max_new_tokens", 1.0),
    ("max_new_tokens", "4"),
    ("max_new_tokens", True),
    ("top_k", 1.5),
    ("top_k", 2**70),
    ("n", 1.5),
    ("n", True),
    ("n", -3),
    ("temperature", "0.5"),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", 10**400),
    ("temperature", [1.0]),
    ("top_p", float("nan")),
    ("top_p", True),
    ("min_p", float("inf")),
    ("min_p", -0.1),
    ("sampling_seed", 1.5),
    ("sampling_seed", "7"),
    ("sampling_seed", True),
    ("sampling_seed", 2**63),  # outside int64: would share its draws with another seed
    ("sampling_seed", -(2**63) - 1),
    ("sampling_seed", 2**200),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", -2.01),
    ("frequency_penalty", "1"),
    ("frequency_penalty", True),
    ("frequency_penalty", float("nan")),
    ("presence_penalty", -3),
    ("presence_penalty", [1.0]),
    ("repetition_penalty", 0),
    ("repetition_penalty", 2.5),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", float("inf")),
    ("min_new_tokens", -1),
    ("min_new_tokens", 1.5),
    ("min_new_tokens", True),
    ("min_new_tokens", "2"),
    ("min_new_tokens", 129),  # > max_new_tokens (128 by default)
    ("stop_regex", 5),
    ("stop_regex", ["ok", 3]),
    ("stop_regex", "(unclosed"),
    ("stop_regex", ""),
    ("stop_regex", [""]),
    ("stop_regex", b"x"),
    ("stop_regex", "a{99999999999}"),
    # a repeat inside a repeat backtracks exponentially: one search would freeze the engine
    ("stop_regex", "(.+)+[^\\s\\S]"),
    ("stop_regex", "(\\w+\\s?)+$"),
    ("stop_regex", "(?:x|(y+))*z"),
    ("no_stop_trim", "yes"),
    ("no_stop_trim", 1),
    ("spaces_between_special_tokens", 0),
    ("custom_params", 5),
    ("custom_params", "x"),
    ("custom_params", [1]),
    ("custom_params", {1: 2}),
]
CASES += [
    (dict(input_ids=IDS, sampling_params={key: value}), f"sampling_params.{key}", repr(value)[:20])
    for key, value in BAD_SAMPLING
]
# A bad value inside custom_params names its key.
CASES += [
    (
        dict(input_ids=IDS, sampling_params={"custom_params": {"a": [[1]]}}),
        "custom_params.a",
        "[[1]]",
    ),
    (
        dict(input_ids=IDS, sampling_params={"custom_params": {"b": {"c": [1]}}}),
        "custom_params.b",
        "{'c': [1]}",
    ),
    (
        dict(input_ids=IDS, sampling_params={"custom_params": {"d": b"x"}}),
        "custom_params.d",
        "b'x'",
    ),
]
# The other generate arguments.
CASES += [
    (dict(input_ids=IDS, sampling_params="greedy"), "sampling_params", "greedy"),
    (dict(input_ids=IDS, sampling_params=5), "sampling_params", "5"),
    (dict(input_ids=IDS, sampling_params=[OK]), "sampling_params", "[{"),
    (dict(input_ids=[[1, 2], [3]], sampling_params=[OK, 7]), "sampling_params[1]", "7"),
    (dict(input_ids=IDS, rid=5), "rid", "5"),
    (dict(input_ids=IDS, rid=["a"]), "rid", "['a']"),
    (dict(input_ids=IDS, rid={"a": 1}), "rid", "{'a': 1}"),
    (dict(input_ids=[[1, 2], [3]], rid=["a"]), "rid", "['a']"),
    (dict(input_ids=[[1, 2], [3]], rid=["a", 3]), "rid[1]", "3"),
    (dict(input_ids=[[1, 2], [3]], rid="same"), "rid", "same"),
    (dict(input_ids=IDS, return_logprob=1), "return_logprob", "1"),
    (dict(input_ids=IDS, logprob_start_len=-2), "logprob_start_len", "-2"),
    (dict(input_ids=IDS, logprob_start_len=1.5), "logprob_start_len", "1.5"),
    (dict(input_ids=IDS, logprob_start_len=True), "logprob_start_len", "True"),
    (dict(input_ids=IDS, top_logprobs_num=-1), "top_logprobs_num", "-1"),
    (dict(input_ids=IDS, top_logprobs_num=321), "top_logprobs_num", "321"),  # vocab is 320
    (dict(input_ids=IDS, top_logprobs_num=10**6), "top_logprobs_num", "1000000"),
    (dict(input_ids=IDS, top_logprobs_num="3"), "top_logprobs_num", "'3'"),
    (dict(input_ids="abc"), "input_ids", "abc"),
    (dict(input_ids=(1, 2)), "input_ids", "(1, 2)"),
    (dict(input_ids=[1.5, 2]), "input_ids", "1.5"),
    (dict(input_ids=[True, 2]), "input_ids", "True"),
    (dict(input_ids=[[1, 2], []]), "input_ids[1]", "[]"),
    (dict(input_ids=[[1, 2], 3]), "input_ids[1]", "3"),
    (dict(prompt=5), "prompt", "5"),
    (dict(prompt=b"hi"), "prompt", "b'hi'"),
    (dict(prompt=[]), "prompt", "[]"),
    (dict(prompt=[1, 2]), "prompt[0]", "1"),
    (dict(prompt=["ok", ["a"]]), "prompt[1]", "['a']"),
    (dict(prompt=["ok", ""]), "prompt[1]", "''"),
    (dict(input_ids=IDS, sampling_params={"stop": ["x"] * 257}), "sampling_params.stop", "257"),
    (dict(input_ids=IDS, sampling_params={"stop_regex": ["y"] * 257}), "stop_regex", "257"),
    (dict(prompt="\ud800"), "prompt", "'\\ud800'"),  # a lone surrogate: no UTF-8 for it
    (dict(prompt=["ok", "a\udfffb"]), "prompt[1]", "'a\\udfffb'"),
    # refused by its length before it is tokenized (64-token context)
    (dict(prompt="word " * 200_000), "prompt", "<1000000 characters>"),
]


def test_sglang_length_rules(engine):
    """SGLang (``allow_auto_truncate=False``): the prompt must be shorter than the context (64
    here), and prompt + ``max_new_tokens`` too when the caller gives it; the default is
    clipped to the context instead."""
    with pytest.raises(InvalidRequestError, match="prompt.*64 tokens.*context length 64"):
        engine.generate(input_ids=list(range(1, 65)))
    with pytest.raises(InvalidRequestError, match="max_new_tokens=62.*reach the context"):
        engine.generate(input_ids=[1, 2], sampling_params={"max_new_tokens": 62})
    asked = engine.generate(input_ids=[1, 2], sampling_params=dict(OK, max_new_tokens=61))
    assert asked["meta_info"]["completion_tokens"] == 61
    default = engine.generate(input_ids=[1, 2], sampling_params={"ignore_eos": True})
    assert default["meta_info"]["completion_tokens"] == 62  # 128 clipped to the context


def test_a_non_int_token_id_is_named_as_such(engine):
    for ids in ([True, 2], [1.5, 2], ["3"]):
        with pytest.raises(InvalidRequestError, match="a token id must be an int"):
            engine.generate(input_ids=ids)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.generate(input_ids=[1, 10**6])


@pytest.mark.parametrize("kwargs,field,value", CASES, ids=[c[1] + ":" + c[2] for c in CASES])
def test_bad_input_raises_and_engine_survives(engine, kwargs, field, value):
    with pytest.raises(InvalidRequestError) as info:
        engine.generate(**kwargs)
    assert isinstance(info.value, ValueError)
    assert field in str(info.value) and value in str(info.value)
    out = engine.generate(input_ids=[1, 2, 3], sampling_params=OK)
    assert len(out["output_ids"]) == 4
    assert engine.get_server_info()["num_running_requests"] == 0


def test_batch_is_all_or_nothing(engine):
    before = engine.get_server_info()["generated_tokens"]
    with pytest.raises(InvalidRequestError):
        engine.generate(input_ids=[[1, 2], [3, 4]], sampling_params=[OK, {"top_k": 0}])
    assert engine.get_server_info()["generated_tokens"] == before


# ------------------------------------------------------------ requests per call (n) ---------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(input_ids=IDS, sampling_params=dict(OK, n=10**6)), "sampling_params.n"),
        (dict(input_ids=IDS, sampling_params=dict(OK, n=8193)), "sampling_params.n"),
        (
            dict(input_ids=[IDS] * 5000, sampling_params=dict(OK, n=2)),
            "input_ids x sampling_params.n",
        ),
        (dict(input_ids=[IDS] * 100_000), "input_ids"),
        (dict(prompt=["hi"] * 100_000, sampling_params=dict(OK, n=4)), "prompt"),
    ],
    ids=["n=1e6", "n=limit+1", "batch5000xn2", "batch1e5", "prompts1e5xn4"],
)
def test_too_many_requests_rejected_at_once(engine, kwargs, field):
    before = engine.get_server_info()["generated_tokens"]
    start = time.monotonic()
    with pytest.raises(InvalidRequestError, match="max_requests_per_call=8192") as info:
        engine.generate(**kwargs)
    assert time.monotonic() - start < 1.0  # refused before anything is tokenized or queued
    assert info.value.field == field
    assert engine.get_server_info()["generated_tokens"] == before
    assert engine.get_server_info()["num_running_requests"] == 0
    out = engine.generate(input_ids=[1, 2, 3], sampling_params=OK)
    assert len(out["output_ids"]) == 4


def test_max_requests_per_call_is_an_engine_option(model_dir):
    with pytest.raises(InvalidConfigError, match="max_requests_per_call"):
        Engine(model_dir("llama"), device="cpu", max_requests_per_call=0)
    with Engine(model_dir("llama"), device="cpu", max_requests_per_call=6) as eng:
        assert len(eng.generate(input_ids=[IDS, [3]], sampling_params=dict(OK, n=3))) == 6
        with pytest.raises(InvalidRequestError, match="max_requests_per_call=6"):
            eng.generate(input_ids=IDS, sampling_params=dict(OK, n=7))
        with pytest.raises(InvalidRequestError, match="this one makes 8"):
            eng.generate(input_ids=[IDS, [3]], sampling_params=[dict(OK, n=3), dict(OK, n=5)])


@pytest.mark.parametrize("mode", ["blocking", "async", "stream"])
def test_a_failing_output_reaches_the_caller(model_dir, mode):
    """A request whose output cannot be built raises in the caller instead of leaving it
    waiting forever; the engine keeps serving."""
    import asyncio

    with Engine(model_dir("llama"), device="cpu") as eng:
        ok = eng.generate(input_ids=[1, 2, 3], sampling_params=OK, rid="r")
        real_final, real_delta = eng.outputs.final, eng.outputs.delta

        def broken(*args):
            raise RuntimeError("output builder broke")

        eng.outputs.final = eng.outputs.delta = broken
        call = dict(input_ids=[1, 2, 3], sampling_params=OK, rid="r")
        with pytest.raises(RuntimeError, match="output builder broke"):
            if mode == "blocking":
                eng.generate(**call)
            elif mode == "async":
                asyncio.run(eng.async_generate(**call))
            else:
                list(eng.generate(**call, stream=True))
        eng.outputs.final, eng.outputs.delta = real_final, real_delta
        again = eng.generate(input_ids=[1, 2, 3], sampling_params=OK, rid="r")  # id free again
        assert again["output_ids"] == ok["output_ids"]
