"""Bad input raises a ValueError subclass naming the field and value; the engine keeps serving."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import time

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from engine_core import Engine, InvalidConfigError, InvalidRequestError, ModelLoadError

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
]


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


def test_bad_config(model_dir):
    with pytest.raises(InvalidConfigError, match="page_size"):
        Engine(model_dir("llama"), device="cpu", page_size=0)
    with pytest.raises(InvalidConfigError, match="dtype"):
        Engine(model_dir("llama"), device="cpu", dtype="int8")
    with pytest.raises(InvalidConfigError, match="not_an_option"):
        Engine(model_dir("llama"), device="cpu", not_an_option=1)


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(model_dir, tmp_path):
    path = _copy(model_dir("llama"), str(tmp_path / "m"))
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ModelLoadError, match="GPTNeoXForCausalLM"):
        Engine(path, device="cpu")


def _edit_weights(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_weight_named(model_dir, tmp_path):
    path = _copy(model_dir("llama"), str(tmp_path / "m"))
    _edit_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"model.layers.1.mlp.gate_up_proj.weight\[1\]"):
        Engine(path, device="cpu")


def test_shape_mismatch_named(model_dir, tmp_path):
    path = _copy(model_dir("llama"), str(tmp_path / "m"))

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)

    _edit_weights(path, shrink)
    with pytest.raises(ModelLoadError, match="model.layers.0.self_attn.k_proj.weight"):
        Engine(path, device="cpu")


def test_unexpected_weight_named(model_dir, tmp_path):
    path = _copy(model_dir("llama"), str(tmp_path / "m"))
    _edit_weights(path, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match="model.layers.0.extra.weight"):
        Engine(path, device="cpu")


def test_corrupt_and_missing_weights_file(model_dir, tmp_path):
    path = _copy(model_dir("llama"), str(tmp_path / "m"))
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        Engine(path, device="cpu")
    os.remove(file)
    with pytest.raises(ModelLoadError, match="missing weights file"):
        Engine(path, device="cpu")


def test_sharded_checkpoint_loads(model_dir, tmp_path):
    src = model_dir("qwen2")
    path = _copy(src, str(tmp_path / "m"))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(
            {n: tensors[n] for n in part}, os.path.join(path, fname), metadata={"format": "pt"}
        )
        weight_map.update({n: fname for n in part})
    json.dump(
        {"weight_map": weight_map}, open(os.path.join(path, "model.safetensors.index.json"), "w")
    )
    with Engine(src, device="cpu") as a, Engine(path, device="cpu") as b:
        assert (
            a.generate(input_ids=[1, 2, 3], sampling_params=OK)["output_ids"]
            == b.generate(input_ids=[1, 2, 3], sampling_params=OK)["output_ids"]
        )


# ------------------------------------------------------------ randomized ---------------------

FUZZ_CONTEXT = 16  # every accepted call is short: at most 16 - prompt tokens are generated
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.binary(max_size=3),
    st.lists(st.integers(-3, 5), max_size=3),
    st.lists(st.text(max_size=2), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
# Valid values of every SamplingParams field (edges included: subnormal temperatures, huge
# seeds and top_k, stop ids outside the vocabulary).
FIELDS = {
    "max_new_tokens": st.integers(0, 4),
    "temperature": st.one_of(st.just(0), st.floats(0.0, 1e6), st.floats(1e-320, 1e-4)),
    "top_p": st.floats(1e-300, 1.0),
    "top_k": st.one_of(st.integers(-(2**70), -1), st.integers(1, 2**40)),
    "min_p": st.floats(0.0, 1.0),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1), max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 400), max_size=3),
    "ignore_eos": st.booleans(),
    "n": st.integers(1, 3),
    "sampling_seed": st.one_of(st.none(), st.integers(-(2**80), 2**80)),
    "skip_special_tokens": st.booleans(),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "presence_penalty": st.floats(-2.0, 2.0),
    "repetition_penalty": st.floats(0.0, 2.0, exclude_min=True),
    "min_new_tokens": st.integers(0, 4),  # above max_new_tokens: a typed error
    "stop_regex": st.one_of(
        st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=2)
    ),
    "no_stop_trim": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
    "custom_params": st.one_of(
        st.none(),
        st.dictionaries(
            st.text(max_size=3),
            st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3)),
            max_size=2,
        ),
    ),
}
SAMPLING = st.fixed_dictionaries({}, optional=FIELDS)
VALID_IDS = st.lists(st.integers(0, 319), min_size=1, max_size=8)
ARGS = {
    "return_logprob": st.booleans(),
    "logprob_start_len": st.integers(-1, 20),
    "top_logprobs_num": st.one_of(st.integers(0, 3), st.just(320)),
    "rid": st.one_of(st.none(), st.text(min_size=1, max_size=4)),
}


@st.composite
def generate_calls(draw) -> dict:
    """A valid generate call (one prompt or a batch, text or ids, shared or per-item sampling
    dicts), then 0-3 corruptions: a sampling key, an argument, a prompt item or a whole
    argument replaced by junk, or an unknown sampling key added."""
    size = draw(st.one_of(st.none(), st.integers(1, 3)))
    text = draw(st.booleans())
    item = st.text(min_size=1, max_size=12) if text else VALID_IDS
    prompts = draw(item) if size is None else draw(st.lists(item, min_size=size, max_size=size))
    call = {"prompt" if text else "input_ids": prompts}
    per_item = size is not None and draw(st.booleans())
    params = [draw(SAMPLING) for _ in range(size)] if per_item else draw(SAMPLING)
    call["sampling_params"] = params
    call.update(draw(st.fixed_dictionaries({}, optional=ARGS)))
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["sampling", "unknown", "arg", "item", "whole"]))
        junk = draw(JUNK)
        sp = params[draw(st.integers(0, len(params) - 1))] if per_item else params
        if what == "sampling":
            sp[draw(st.sampled_from(sorted(FIELDS)))] = junk
        elif what == "unknown":
            sp[draw(st.text(min_size=1, max_size=6))] = junk
        elif what == "arg":
            call[draw(st.sampled_from(sorted(ARGS)))] = junk
        elif what == "item" and size is not None:
            prompts[draw(st.integers(0, size - 1))] = junk
        else:
            call[draw(st.sampled_from(["sampling_params", "prompt", "input_ids"]))] = junk
    return call


REFERENCE = dict(
    input_ids=[5, 17, 29, 41],
    sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
    return_logprob=True,
    top_logprobs_num=2,
)


@pytest.fixture(scope="module")
def fuzzed(model_dir):
    """An engine for the randomized calls (a small max_requests_per_call keeps a junk n fast)
    and its answer to REFERENCE before any of them."""
    with Engine(
        model_dir("llama"), device="cpu", context_length=FUZZ_CONTEXT, max_requests_per_call=16
    ) as eng:
        yield eng, eng.generate(**REFERENCE)


def _signature(out: dict) -> tuple:
    meta = out["meta_info"]
    return out["output_ids"], meta["output_token_logprobs"], meta["output_top_logprobs"]


@settings(max_examples=50, deadline=None, database=None)
@given(call=generate_calls())
def test_random_arguments_give_output_or_typed_error(fuzzed, call):
    """Any mix of valid and invalid sampling keys, values and types and other generate
    arguments gives valid outputs or InvalidRequestError: no other exception, no hang."""
    engine, _ = fuzzed
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        result = pool.submit(engine.generate, **call).result(timeout=30)
    except InvalidRequestError as exc:
        result = None
        name = re.sub(r"\[\d+\]", "", exc.field)
        known = name.split(".", 1)[-1] in FIELDS or "." not in name
        event(f"InvalidRequestError {name if known else 'unknown sampling key'}")
    except TimeoutError:
        pytest.fail(f"generate hung on {call}")
    finally:
        pool.shutdown(wait=False)
    outs = [] if result is None else result if isinstance(result, list) else [result]
    if result is not None:
        event("valid output")
    for out in outs:
        assert isinstance(out["text"], str) and len(out["output_ids"]) < FUZZ_CONTEXT
        assert all(isinstance(t, int) and 0 <= t < 320 for t in out["output_ids"])
    assert engine.get_server_info()["num_running_requests"] == 0


def test_random_calls_leave_the_engine_as_it_was(fuzzed):
    """After the randomized calls (same engine) a greedy request gives exactly the tokens and
    logprobs it gave before them."""
    engine, before = fuzzed
    assert _signature(engine.generate(**REFERENCE)) == _signature(before)


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
