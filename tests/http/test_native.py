"""SGLang's native endpoints over HTTP (httpx) against ``rollout serve`` on a tiny model; the
oracle is an in-process ``Engine`` on the same weights."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import threading
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import httpx
import pytest
import torch
import torch.multiprocessing
from safetensors.torch import load_file, save

from engine_core import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oracle(chat_model):
    with Engine(chat_model, device="cpu", max_total_tokens=4096) as engine:
        yield engine


def _strip(out: dict) -> dict:
    meta = {k: v for k, v in out["meta_info"].items() if k not in ("id", "e2e_latency")}
    return {"text": out["text"], "output_ids": out["output_ids"], "meta_info": meta}


def _sse(response: httpx.Response) -> list:
    events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_generate_text_and_ids_match_the_engine(client, oracle):
    got = client.post(
        "/generate", json={"text": "hello world", "sampling_params": GREEDY, "return_logprob": True}
    )
    assert got.status_code == 200
    want = oracle.generate("hello world", GREEDY, return_logprob=True)
    body = got.json()
    assert body["output_ids"] == want["output_ids"] and body["text"] == want["text"]
    lps = [row[0] for row in body["meta_info"]["output_token_logprobs"]]
    assert lps == pytest.approx([row[0] for row in want["meta_info"]["output_token_logprobs"]])
    batch = client.post(
        "/generate",
        json={"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": GREEDY, "top_logprobs_num": 2},
    ).json()
    assert [o["output_ids"] for o in batch] == [
        o["output_ids"]
        for o in oracle.generate(input_ids=[[1, 2, 3], [4, 5]], sampling_params=GREEDY)
    ]


def test_return_text_in_logprobs(client, chat_model):
    body = client.post(
        "/generate",
        json={
            "input_ids": [1, 2, 3],
            "sampling_params": GREEDY,
            "return_logprob": True,
            "top_logprobs_num": 2,
            "return_text_in_logprobs": True,
        },
    ).json()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    rows = body["meta_info"]["output_token_logprobs"]
    assert [r[2] for r in rows] == [tok.decode([r[1]]) for r in rows]
    assert all(
        len(top) == 2 and isinstance(top[0][2], str)
        for top in body["meta_info"]["output_top_logprobs"]
    )


def test_stream_chunks_are_cumulative_and_end_with_done(client, oracle):
    payload = {"text": "the quick brown fox", "sampling_params": GREEDY, "stream": True}
    with client.stream("POST", "/generate", json=payload) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(response)
    want = oracle.generate("the quick brown fox", GREEDY)
    assert len(chunks) > 1
    for before, after in zip(chunks, chunks[1:]):  # SGLang's default: each chunk is all so far
        assert after["output_ids"][: len(before["output_ids"])] == before["output_ids"]
        assert after["text"].startswith(before["text"])
    assert chunks[-1]["output_ids"] == want["output_ids"] and chunks[-1]["text"] == want["text"]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 6}


def test_batch_stream_interleaves_prompts_tagged_by_index(client, oracle):
    prompts = ["the quick brown fox", "jumps over"]
    payload = {"text": prompts, "sampling_params": GREEDY, "stream": True}
    with client.stream("POST", "/generate", json=payload) as response:
        assert response.status_code == 200
        chunks = _sse(response)
    for index, prompt in enumerate(prompts):
        mine = [c for c in chunks if c["index"] == index]
        want = oracle.generate(prompt, GREEDY)
        assert len(mine) > 1 and all(
            after["text"].startswith(before["text"]) for before, after in zip(mine, mine[1:])
        )
        assert mine[-1]["output_ids"] == want["output_ids"] and mine[-1]["text"] == want["text"]
    bad = {"input_ids": [[1, 2], []], "sampling_params": GREEDY, "stream": True}
    response = client.post("/generate", json=bad)
    assert response.status_code == 400 and "input_ids" in response.text


def test_abort_request_by_rid_mid_stream(client):
    long = {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True}
    payload = {"input_ids": [1, 2, 3], "sampling_params": long, "stream": True, "rid": "to-abort"}
    with client.stream("POST", "/generate", json=payload) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["meta_info"]["finish_reason"] is None
        assert client.post("/abort_request", json={"rid": "to-abort"}).status_code == 200
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    last = json.loads(rest[-2])
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 200
    assert client.post("/abort_request", json={"abort_all": True}).status_code == 200


def test_health_endpoints(client):
    assert client.get("/health").status_code == 200
    assert client.get("/health_generate").status_code == 200


def test_flush_cache_get_and_post(client):
    for method in ("GET", "POST"):
        response = client.request(method, "/flush_cache")
        assert response.status_code == 200 and response.text.startswith("Cache flushed.")


def test_pause_and_continue(client):
    paused = client.post("/pause_generation", json={"mode": "retract"})
    assert paused.json() == {"message": "Generation paused successfully.", "status": "ok"}
    assert client.get("/get_server_info").json()["paused"] is True
    result: dict = {}
    waiter = threading.Thread(
        target=lambda: result.update(
            client.post("/generate", json={"input_ids": [1, 2], "sampling_params": GREEDY}).json()
        )
    )
    waiter.start()  # queued while paused
    resumed = client.post("/continue_generation")
    assert resumed.json() == {"message": "Generation continued successfully.", "status": "ok"}
    waiter.join(timeout=60)
    assert result["meta_info"]["completion_tokens"] == 6
    assert client.get("/get_server_info").json()["paused"] is False


def test_release_and_resume_memory(client):
    released = client.post("/release_memory_occupation", json={"tags": ["kv_cache", "weights"]})
    assert released.status_code == 200 and released.json()["success"] is True
    refused = client.post("/generate", json={"input_ids": [1, 2], "sampling_params": GREEDY})
    assert refused.status_code == 503 and "resume" in refused.json()["message"]
    again = client.post("/release_memory_occupation", json={"tags": ["weights"]})
    assert again.status_code == 400 and again.json()["success"] is False  # already released
    resumed = client.post("/resume_memory_occupation", json={})
    assert resumed.status_code == 200 and resumed.json()["success"] is True
    ok = client.post("/generate", json={"input_ids": [1, 2], "sampling_params": GREEDY})
    assert ok.status_code == 200
    metrics = client.get("/metrics").text
    assert "rollout:release_memory_duration_seconds_count 2" in metrics  # one failed
    assert "rollout:release_memory_failures_total 1" in metrics
    assert "rollout:resume_memory_duration_seconds_count 1" in metrics


def test_weights_from_disk_tensor_and_by_name(client, chat_model, tiny_model_v2):
    new = load_file(os.path.join(tiny_model_v2, "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    got = client.get("/get_weights_by_name", params={"name": name, "truncate_size": 3}).json()
    old = load_file(os.path.join(chat_model, "model.safetensors"))
    assert torch.allclose(torch.tensor(got), old[name][:3])
    bad = client.post("/update_weights_from_disk", json={"model_path": "/nonexistent"})
    assert bad.status_code == 400 and bad.json()["success"] is False
    assert client.get("/get_weight_version").json()["weight_version"] == "default"

    ok = client.post(
        "/update_weights_from_disk", json={"model_path": tiny_model_v2, "weight_version": "v2"}
    )
    assert ok.status_code == 200 and ok.json()["success"] is True
    assert ok.json()["num_paused_requests"] == 0
    assert client.get("/get_weight_version").json()["weight_version"] == "v2"
    got = client.post("/get_weights_by_name", json={"name": name, "truncate_size": 3}).json()
    assert torch.allclose(torch.tensor(got), new[name][:3])
    with Engine(tiny_model_v2, device="cpu") as fresh:
        want = fresh.generate(input_ids=[1, 2, 3], sampling_params=GREEDY)["output_ids"]
    out = client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": GREEDY}).json()
    assert out["output_ids"] == want and out["meta_info"]["weight_version"] == "v2"

    # Back to the old weights from memory, as base64 safetensors (SGLang's field).
    entry = base64.b64encode(save(old)).decode()
    body = {"serialized_named_tensors": [entry], "weight_version": "v3"}
    ok = client.post("/update_weights_from_tensor", json=body)
    assert ok.status_code == 200 and ok.json()["success"] is True
    got = client.get("/get_weights_by_name", params={"name": name, "truncate_size": 3}).json()
    assert torch.allclose(torch.tensor(got), old[name][:3])
    not_b64 = client.post("/update_weights_from_tensor", json={"serialized_named_tensors": ["@@"]})
    assert not_b64.status_code == 400 and "serialized_named_tensors[0]" in not_b64.text
    shape_bad = base64.b64encode(save({name: torch.zeros(2, 2)})).decode()
    bad = client.post("/update_weights_from_tensor", json={"serialized_named_tensors": [shape_bad]})
    assert bad.status_code == 400 and bad.json()["success"] is False
    assert client.get("/get_weight_version").json()["weight_version"] == "v3"


@dataclass
class FlattenedTensorMetadata:  # SGLang's record (srt/weight_sync/tensor_bucket.py)
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def sglang_entry(obj) -> str:
    """What SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)`` makes."""
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode()


def flattened_bucket(pairs) -> dict:
    metadata, start = [], 0
    for name, t in pairs:
        metadata.append(
            FlattenedTensorMetadata(name, t.shape, t.dtype, start, start + t.numel(), t.numel())
        )
        start += t.numel()
    return {"flattened_tensor": torch.cat([t.flatten() for _, t in pairs]), "metadata": metadata}


@pytest.fixture
def file_system_sharing():
    """CPU tensors shared by name: torch's default descriptor passing authenticates with the
    key of the process tree that made them, and the server is not this process's child."""
    before = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    yield
    torch.multiprocessing.set_sharing_strategy(before)


