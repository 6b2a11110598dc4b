"""Bad input is a 4xx JSON naming the field and value, and the next request is served; with an
API key set, a wrong or missing key is a 401 (``/health`` and ``/metrics`` stay open)."""

from __future__ import annotations

import httpx
import pytest
from conftest import ENGINE
from server_process import ServerProcess

KEY = "sekret"
OK = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}


@pytest.fixture(scope="module")
def keyed(chat_model):
    proc = ServerProcess(
        ["--model-path", chat_model, "--api-key", KEY, "--max-body-mb", "4", *ENGINE]
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(keyed):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed.url, headers=headers, timeout=120) as c:
        yield c


def test_api_key(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as anon:
        assert anon.post("/generate", json=OK).status_code == 401
        wrong = anon.post("/generate", json=OK, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["message"].startswith("Unauthorized")
        assert anon.get("/v1/models").status_code == 401
        assert anon.get("/health").status_code == 200
        assert anon.get("/metrics").status_code == 200
        good = anon.post("/generate", json=OK, headers={"Authorization": f"Bearer {KEY}"})
        assert good.status_code == 200


BAD_NATIVE = [
    (b"{not json", "body", "{not json"),
    (b"[1, 2]", "body", "[1, 2]"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "ten"}}, "max_new_tokens", "ten"),
    ({"input_ids": [1, 2], "sampling_params": {"temprature": 0.5}}, "temprature", "0.5"),
    ({"input_ids": [1, 2], "colour": "red"}, "colour", "red"),
    ({"text": "", "sampling_params": {}}, "prompt", "''"),
    ({"input_ids": [], "sampling_params": {}}, "input_ids", "[]"),
    ({"input_ids": [1, 99999]}, "input_ids", "99999"),
    ({"input_ids": [1] * 300}, "prompt", "300 tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -5}}, "max_new_tokens", "-5"),
    ({"input_ids": [1, 2], "stream": "yes"}, "stream", "yes"),
]


@pytest.mark.parametrize("body, field, value", BAD_NATIVE)
def test_bad_generate_is_a_400_naming_field_and_value(client, body, field, value):
    if isinstance(body, bytes):
        response = client.post(
            "/generate", content=body, headers={"Content-Type": "application/json"}
        )
    else:
        response = client.post("/generate", json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert field in error["message"] and value in error["message"], error
    assert client.post("/generate", json=OK).json()["meta_info"]["completion_tokens"] == 2


BAD_CONTROL = [
    ("/pause_generation", {"mode": "sideways"}, "mode", "sideways"),
    ("/abort_request", {"rid": "x", "abort_al": True}, "abort_al", "True"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1"}, "master_port", "required"),
    ("/update_weights_from_disk", {"model_path": 5}, "model_path", "5"),
    (
        "/update_weights_from_distributed",
        {"names": ["a"], "dtypes": ["float32"], "shapes": "x"},
        "shapes",
        "x",
    ),
    ("/update_weight_version", {}, "new_version", "required"),
    ("/release_memory_occupation", {"tags": "weights"}, "tags", "weights"),
    ("/get_weights_by_name", {"name": "no.such.weight"}, "no.such.weight", ""),
]


@pytest.mark.parametrize("path, body, field, value", BAD_CONTROL)
def test_bad_control_is_a_400_naming_field_and_value(client, path, body, field, value):
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert field in message and value in message, message
    assert client.get("/health_generate").status_code == 200


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"model": "gpt-9", "prompt": "hi"}, 404, "model"),
        ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "hi", "n": 0}, 400, "n"),
        ({"prompt": "hi", "echo": True}, 400, "echo"),
        ({"prompt": "hi", "colour": 1}, 400, "colour"),
        ({}, 400, "prompt"),
    ],
)
def test_bad_completions(client, body, status, field):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    assert field in response.json()["message"]
    ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_oversize_body_is_a_413(client):
    huge = b'{"input_ids": [' + b"1," * (3 << 20) + b"1]}"  # 6 MiB, over --max-body-mb 4
    response = client.post("/generate", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "body" in response.json()["message"]
    assert client.post("/generate", json=OK).status_code == 200
