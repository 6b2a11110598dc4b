"""``rollout serve --num-engines 2`` with the ``cache_aware`` router: a caller's ``rid`` on
``/generate`` is accepted (SGLang accepts it), names the request (``meta_info.id``) and keeps a
conversation on one engine by the router's rid rule (``conv3_t2`` -> ``conv3``); ``session_id``
from the body does the same; a rid already in flight is a 400 naming it."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_process import ServerProcess

pytestmark = pytest.mark.slow  # Ray, two engine actors: ~1 min on 2 cores
GREEDY = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}


@pytest.fixture(scope="module")
def service(chat_model):
    args = ["--model-path", chat_model, "--num-engines", "2", "--served-model-name", "tiny"]
    args += ["--set", "cpus_per_rank=0.5", "--set", "num_cpus=2", "--engine", "device=cpu"]
    args += ["--set", "policy=cache_aware"]
    proc = ServerProcess(args, timeout_s=300)
    yield proc
    assert proc.stop(timeout_s=120) == 0


def _turn(conv: int, turn: int) -> list[int]:
    # A new prompt every turn (no shared prefix): only the session can keep it in place.
    return [3 + (97 * conv + 31 * turn + i) % 200 for i in range(6)]


def _decisions(client: httpx.Client) -> dict:
    return client.get("/get_server_info").json()["router"]["decisions"]


def test_caller_rids_and_session_ids_route_sticky(service):
    with httpx.Client(base_url=service.url, timeout=120) as client:
        before = _decisions(client).get("session", 0)
        homes: dict[str, set[int]] = {}
        for turn in range(3):
            for conv in range(3):
                rid = f"conv{conv}_t{turn}"
                body = {"input_ids": _turn(conv, turn), "sampling_params": GREEDY, "rid": rid}
                out = client.post("/generate", json=body)
                assert out.status_code == 200, out.text
                meta = out.json()["meta_info"]
                assert meta["id"] == rid
                homes.setdefault(f"conv{conv}", set()).add(meta["engine_index"])
            body = {
                "input_ids": _turn(9, turn),
                "sampling_params": GREEDY,
                "session_id": "chat-9",
            }
            out = client.post("/generate", json=body).json()
            homes.setdefault("chat-9", set()).add(out["meta_info"]["engine_index"])
        assert all(len(h) == 1 for h in homes.values()), homes
        assert _decisions(client)["session"] - before == 8  # turns 1 and 2 of 4 sessions


def test_a_rid_in_flight_is_refused(service):
    long = {"temperature": 0, "max_new_tokens": 240, "ignore_eos": True}  # below the 256 context
    body = {"input_ids": [5, 6, 7], "sampling_params": long, "rid": "busy"}
    with httpx.Client(base_url=service.url, timeout=120) as client:
        first: dict = {}
        worker = threading.Thread(
            target=lambda: first.update(r=client.post("/generate", json=body))
        )
        worker.start()
        try:
            for _ in range(600):  # until the first is running on an engine
                if sum(row["num_reqs"] for row in client.get("/get_load").json()):
                    break
                time.sleep(0.05)
            clash = client.post("/generate", json=body | {"sampling_params": GREEDY})
            assert clash.status_code == 400, clash.text
            assert "invalid rid='busy'" in clash.json()["message"]
        finally:
            client.post("/abort_request", json={"rid": "busy"})
            worker.join(timeout=120)
        assert first["r"].status_code == 200
        again = client.post("/generate", json=body | {"sampling_params": GREEDY})
        assert again.status_code == 200 and again.json()["meta_info"]["id"] == "busy"
