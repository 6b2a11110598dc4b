from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from server_process import ServerProcess, add_chat_template  # noqa: E402
from tiny_models import make_model  # noqa: E402

ENGINE = ["--engine", "device=cpu", "--engine", "max_total_tokens=4096"]


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory) -> str:
    """The tiny llama with a chat template."""
    return add_chat_template(make_model(str(tmp_path_factory.mktemp("chat-llama")), "llama"))


@pytest.fixture(scope="module")
def server(chat_model):
    proc = ServerProcess(["--model-path", chat_model, "--served-model-name", "tiny", *ENGINE])
    yield proc
    proc.stop()
