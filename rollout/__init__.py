"""rollout: the Ray service layer (the only package that imports Ray).

``deploy(config)`` starts a ``RolloutService``: ``EngineActor``s (one ``engine_core.Engine``
each) placed by a placement group, and a ``RolloutDriver`` that shards rollouts over them.
Names are imported lazily so ``import rollout`` (e.g. for ``rollout demo``) pulls in neither
Ray nor torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ServiceConfig": "rollout.config",
    "load_config": "rollout.config",
    "RolloutService": "rollout.service",
    "deploy": "rollout.service",
    "EngineActor": "rollout.engine_actor",
    "WeightsSource": "rollout.engine_actor",
    "RolloutDriver": "rollout.driver",
    "RoutingPolicy": "rollout.policies",
    "register_policy": "rollout.policies",
    "PlacementError": "rollout.placement",
    "init_ray": "rollout.ray_env",
    "WeightSync": "rollout.weight_sync_actor",
    "WeightSyncActor": "rollout.weight_sync_actor",
    "RefitError": "rollout.weight_sync_actor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rollout' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
