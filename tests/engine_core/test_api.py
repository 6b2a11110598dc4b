"""The SGLang-shaped API: stops, streaming, async, abort, server info, lifecycle."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine_core import Engine, EngineStoppedError

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
PROMPT = [5, 17, 29, 41, 53]


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_dir("llama"), device="cpu") as eng:
        yield eng


@pytest.fixture(scope="module")
def plain(engine):
    return engine.generate(input_ids=PROMPT, sampling_params=GREEDY)


def test_output_shape(plain):
    assert set(plain) == {"text", "output_ids", "meta_info"}
    meta = plain["meta_info"]
    for key in (
        "id",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "weight_version",
    ):
        assert key in meta
    assert meta["finish_reason"] == {"type": "length", "length": 16}
    assert meta["weight_version"] == "default" and meta["cached_tokens"] == 0


def test_stop_token_ids(engine, plain):
    target = plain["output_ids"][5]
    first = plain["output_ids"].index(target)
    out = engine.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, stop_token_ids=[target]))
    assert out["output_ids"] == plain["output_ids"][: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}


def test_eos_stops_unless_ignored(model_dir, plain):
    eos = plain["output_ids"][3]
    # Rebuild a model whose EOS id is a token greedy decoding produces.
    path = model_dir("llama", eos_token_id=eos)
    with Engine(path, device="cpu") as eng:
        stopped = eng.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, ignore_eos=False))
        ignored = eng.generate(input_ids=PROMPT, sampling_params=GREEDY)
    assert stopped["output_ids"][-1] == eos
    assert stopped["output_ids"] == plain["output_ids"][: plain["output_ids"].index(eos) + 1]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    assert ignored["output_ids"] == plain["output_ids"]


def test_stop_string_truncates_text(engine, plain):
    text = plain["text"]
    assert len(text) > 6, text
    stop = text[3:6]
    out = engine.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, stop=[stop]))
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.index(stop)]
    assert out["output_ids"] == plain["output_ids"][: len(out["output_ids"])]
    assert len(out["output_ids"]) < 16


def test_stream_chunks_are_cumulative_as_sglang(engine, plain):
    """SGLang's offline Engine (incremental_streaming_output=False): every chunk holds the
    output so far; the last one is the final output."""
    chunks = list(engine.generate(input_ids=PROMPT, sampling_params=GREEDY, stream=True))
    assert len(chunks) > 1
    ids = plain["output_ids"]
    for chunk in chunks:
        assert chunk["output_ids"] == ids[: len(chunk["output_ids"])]
        assert plain["text"].startswith(chunk["text"])
    assert [len(c["output_ids"]) for c in chunks] == sorted({len(c["output_ids"]) for c in chunks})
    assert chunks[-1]["output_ids"] == ids and chunks[-1]["text"] == plain["text"]
    assert chunks[-1]["meta_info"]["finish_reason"] == plain["meta_info"]["finish_reason"]


def test_stream_with_stop_string(engine, plain):
    stop = plain["text"][4:7]
    full = engine.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, stop=stop))
    chunks = list(
        engine.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, stop=stop), stream=True)
    )
    assert chunks[-1]["text"] == full["text"]
    assert all(full["text"].startswith(c["text"]) for c in chunks)  # a stop string never shows


def test_async_generate_concurrent(engine, plain):
    async def main():
        calls = [engine.async_generate(input_ids=PROMPT, sampling_params=GREEDY) for _ in range(4)]
        return await asyncio.gather(*calls)

    outs = asyncio.run(main())
    assert [o["output_ids"] for o in outs] == [plain["output_ids"]] * 4


def test_async_stream(engine, plain):
    async def main():
        stream = await engine.async_generate(input_ids=PROMPT, sampling_params=GREEDY, stream=True)
        return [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    assert len(chunks) > 1 and chunks[-1]["output_ids"] == plain["output_ids"]


def test_abort_returns_partial_output(engine):
    result = {}
    params = {"temperature": 0, "max_new_tokens": 230, "ignore_eos": True}

    def call():
        result["out"] = engine.generate(input_ids=[1, 2, 3], sampling_params=params, rid="slow")

    before = engine.get_server_info()["generated_tokens"]
    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.time() + 30
    while engine.get_server_info()["generated_tokens"] < before + 5 and time.time() < deadline:
        time.sleep(0.002)
    engine.abort_request("slow")
    thread.join(timeout=30)
    out = result["out"]
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(out["output_ids"]) < 230
    # the engine still serves, and the rid can be reused
    again = engine.generate(input_ids=[1, 2, 3], sampling_params=GREEDY, rid="slow")
    common = min(len(again["output_ids"]), len(out["output_ids"]))
    assert again["output_ids"][:common] == out["output_ids"][:common]


def test_server_info(engine):
    info = engine.get_server_info()
    assert info["config"]["page_size"] == 16
    # Idle: every page is free or held only by the prefix cache.
    cached = info["prefix_cache"]["cached_pages"]
    assert info["num_free_pages"] + cached == info["num_total_pages"]
    assert info["generated_tokens"] > 0 and info["weight_version"] == "default"


def test_generate_after_shutdown_raises(model_dir):
    eng = Engine(model_dir("llama"), device="cpu")
    eng.shutdown()
    with pytest.raises(EngineStoppedError):
        eng.generate(input_ids=PROMPT, sampling_params=GREEDY)


def test_sglang_positional_order(engine, plain):
    out = engine.generate(None, GREEDY, PROMPT)
    assert out["output_ids"] == plain["output_ids"]
