"""Service configuration: one validated dataclass; YAML is parsed only in ``load_config``.

Every check raises ``ValueError`` naming the field and its value. Checks that need the model
(tensor-parallel sizes against the head counts) are in ``check_model`` and run before any Ray
resource is created.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from rollout.policies import POLICIES
from rollout.routing.config import RouterConfig

MODES = ("local", "colocated", "disaggregated")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _bad(name: str, value: object, reason: str) -> ValueError:
    return ValueError(f"invalid config {name}={value!r}: {reason}")


@dataclass
class ServiceConfig:
    """A rollout service: ``num_engines`` engine actors and one driver routing prompt groups
    with ``policy`` (``round_robin``, ``least_load``, ``cache_aware``; ``router``: the
    cache-aware tunables, ``rollout.routing.config.RouterConfig`` fields).

    Placement: each engine reserves ``tp_size * cpus_per_rank`` CPUs and ``tp_size *
    gpus_per_rank`` GPUs (its TP ranks are processes of the actor, so they share its
    reservation) in one placement-group bundle.

    - ``local``: Ray is started on this machine if it is not running (``num_cpus``/``num_gpus``
      size it); one bundle per engine, ``placement_strategy`` (PACK by default).
    - ``colocated``: engines share bundles with trainer actors: engine ``i`` takes its fraction of
      bundle ``bundle_indices[i]`` of the placement group passed to ``deploy`` or, without one,
      of a group the service creates with ``num_engines`` bundles of ``bundle`` resources.
    - ``disaggregated``: engines go only to nodes with the custom resource ``engine_resource``
      (each engine takes ``engine_resource_per_engine`` of it) and/or the labels ``node_labels``.
    """

    model_path: str | None = None  # None: the embedded default model (engine_core.default_model)
    mode: str = "local"
    num_engines: int = 1
    engine: dict[str, Any] = field(default_factory=dict)  # engine_core.EngineConfig kwargs
    policy: str = "round_robin"
    router: dict[str, Any] = field(default_factory=dict)  # RouterConfig fields (cache_aware)
    cpus_per_rank: float = 1.0
    gpus_per_rank: float = 0.0
    placement_strategy: str = "PACK"
    bundle: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    bundle_indices: list[int] | None = None
    engine_resource: str | None = None
    engine_resource_per_engine: float = 1.0
    node_labels: dict[str, str] = field(default_factory=dict)
    address: str | None = None  # None: start or reuse Ray in this process; "auto": join cluster
    name: str | None = None  # actor names (driver `name`, engines `name-engine-i`); None: random
    num_cpus: float | None = None
    num_gpus: float | None = None
    max_restarts: int = 3
    placement_timeout_s: float = 30.0
    ready_timeout_s: float = 300.0
    restart_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise _bad("mode", self.mode, f"must be one of {MODES}")
        if self.model_path is not None and not (
            isinstance(self.model_path, str) and self.model_path
        ):
            raise _bad("model_path", self.model_path, "must be a non-empty path or null")
        _positive_int("num_engines", self.num_engines)
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise _bad("max_restarts", self.max_restarts, "must be an int >= 0")
        if self.name is not None and not (isinstance(self.name, str) and self.name):
            raise _bad("name", self.name, "must be a non-empty string or null")
        if self.policy not in POLICIES:
            raise _bad("policy", self.policy, f"unknown policy; known: {sorted(POLICIES)}")
        RouterConfig.from_dict(self.router)  # ValueError naming router.<field>
        if self.placement_strategy not in STRATEGIES:
            raise _bad(
                "placement_strategy", self.placement_strategy, f"must be one of {STRATEGIES}"
            )
        for name in ("cpus_per_rank", "gpus_per_rank"):
            _non_negative(name, getattr(self, name))
        if self.cpus_per_rank + self.gpus_per_rank <= 0:
            raise _bad(
                "cpus_per_rank", self.cpus_per_rank, "an engine must reserve some CPU or GPU"
            )
        for name in ("placement_timeout_s", "ready_timeout_s", "restart_timeout_s"):
            _non_negative(name, getattr(self, name), strict=True)
        self._check_engine()
        self._check_mode()

    # ------------------------------------------------------------------ checks
    def _check_engine(self) -> None:
        from engine_core.config import EngineConfig

        if not isinstance(self.engine, dict):
            raise _bad(
                "engine", self.engine, "must be a mapping of engine_core.EngineConfig fields"
            )
        if "model_path" in self.engine:
            raise _bad(
                "engine.model_path", self.engine["model_path"], "set the top-level model_path"
            )
        # Validate values here (field names, ranges); the device default is resolved in the actor,
        # on the node that runs it, so validate with an explicit one.
        EngineConfig.from_kwargs(self.model_path or "<default>", **{"device": "cpu", **self.engine})
        gpus = self.tp_size * self.gpus_per_rank
        if gpus > 1 and not math.isclose(gpus, round(gpus)):
            raise _bad(
                "gpus_per_rank",
                self.gpus_per_rank,
                f"tp_size={self.tp_size} ranks need {gpus} GPUs; Ray gives one actor a fraction "
                "of at most one GPU, so this must be a whole number when above 1",
            )

    def _check_mode(self) -> None:
        if self.mode == "local" and self.address is not None:
            raise _bad("address", self.address, "mode 'local' starts Ray itself; leave it null")
        if self.mode == "colocated":
            indices = self.bundle_indices
            if indices is not None:
                if len(indices) != self.num_engines or len(set(indices)) != len(indices):
                    raise _bad(
                        "bundle_indices", indices, f"need {self.num_engines} distinct indices"
                    )
                if any(not isinstance(i, int) or i < 0 for i in indices):
                    raise _bad("bundle_indices", indices, "indices must be ints >= 0")
            share = self.engine_resources()
            for key, amount in share.items():
                if amount > self.bundle.get(key, 0.0) + 1e-9:
                    raise _bad(
                        "bundle",
                        self.bundle,
                        f"an engine needs {key}={amount:g} (tp_size={self.tp_size} ranks), "
                        "more than one bundle holds",
                    )
        if self.mode == "disaggregated":
            if not self.engine_resource and not self.node_labels:
                raise _bad(
                    "engine_resource",
                    self.engine_resource,
                    "mode 'disaggregated' needs engine_resource and/or node_labels to pick nodes",
                )
            _non_negative("engine_resource_per_engine", self.engine_resource_per_engine, True)

    # ------------------------------------------------------------------ derived
    @property
    def tp_size(self) -> int:
        return int(self.engine.get("tp_size", 1))

    @property
    def weight_version(self) -> str:
        return str(self.engine.get("weight_version", "default"))

    def engine_resources(self) -> dict[str, float]:
        """What one engine actor reserves (CPU/GPU for all of its TP ranks; custom resource)."""
        res = {"CPU": self.tp_size * self.cpus_per_rank, "GPU": self.tp_size * self.gpus_per_rank}
        if self.mode == "disaggregated" and self.engine_resource:
            res[self.engine_resource] = self.engine_resource_per_engine
        return {k: v for k, v in res.items() if v > 0}

    def resolved_model_path(self) -> str:
        if self.model_path is not None:
            return self.model_path
        from engine_core.default_model import ensure_default_model

        return ensure_default_model()

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> ServiceConfig:
        """Build from a mapping, rejecting unknown keys by name."""
        if not isinstance(values, dict):
            raise ValueError(
                f"{source}: expected a mapping of ServiceConfig fields, got {values!r}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise _bad(key, values[key], f"unknown field in {source}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str, **overrides: Any) -> ServiceConfig:
    """Read a YAML file of ``ServiceConfig`` fields; ``overrides`` replace keys of the file."""
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of ServiceConfig fields, got {values!r}")
    values.update(overrides)
    return ServiceConfig.from_dict(values, source=path)


def check_model(config: ServiceConfig, model_path: str) -> None:
    """Check ``config`` against the model's config.json: tp_size must split the attention heads
    (and either split the KV heads or be a multiple of them). Raises ValueError naming sizes."""
    from engine_core.model_config import load_model_config

    mc = load_model_config(model_path)
    tp = config.tp_size
    if mc.num_heads % tp:
        raise _bad(
            "engine.tp_size",
            tp,
            f"does not divide num_attention_heads={mc.num_heads} of {model_path}",
        )
    if mc.num_kv_heads % tp and tp % mc.num_kv_heads:
        raise _bad(
            "engine.tp_size",
            tp,
            f"neither divides nor is a multiple of num_key_value_heads={mc.num_kv_heads} "
            f"of {model_path}",
        )


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _bad(name, value, "must be a positive int")


def _non_negative(name: str, value: object, strict: bool = False) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value < 0
        or (strict and value == 0)
    ):
        raise _bad(name, value, "must be a positive number" if strict else "must be >= 0")
