"""A caller that stops waiting -- a cancelled ``async_generate``, a stream closed early -- gets
its requests aborted: they stop using the engine, and their ids stay reserved until the loop
has finished them, so a request reusing an id gets its own output, never the old one's."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine_core import Engine, InvalidRequestError

LONG = {"temperature": 0, "max_new_tokens": 16000, "ignore_eos": True}  # ~tens of seconds
SHORT = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
MEDIUM = {"temperature": 0, "max_new_tokens": 300, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(model_dir):
    path = model_dir("llama")
    with Engine(path, device="cpu", skip_tokenizer_init=True, context_length=16384) as eng:
        yield eng


def _idle(engine: Engine, within: float = 10.0) -> bool:
    """Whether the engine runs nothing within ``within`` seconds (a LONG request left running
    takes far longer)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        info = engine.get_server_info()
        if info["num_running_requests"] == 0 and info["num_waiting_requests"] == 0:
            return True
        time.sleep(0.02)
    return False


def _own_output(engine: Engine, rid: str) -> dict:
    """A short request under ``rid``: refused while the old one is still being aborted, then
    accepted with its own prompt and length."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return engine.generate(input_ids=[1, 2, 3, 4], sampling_params=SHORT, rid=rid)
        except InvalidRequestError:
            assert time.monotonic() < deadline, f"rid {rid!r} never freed"
            time.sleep(0.02)


def test_a_cancelled_async_generate_is_aborted_and_its_rid_reused_safely(engine):
    async def cancel_one():
        call = engine.async_generate(input_ids=[5, 6, 7], sampling_params=LONG, rid="c")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(call, 0.3)

    asyncio.run(cancel_one())
    assert _idle(engine), "the cancelled request kept running"
    out = _own_output(engine, "c")
    assert out["meta_info"]["prompt_tokens"] == 4
    assert out["meta_info"]["completion_tokens"] == 5


def test_a_cancelled_batch_aborts_every_request(engine):
    async def cancel_batch():
        call = engine.async_generate(
            input_ids=[[5, 6], [7, 8], [9]], sampling_params=LONG, rid=["b0", "b1", "b2"]
        )
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(call, 0.3)

    asyncio.run(cancel_batch())
    assert _idle(engine)
    assert _own_output(engine, "b1")["meta_info"]["completion_tokens"] == 5


def test_a_stream_closed_early_is_aborted(engine):
    stream = engine.generate(input_ids=[5, 6, 7], sampling_params=LONG, stream=True, rid="s")
    next(stream)
    stream.close()
    assert _idle(engine), "the abandoned stream kept running"
    assert _own_output(engine, "s")["meta_info"]["completion_tokens"] == 5


def test_an_async_stream_closed_early_is_aborted(engine):
    async def read_one_chunk():
        stream = await engine.async_generate(
            input_ids=[5, 6, 7], sampling_params=LONG, stream=True, rid="as"
        )
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(read_one_chunk())
    assert _idle(engine)
    assert _own_output(engine, "as")["meta_info"]["completion_tokens"] == 5


def test_a_stream_read_to_the_end_is_not_aborted(engine):
    chunks = list(engine.generate(input_ids=[5, 6, 7], sampling_params=SHORT, stream=True))
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert chunks[-1]["meta_info"]["completion_tokens"] == 5


def test_a_caller_whose_event_loop_closed_loses_only_its_own_request(engine):
    """A stream whose event loop was closed without closing the stream (nothing can receive
    its chunks any more) is aborted alone; a request running beside it finishes normally."""
    beside: list = []
    thread = threading.Thread(
        target=lambda: beside.append(
            engine.generate(input_ids=[9, 8, 7], sampling_params=MEDIUM, rid="beside")
        )
    )
    loop = asyncio.new_event_loop()
    stream = loop.run_until_complete(
        engine.async_generate(input_ids=[5, 6, 7], sampling_params=LONG, stream=True, rid="gone")
    )
    loop.run_until_complete(stream.__anext__())
    thread.start()
    loop.close()  # without aclose(): the engine finds out when it next delivers a chunk
    thread.join(timeout=60)
    assert beside and beside[0]["meta_info"]["finish_reason"]["type"] == "length"
    assert _idle(engine), "the undeliverable stream kept running"
    assert _own_output(engine, "gone")["meta_info"]["completion_tokens"] == 5
