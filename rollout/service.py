"""``deploy`` / ``RolloutService``: creates Ray (if needed), the placement group, the driver and
the engine actors, and owns their shutdown.

Order of checks, so a bad config fails before anything is started: the config's own validation,
the model's head counts against ``tp_size``, the cluster's resources against the placement, the
placement group's readiness (timeout), then every engine's first health answer (timeout).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine_core.requests.generate_request import GenerateRequest, takes_generate_request
from rollout import placement
from rollout.config import ServiceConfig, check_model, load_config
from rollout.driver import RolloutDriver
from rollout.engine_actor import EngineActor, WeightsSource
from rollout.group_runner import new_rollout_id
from rollout.progress import ProgressBar
from rollout.ray_env import init_ray

NAMESPACE = "rollout"  # of named actors (ServiceConfig.name)


def _coerce(config: ServiceConfig | dict[str, Any] | str) -> ServiceConfig:
    if isinstance(config, ServiceConfig):
        return config
    if isinstance(config, str):
        return load_config(config)
    return ServiceConfig.from_dict(config)


class RolloutService:
    """A running rollout service. Use as a context manager or call ``shutdown()``.

    ``placement_group`` (colocated mode only): the trainer's group whose bundles the engines
    share; without one the service creates a group and exposes it as ``placement_group`` for the
    trainer's actors (the service removes what it created).
    """

    def __init__(
        self,
        config: ServiceConfig | dict[str, Any] | str,
        placement_group: PlacementGroup | None = None,
    ) -> None:
        self.config = _coerce(config)
        if placement_group is not None and self.config.mode != "colocated":
            raise ValueError(
                "invalid placement_group: only mode 'colocated' takes one "
                f"(mode={self.config.mode!r})"
            )
        self.model_path = self.config.resolved_model_path()
        check_model(self.config, self.model_path)
        self.placement_group: PlacementGroup | None = placement_group
        self.bundle_indices: list[int] = []
        self.engines: list[Any] = []
        self.driver: Any = None
        self._syncs: list[Any] = []  # WeightSyncActors made by weight_sync(), closed at shutdown
        self.name = ""
        self._owns_pg = False
        self._owns_ray = False
        self._closed = False
        try:
            self._owns_ray = init_ray(
                self.config.address, self.config.num_cpus, self.config.num_gpus
            )
            self._place()
            self._start_actors()
            self._wait_engines()
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ startup
    def _place(self) -> None:
        cfg = self.config
        share = cfg.engine_resources()
        if cfg.mode == "colocated" and self.placement_group is not None:
            self.bundle_indices = list(cfg.bundle_indices or range(cfg.num_engines))
            placement.wait_ready(self.placement_group, cfg.placement_timeout_s)
            placement.check_bundle_share(self.placement_group, self.bundle_indices, share)
            return
        if cfg.mode == "colocated":
            bundles = [dict(cfg.bundle) for _ in range(cfg.num_engines)]
        else:
            bundles = [dict(share) for _ in range(cfg.num_engines)]
        self.bundle_indices = list(range(cfg.num_engines))
        self.placement_group = placement.create_placement_group(
            bundles,
            cfg.placement_strategy,
            cfg.placement_timeout_s,
            label_selector=cfg.node_labels if cfg.mode == "disaggregated" else None,
        )
        self._owns_pg = True

    def _start_actors(self) -> None:
        cfg = self.config
        # The driver is named: restarted engines look it up to learn the current weights.
        self.name = cfg.name or f"rollout-{uuid.uuid4().hex[:8]}"
        share = cfg.engine_resources()
        custom = {k: v for k, v in share.items() if k not in ("CPU", "GPU")}
        for i, bundle in enumerate(self.bundle_indices):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group,
                placement_group_bundle_index=bundle,
                # TP helpers launched as Ray tasks/actors would stay in this bundle's node.
                placement_group_capture_child_tasks=True,
            )
            engine = EngineActor.options(
                name=f"{self.name}-engine-{i}",
                namespace=NAMESPACE,
                num_cpus=share.get("CPU", 0),
                num_gpus=share.get("GPU", 0),
                resources=custom or None,
                max_restarts=cfg.max_restarts,
                max_task_retries=0,  # the driver re-sends; Ray retrying too would duplicate work
                scheduling_strategy=strategy,
            ).remote(self.model_path, dict(cfg.engine), (self.name, NAMESPACE), i)
            self.engines.append(engine)
        # Created with its engines, so whoever finds it by name can route at once. It holds no
        # resources and is not in the group: it only routes.
        self.driver = RolloutDriver.options(
            name=self.name, namespace=NAMESPACE, num_cpus=0, max_restarts=0
        ).remote(
            self.engines,
            cfg.policy,
            WeightsSource(self.model_path, cfg.weight_version),
            cfg.restart_timeout_s,
            cfg.router,
        )

    def _wait_engines(self) -> None:
        """Every engine must answer ``health`` within ``ready_timeout_s``; a failed start raises
        with the engine's own error, a pending one names the probable cause."""
        timeout = self.config.ready_timeout_s
        refs = [engine.health.remote() for engine in self.engines]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for i, ref in enumerate(refs):
            if ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    raise RuntimeError(f"engine {i} failed to start: {exc}") from exc
        if pending:
            where = (
                f"bundles {self.bundle_indices} of the placement group may be held by other actors"
                if self.config.mode == "colocated"
                else "its resources may be taken"
            )
            raise TimeoutError(
                f"{len(pending)} of {len(refs)} engines did not start within ready_timeout_s="
                f"{timeout:g}; {where} (each needs {self.config.engine_resources()})"
            )

    # ------------------------------------------------------------------ API
    @takes_generate_request
    def submit(self, *args: Any, rollout_id: str | None = None, **kwargs: Any):
        """Start a rollout; returns the ObjectRef of its outputs (see ``generate``)."""
        request = GenerateRequest.of(*args, **kwargs)
        return self.driver.generate.remote(request, rollout_id=rollout_id)

    @takes_generate_request
    def generate(
        self,
        *args: Any,
        progress: bool | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 0.5,
        **kwargs: Any,
    ):
        """Roll out a batch over all engines and wait (``GenerateRequest``'s arguments): outputs
        in input order, the ``n`` samples of a prompt adjacent (Engine-shaped). A progress bar is
        drawn on stdout when it is a terminal (``progress`` forces it on/off); ``on_progress``
        gets each snapshot."""
        rollout_id = new_rollout_id()
        ref = self.submit(*args, rollout_id=rollout_id, **kwargs)
        bar = ProgressBar(sys.stdout, enabled=progress)
        if not bar.enabled and on_progress is None:
            return ray.get(ref)
        try:
            while not ray.wait([ref], timeout=poll_s)[0]:
                self._report(rollout_id, bar, on_progress)
            self._report(rollout_id, bar, on_progress)
        finally:
            bar.close()
        return ray.get(ref)

    def _report(self, rollout_id: str, bar: ProgressBar, on_progress) -> None:
        snap = ray.get(self.driver.progress.remote(rollout_id))
        bar.update(snap)
        if on_progress is not None and snap is not None:
            on_progress(snap)

    def progress(self, rollout_id: str | None = None) -> dict[str, Any] | None:
        return ray.get(self.driver.progress.remote(rollout_id))

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None):
        """Load new weights on every engine; restarted engines come up on them too."""
        return ray.get(self.driver.update_weights_from_disk.remote(model_path, weight_version))

    def weight_sync(self, **kwargs: Any) -> Any:
        """A ``WeightSyncActor`` over this service's engines, wired to its driver (so engines
        that Ray restarts on older weights stay out of rotation until the next refit). Keyword
        arguments go to ``rollout.weight_sync_actor.WeightSync``. The service owns the actor:
        ``shutdown`` closes its group and kills it."""
        from rollout.weight_sync_actor import WeightSyncActor

        options = {"num_cpus": 0}
        sync = WeightSyncActor.options(**options).remote(self.engines, driver=self.driver, **kwargs)
        self._syncs.append(sync)
        return sync

    def health(self) -> list[dict[str, Any] | None]:
        return ray.get(self.driver.health.remote())

    def routing_stats(self) -> dict[str, Any]:
        """The driver's routing counters (``RolloutDriver.routing_stats``)."""
        return ray.get(self.driver.routing_stats.remote())

    def server_info(self) -> list[dict[str, Any]]:
        return ray.get([engine.get_server_info.remote() for engine in self.engines])

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop engines, kill the actors, remove the placement group if this service created it,
        and stop Ray if this service started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._syncs and ray.is_initialized():
            # Leave the weight groups first (the engines are still up to answer).
            refs = [sync.close.remote() for sync in self._syncs]
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if self.engines and ray.is_initialized():
            # Graceful first, so engines release TP workers; then kill (no restart).
            refs = [engine.shutdown.remote() for engine in self.engines]
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for actor in [*self._syncs, *self.engines, self.driver]:
            if actor is not None and ray.is_initialized():
                ray.kill(actor, no_restart=True)
        if self._owns_pg and self.placement_group is not None and ray.is_initialized():
            remove_placement_group(self.placement_group)
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> RolloutService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def deploy(
    config: ServiceConfig | dict[str, Any] | str,
    placement_group: PlacementGroup | None = None,
) -> RolloutService:
    """Start a rollout service from a ``ServiceConfig``, a mapping of its fields, or a YAML
    path (see ``configs/``)."""
    return RolloutService(config, placement_group)