def test_weights_from_sglang_payloads(client, chat_model, tiny_model_v2, file_system_sharing):
    """SGLang's HTTP refit (verl / slime): one base64 ForkingPickler payload per TP rank, of
    ``(name, tensor)`` pairs or a flattened bucket; a pickle naming anything else is refused
    and leaves weights and version alone."""
    new = load_file(os.path.join(tiny_model_v2, "model.safetensors"))
    old = load_file(os.path.join(chat_model, "model.safetensors"))
    names = sorted(new)[:4]

    def weights(name):
        got = client.get("/get_weights_by_name", params={"name": name, "truncate_size": 3})
        return torch.tensor(got.json())

    pairs = [(n, new[n].clone()) for n in names]
    body = {"serialized_named_tensors": [sglang_entry(pairs)], "weight_version": "s1"}
    ok = client.post("/update_weights_from_tensor", json=body)
    assert ok.status_code == 200 and ok.json()["success"] is True, ok.text
    assert all(torch.allclose(weights(n), new[n][:3]) for n in names)
    assert client.get("/get_weight_version").json()["weight_version"] == "s1"

    bucket = flattened_bucket([(n, old[n].clone()) for n in names])
    body = {
        "serialized_named_tensors": [sglang_entry(bucket)],
        "load_format": "flattened_bucket",
        "flush_cache": True,
        "disable_draft_model": None,
        "torch_empty_cache": False,
        "weight_version": "s2",
    }
    ok = client.post("/update_weights_from_tensor", json=body)
    assert ok.status_code == 200 and ok.json()["success"] is True, ok.text
    assert all(torch.allclose(weights(n), old[n][:3]) for n in names)

    # A pickle that would call a function (Ray may patch builtins.print, so name os.getcwd).
    hostile = base64.b64encode(pickle.dumps([("x", os.getcwd)])).decode()
    refused = client.post(
        "/update_weights_from_tensor",
        json={"serialized_named_tensors": [hostile], "weight_version": "s3"},
    )
    assert refused.status_code == 400 and refused.json()["success"] is False
    assert "getcwd" in refused.json()["message"]
    two = client.post(
        "/update_weights_from_tensor", json={"serialized_named_tensors": [sglang_entry(pairs)] * 2}
    )
    assert two.status_code == 400 and "one per TP rank" in two.json()["message"]
    assert client.get("/get_weight_version").json()["weight_version"] == "s2"


