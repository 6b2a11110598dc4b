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


# ---- Ray service tests (tests/rollout, tests/compat): one local Ray per session, 4 logical
# CPUs so several engines with fractional CPUs fit on a 2-core machine.
@pytest.fixture(scope="session")
def _ray_session():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """Local Ray, started on first use. Module-scoped and re-checked, because the multi-node
    modules shut it down to run their own clusters."""
    import ray

    from rollout.ray_env import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=4)
    yield


@pytest.fixture(scope="session")
def tiny_model(model_dir) -> str:
    return model_dir("llama")


@pytest.fixture(scope="session")
def tiny_model_v2(model_dir) -> str:
    """Same architecture as ``tiny_model``, different random weights (a 'new checkpoint')."""
    return model_dir("llama", seed=1)
