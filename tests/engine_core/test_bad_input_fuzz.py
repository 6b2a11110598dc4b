"""Randomized generate calls (hypothesis): any mix of valid and invalid arguments gives valid
outputs or a typed error, never another exception or a hang, and leaves the engine as it was."""

from __future__ import annotations

import concurrent.futures
import re

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from engine_core import Engine, InvalidRequestError

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
