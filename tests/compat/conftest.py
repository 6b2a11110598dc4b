"""Fixtures of the SGLang drop-in tests: the tiny test models (``model_dir`` of tests/conftest.py)
and one local Ray per session for the EngineActor test (the ``ray_local`` pattern of
tests/rollout/conftest.py)."""

from __future__ import annotations

import pytest
import ray

from rollout.ray_env import init_ray


@pytest.fixture(scope="session")
def _ray_session():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """Local Ray, started on first use (4 logical CPUs, so engines with fractional CPUs fit on a
    2-core machine). Module-scoped and re-checked, because other modules may shut it down."""
    if not ray.is_initialized():
        init_ray(num_cpus=4)
    yield


@pytest.fixture(scope="session")
def tiny_model(model_dir) -> str:
    return model_dir("llama")


@pytest.fixture(scope="session")
def tiny_model_v2(model_dir) -> str:
    """Same architecture as ``tiny_model``, other random weights (a 'new checkpoint')."""
    return model_dir("llama", seed=1)