def test_update_weight_version(client):
    body = client.post("/update_weight_version", json={"new_version": "relabelled"}).json()
    assert body["success"] is True and body["new_version"] == "relabelled"
    assert client.get("/get_weight_version").json()["weight_version"] == "relabelled"
    assert client.get("/get_model_info").json()["weight_version"] == "relabelled"
    out = client.post("/generate", json={"input_ids": [1, 2], "sampling_params": GREEDY}).json()
    assert set(out["meta_info"]["weight_versions"]) == {"relabelled"}


def test_info_endpoints(client, chat_model):
    model = client.get("/get_model_info").json()
    assert model["model_path"] == chat_model or model["model_path"].startswith("/")
    assert model["is_generation"] is True and model["served_model_name"] == "tiny"
    for path in ("/get_server_info", "/server_info"):
        info = client.get(path).json()
        assert info["max_total_num_tokens"] == 4096 and info["internal_states"]
        assert info["num_engines"] == 1
    load = client.get("/get_load").json()
    assert load[0]["dp_rank"] == 0 and load[0]["num_reqs"] == 0
    loads = client.get("/v1/loads").json()["loads"]
    assert loads[0]["max_total_num_tokens"] == 4096 and loads[0]["token_usage"] == 0.0


def test_metrics_prometheus_text(client):
    client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": GREEDY})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    assert samples['sglang:num_running_reqs{engine="0"}'] == 0
    assert samples["sglang:generation_tokens_total"] >= 6
    assert samples['rollout:generated_tokens_total{engine="0"}'] >= 6
    assert any(k.startswith("rollout:weight_version_info{") for k in samples)
    # The same long prompt twice: the second reuses the first's cached pages.
    long_prompt = {"input_ids": list(range(5, 45)), "sampling_params": GREEDY}
    for _ in range(2):
        client.post("/generate", json=long_prompt)
    hit_rate = [
        float(line.rsplit(" ", 1)[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("sglang:cache_hit_rate{")
    ]
    assert len(hit_rate) == 1 and 0 < hit_rate[0] < 1
    # The radix cache's counters are exported as get_server_info reports them.
    cache = client.get("/get_server_info").json()["prefix_cache"]
    text = client.get("/metrics").text
    assert "# TYPE rollout:prefix_cache_evicted_pages_total counter" in text
    exported = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("rollout:prefix_cache_")
    }
    assert exported == {
        "rollout:prefix_cache_cached_pages": cache["cached_pages"],
        "rollout:prefix_cache_inserted_pages_total": cache["inserted_pages"],
        "rollout:prefix_cache_evicted_pages_total": cache["evicted_pages"],
        "rollout:prefix_cache_hit_tokens_total": cache["hit_tokens"],
        "rollout:prefix_cache_looked_up_tokens_total": cache["looked_up_tokens"],
    }
    assert cache["cached_pages"] > 0 and cache["hit_tokens"] > 0


def test_a_client_leaving_mid_stream_aborts_its_request(server, client):
    import time

    long = {"temperature": 0, "max_new_tokens": 250, "ignore_eos": True}
    payload = {"input_ids": [7, 8, 9], "sampling_params": long, "stream": True, "rid": "leaver"}
    before = client.get("/get_server_info").json()["generated_tokens"]
    with httpx.Client(base_url=server.url, timeout=60) as other:
        with other.stream("POST", "/generate", json=payload) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
        # the connection is closed here, long before 250 tokens
    deadline = time.monotonic() + 60
    while client.get("/get_load").json()[0]["num_reqs"]:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.1)
    generated = client.get("/get_server_info").json()["generated_tokens"] - before
    assert 1 <= generated < 250  # aborted, not run to its 250 tokens
