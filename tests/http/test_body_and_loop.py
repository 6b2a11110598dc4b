"""Request bodies and the event loop: a non-JSON content type is a 415, a chunked body over
``--max-body-mb`` is a 413 as soon as the limit is crossed (not after reading it all), a
streamed batch is bounded like a plain one, and tokenizing a huge prompt does not stall other
clients (``/health`` keeps answering)."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest
from conftest import ENGINE
from server_process import ServerProcess

OK = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}
LIMIT = 4 << 20  # --max-body-mb 4


@pytest.fixture(scope="module")
def small_body(chat_model):
    proc = ServerProcess(["--model-path", chat_model, "--max-body-mb", "4", *ENGINE])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(small_body):
    with httpx.Client(base_url=small_body.url, timeout=120) as c:
        yield c


def assert_serving(client: httpx.Client) -> None:
    assert client.post("/generate", json=OK).json()["meta_info"]["completion_tokens"] == 2


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/abort_request"])
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "image/png"]
)
def test_a_non_json_content_type_is_a_415(client, path, content_type):
    body = b'{"prompt": "hi", "max_tokens": 2}' if "v1" in path else b"{}"
    response = client.post(path, content=body, headers={"Content-Type": content_type})
    assert response.status_code == 415, response.text
    error = response.json()
    assert error["param"] == "content-type" and content_type in error["message"], error
    assert_serving(client)


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8"])
def test_json_or_no_content_type_is_served(client, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = b'{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}'
    assert client.post("/generate", content=body, headers=headers).status_code == 200


def read_answer(sock: socket.socket) -> str:
    """One HTTP answer (headers and a Content-Length body), or what came before the close."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < body_length(data):
        part = sock.recv(65536)
        if not part:
            break
        data += part
    return data.decode("latin-1")


def body_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_a_chunked_body_over_the_limit_is_a_413_before_it_ends(small_body, client):
    """The body never ends (no terminating chunk): the answer must come from what was read."""
    url = urlparse(small_body.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        head = (
            f"POST /generate HTTP/1.1\r\nHost: {url.netloc}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode())
        chunk = b"1," * (32 << 10)  # 64 KiB
        for _ in range(LIMIT // len(chunk) + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = read_answer(sock)
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert '"param":"body"' in answer and str(LIMIT) in answer, answer
    assert_serving(client)


def test_a_chunked_body_within_the_limit_is_served(client):
    def parts():
        yield b'{"input_ids": [1, 2], '
        yield b'"sampling_params": {"max_new_tokens": 2}}'

    response = client.post(
        "/generate", content=parts(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text


def test_a_streamed_batch_is_bounded_like_a_plain_one(client):
    body = {"input_ids": [[1]] * 9000, "stream": True, "sampling_params": {"max_new_tokens": 1}}
    response = client.post("/generate", json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["param"] == "input_ids" and "9000 prompts" in error["message"], error
    assert_serving(client)


# 8191 prompts that fit the context, then one that does not (each short enough to pass the
# early refusal of over-long text): all are tokenized before the 400, by the engine
# (/generate) or by the OpenAI route (it returns the prompt ids). One ~3.6 MB prompt is
# refused by its length before any tokenizing.
FITS, TOO_LONG = "the quick brown fox " * 19, "the quick brown fox " * 150
HUGE = [
    ("/generate", {"text": [FITS] * 8191 + [TOO_LONG], "sampling_params": {"max_new_tokens": 1}}),
    ("/v1/completions", {"prompt": [FITS] * 8191 + [TOO_LONG], "max_tokens": 1}),
    ("/v1/completions", {"prompt": "the quick brown fox " * 180000, "max_tokens": 1}),
]


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/v1/completions", {"prompt": "the quick brown fox " * 180000}, "prompt"),
        ("/v1/completions", {"prompt": ["hi", "the quick brown fox " * 180000]}, "prompt[1]"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x" * 3_600_000}]},
            "messages",
        ),
        ("/generate", {"text": "the quick brown fox " * 180000}, "prompt"),
    ],
)
def test_text_too_long_for_any_tokenization_is_refused_by_length(client, path, body, field):
    started = time.monotonic()
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["param"] == field and "characters" in error["message"], error
    assert time.monotonic() - started < 1.0, "it was tokenized first"
    assert_serving(client)


@pytest.mark.parametrize("path, body", HUGE)
def test_a_huge_prompt_does_not_stall_other_clients(small_body, client, path, body):
    """Seconds of tokenization; meanwhile ``/health`` answers at once."""
    slowest, stop = [0.0], threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=small_body.url, timeout=60) as c:
            while not stop.is_set():
                started = time.monotonic()
                assert c.get("/health").status_code == 200
                slowest[0] = max(slowest[0], time.monotonic() - started)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        time.sleep(0.2)
        response = client.post(path, json=body)
    finally:
        stop.set()
        poller.join()
    assert response.status_code == 400, response.text
    assert "prompt" in response.json()["param"], response.text
    assert slowest[0] < 1.0, f"/health took {slowest[0]:.2f}s while the prompt was tokenized"
    assert_serving(client)
