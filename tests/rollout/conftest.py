"""Fixtures for the Ray service tests: one local Ray per session (4 logical CPUs, so several
engines with fractional CPUs fit on a 2-core machine) and the tiny test models."""

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
    """Local Ray, started on first use. Module-scoped and re-checked, because the multi-node
    module shuts it down to run its own cluster."""
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
