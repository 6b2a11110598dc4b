"""``generate`` with SGLang's arguments (python/sglang/srt/entrypoints/engine.py
``Engine.generate``, io_struct.py ``GenerateReqInput``): ``None`` logprob arguments mean the
defaults, SGLang's other arguments are accepted while they ask for nothing and rejected naming
the field otherwise, and ``meta_info`` carries ``e2e_latency`` and ``num_retractions``."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine_core import Engine, InvalidRequestError
from engine_core.requests.generate_request import UNSUPPORTED, GenerateRequest

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
IDS = [5, 17, 29, 41, 53]


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(tiny_model, device="cpu", max_total_tokens=1024) as eng:
        yield eng


@pytest.fixture(scope="module")
def plain(engine):
    return engine.generate(input_ids=IDS, sampling_params=GREEDY)


def test_none_logprob_arguments_mean_sglang_defaults(engine):
    args = dict(input_ids=IDS, sampling_params=GREEDY, return_logprob=True)
    got = engine.generate(**args, logprob_start_len=None, top_logprobs_num=None)
    want = engine.generate(**args, logprob_start_len=-1, top_logprobs_num=0)
    meta, ref = got["meta_info"], want["meta_info"]
    assert got["output_ids"] == want["output_ids"]
    assert meta["input_token_logprobs"] == ref["input_token_logprobs"] == []  # -1: output only
    assert meta["output_token_logprobs"] == ref["output_token_logprobs"]
    assert "output_top_logprobs" not in meta  # 0 top logprobs
    none = engine.generate(input_ids=IDS, sampling_params=GREEDY, return_logprob=None)
    assert "output_token_logprobs" not in none["meta_info"]  # None: False


def test_none_valued_sglang_arguments_are_accepted(engine, plain):
    out = engine.generate(
        input_ids=IDS,
        sampling_params=GREEDY,
        image_data=None,
        audio_data=None,
        video_data=None,
        mm_hashes=None,
        token_ids_logprob=None,
        lora_path=None,
        custom_logit_processor=None,
        require_reasoning=False,
        return_hidden_states=False,
        return_routed_experts=False,
        routed_experts_start_len=0,
        bootstrap_host=None,
        bootstrap_port=None,
        bootstrap_room=None,
        routed_dp_rank=None,
        data_parallel_rank=None,
        disagg_prefill_dp_rank=None,
        external_trace_header=None,
        session_params=None,
        priority=None,
        session_id=None,
        cache_salt=None,
    )
    assert out["output_ids"] == plain["output_ids"]


def test_empty_and_per_item_none_values_are_accepted(engine, plain):
    outs = engine.generate(
        input_ids=[IDS, IDS],
        sampling_params=GREEDY,
        image_data=[],
        lora_path=[None, None],
        token_ids_logprob=[],
        custom_logit_processor=[None, None],
        return_hidden_states=[False, False],
        data_parallel_rank=0,  # SGLang ignores rank 0 when dp_size is 1
        priority=3,  # no priority scheduling: ignored, as SGLang's default
        cache_salt="salt",  # isolates the prefix cache; the output is the same
    )
    assert [o["output_ids"] for o in outs] == [plain["output_ids"]] * 2


@pytest.mark.parametrize(
    "name, value",
    [
        ("image_data", "cat.png"),
        ("image_data", [["a.png", "b.png"]]),
        ("audio_data", "speech.wav"),
        ("video_data", "clip.mp4"),
        ("mm_hashes", ["abc"]),
        ("lora_path", "adapters/a"),
        ("lora_path", ["adapters/a"]),
        ("custom_logit_processor", '{"callable": "x"}'),
        ("require_reasoning", True),
        ("return_routed_experts", True),
        ("bootstrap_host", "10.0.0.1"),
        ("bootstrap_port", 8998),
        ("bootstrap_room", 7),
        ("routed_dp_rank", 1),
        ("data_parallel_rank", 2),
        ("disagg_prefill_dp_rank", 1),
        ("session_params", {"id": "s1"}),
    ],
)
def test_unsupported_arguments_with_a_value_are_rejected_naming_them(engine, name, value):
    with pytest.raises(InvalidRequestError, match="not supported") as info:
        engine.generate(input_ids=IDS, sampling_params=GREEDY, **{name: value})
    assert info.value.field == name
    assert engine.get_server_info()["num_running_requests"] == 0


def test_token_ids_logprob_reports_the_given_ids_at_every_position(engine):
    """SGLang's ``input_token_ids_logprobs`` / ``output_token_ids_logprobs``: per position,
    ``(logprob, token_id, None)`` for each given id (prompt positions from logprob_start_len)."""
    args = dict(input_ids=IDS, sampling_params=GREEDY, return_logprob=True, top_logprobs_num=1)
    base = engine.generate(**args)["meta_info"]
    ids = [3, base["output_top_logprobs"][0][0][1], 100]
    meta = engine.generate(**args, token_ids_logprob=ids, logprob_start_len=0)["meta_info"]
    outs = meta["output_token_ids_logprobs"]
    assert len(outs) == GREEDY["max_new_tokens"]
    assert all([tok for _, tok, _ in got] == ids for got in outs)
    for got, (lp, tok, _), top in zip(
        outs, meta["output_token_logprobs"], meta["output_top_logprobs"]
    ):
        by_id = {t: v for v, t, _ in got}
        assert by_id.get(tok, lp) == pytest.approx(lp, abs=1e-6)  # the sampled token's
        assert by_id.get(top[0][1], top[0][0]) == pytest.approx(top[0][0], abs=1e-6)
        assert all(v <= top[0][0] + 1e-6 for v in by_id.values())  # none above the top-1
    ins = meta["input_token_ids_logprobs"]
    assert len(ins) == len(IDS) and ins[0] is None
    assert all([tok for _, tok, _ in got] == ids for got in ins[1:])
    for got, (lp, tok, _) in zip(ins[1:], meta["input_token_logprobs"][1:]):
        if tok in ids:
            assert dict((t, v) for v, t, _ in got)[tok] == pytest.approx(lp, abs=1e-6)
    assert "output_token_ids_logprobs" not in base


def test_token_ids_logprob_broadcast_and_per_prompt(engine):
    kwargs = dict(input_ids=[IDS, IDS[:3]], sampling_params=GREEDY, return_logprob=True)
    shared = engine.generate(**kwargs, token_ids_logprob=[7, 8])
    per = engine.generate(**kwargs, token_ids_logprob=[[7], None])
    assert all(
        [t for _, t, _ in pos] == [7, 8]
        for out in shared
        for pos in out["meta_info"]["output_token_ids_logprobs"]
    )
    assert [t for _, t, _ in per[0]["meta_info"]["output_token_ids_logprobs"][0]] == [7]
    assert "output_token_ids_logprobs" not in per[1]["meta_info"]
    with pytest.raises(InvalidRequestError, match="token_ids_logprob"):
        engine.generate(input_ids=IDS, sampling_params=GREEDY, token_ids_logprob=[10**9])


def test_every_unsupported_argument_is_in_the_signature(engine):
    import inspect

    params = inspect.signature(engine.generate).parameters
    assert set(UNSUPPORTED) <= set(params)
    assert params["logprob_start_len"].default is None
    assert params["top_logprobs_num"].default is None


def test_sglang_positional_order(engine, plain):
    """SGLang: generate(prompt, sampling_params, input_ids, ...)."""
    assert engine.generate(None, GREEDY, IDS)["output_ids"] == plain["output_ids"]
    text = engine.generate("the quick brown fox", GREEDY)
    want = engine.generate(prompt="the quick brown fox", sampling_params=GREEDY)
    assert (text["text"], text["output_ids"]) == (want["text"], want["output_ids"])
    assert GenerateRequest.of(None, GREEDY, IDS).sampling_params is GREEDY


def test_meta_info_has_e2e_latency_and_num_retractions(engine):
    started = time.monotonic()
    out = engine.generate(input_ids=IDS, sampling_params=GREEDY)
    elapsed = time.monotonic() - started
    meta = out["meta_info"]
    assert meta["num_retractions"] == 0
    assert 0 < meta["e2e_latency"] <= elapsed


def test_async_meta_info_has_e2e_latency(engine):
    out = asyncio.run(engine.async_generate(input_ids=IDS, sampling_params=GREEDY))
    assert out["meta_info"]["e2e_latency"] > 0 and out["meta_info"]["num_retractions"] == 0


def test_stream_reports_e2e_latency_on_the_final_chunk_only(engine):
    chunks = list(engine.generate(input_ids=IDS, sampling_params=GREEDY, stream=True))
    assert len(chunks) > 1
    assert all("e2e_latency" not in c["meta_info"] for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["e2e_latency"] > 0
    assert all(c["meta_info"]["num_retractions"] == 0 for c in chunks)


def test_num_retractions_counts_each_request_s_retractions(tiny_model):
    prompts = [[3 + i, 50 + 2 * i, 7, 9 + i] * (2 + i) for i in range(6)]
    params = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    with Engine(tiny_model, device="cpu", max_total_tokens=64, page_size=4) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        total = eng.get_server_info()["num_retractions"]
    counts = [o["meta_info"]["num_retractions"] for o in outs]
    assert total > 0 and sum(counts) == total
