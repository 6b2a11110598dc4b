"""Many concurrent streams all complete; SIGTERM with requests in flight answers or aborts
them and leaves no process behind (a tensor-parallel engine: its rank processes too)."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import psutil
import pytest
from conftest import ENGINE
from server_process import ServerProcess

N_STREAMS = 200


async def _stream(client: httpx.AsyncClient, i: int) -> dict:
    payload = {
        "input_ids": [1 + i % 50, 2, 3],
        "sampling_params": {"max_new_tokens": 4, "ignore_eos": True, "temperature": 0},
        "stream": True,
    }
    async with client.stream("POST", "/generate", json=payload) as response:
        assert response.status_code == 200
        events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])


def test_200_concurrent_streams_all_complete(server):
    async def main():
        limits = httpx.Limits(max_connections=N_STREAMS + 10)
        async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
            return await asyncio.gather(*(_stream(client, i) for i in range(N_STREAMS)))

    finals = asyncio.run(main())
    assert len(finals) == N_STREAMS
    assert all(f["meta_info"]["completion_tokens"] == 4 for f in finals)
    assert all(f["meta_info"]["finish_reason"]["type"] == "length" for f in finals)
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/get_load").json()[0]["num_reqs"] == 0


def _long_stream(url: str, results: list, started: threading.Event) -> None:
    payload = {
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": 200, "ignore_eos": True},
        "stream": True,
    }
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            with client.stream("POST", "/generate", json=payload) as response:
                events = []
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()
                    elif line.startswith("{"):  # a JSON refusal (shutting down)
                        events.append(json.loads(line))
        results.append((response.status_code, events))
    except httpx.HTTPError as exc:  # a connection the server closed: also an answer
        results.append(exc)


@pytest.mark.slow  # a TP-2 server of its own: ~60 s on 2 loaded cores
def test_sigterm_with_requests_in_flight_leaves_no_process(chat_model):
    proc = ServerProcess(["--model-path", chat_model, "--tp-size", "2", *ENGINE])
    server = psutil.Process(proc.proc.pid)
    children = server.children(recursive=True)
    assert len(children) >= 2  # the two rank processes
    results: list = []
    started = threading.Event()
    clients = [
        threading.Thread(target=_long_stream, args=(proc.url, results, started)) for _ in range(8)
    ]
    for t in clients:
        t.start()
    assert started.wait(timeout=120)
    assert proc.stop(timeout_s=90) == 0
    for t in clients:
        t.join(timeout=60)
    assert len(results) == 8
    answered = [r for r in results if isinstance(r, tuple)]
    assert answered  # at least the streams that had started
    for status, events in answered:
        if status == 503:  # arrived while shutting down: refused, naming why
            assert "shutting down" in events[0]["message"]
            continue
        assert status == 200 and events[-1] == "[DONE]"  # the stream ended, aborted
        last = json.loads(events[-2])
        assert last["meta_info"]["finish_reason"]["type"] in ("abort", "length")
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]
    assert "shutting down" in "".join(proc.lines)
