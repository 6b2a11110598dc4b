from __future__ import annotations

import os
import sys

# Triton kernels are checked on CPU by its interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import make_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Factory: a cached tiny model directory per (kind, overrides)."""
    cache: dict = {}

    def get(kind: str = "llama", **overrides):
        key = (kind, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"model-{kind}")
            cache[key] = make_model(str(path), kind, **overrides)
        return cache[key]

    return get
