"""Placement groups for engines, failing fast when the cluster cannot hold them.

Ray queues an infeasible placement group forever; here the request is first checked against the
alive nodes (total per resource, each bundle on some single node, label selectors), and then
``pg.ready()`` is awaited with a timeout. Either failure raises ``PlacementError`` naming what
was asked and what the cluster has.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

_EPS = 1e-9


class PlacementError(RuntimeError):
    """The requested placement cannot be satisfied by the cluster."""


def _fmt(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if not _internal(k)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def _internal(key: str) -> bool:
    # Per-node and per-bundle bookkeeping resources Ray adds; never asked for by users.
    return key.startswith("node:") or "_group_" in key or key in ("memory", "object_store_memory")


def _fits(have: dict[str, float], need: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) + _EPS >= v for k, v in need.items())


def _matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    # Only plain equality is pre-checked; operator selectors ("!x", "in(a,b)") are left to Ray
    # and to the ready() timeout.
    return all(
        labels.get(k) == v for k, v in selector.items() if not v.startswith("!") and "(" not in v
    )


def check_feasible(
    bundles: list[dict[str, float]],
    strategy: str,
    label_selector: dict[str, str] | None = None,
) -> None:
    """Raise ``PlacementError`` if no alive nodes could ever hold ``bundles``."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if label_selector:
        matching = [n for n in nodes if _matches(n.get("Labels") or {}, label_selector)]
        if not matching:
            raise PlacementError(
                f"no alive node has labels {label_selector}; node labels: "
                f"{[n.get('Labels') for n in nodes]}"
            )
        nodes = matching
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node["Resources"].items():
            totals[key] = totals.get(key, 0.0) + value
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            need[key] = need.get(key, 0.0) + value
    where = f" on nodes with labels {label_selector}" if label_selector else ""
    for key, amount in need.items():
        if totals.get(key, 0.0) + _EPS < amount:
            raise PlacementError(
                f"infeasible placement: {len(bundles)} engine bundle(s) of {_fmt(bundles[0])} "
                f"need {key}={amount:g} in total, but the cluster has {key}="
                f"{totals.get(key, 0.0):g}{where} (cluster: {_fmt(totals)})"
            )
    per_node = [node["Resources"] for node in nodes]
    for bundle in bundles:
        if not any(_fits(have, bundle) for have in per_node):
            raise PlacementError(
                f"infeasible placement: no single node{where} can hold a bundle of {_fmt(bundle)}; "
                f"nodes have {[_fmt(h) for h in per_node]}"
            )
    if strategy == "STRICT_PACK" and not any(_fits(have, need) for have in per_node):
        raise PlacementError(
            f"infeasible placement: STRICT_PACK needs {_fmt(need)} on one node; "
            f"nodes have {[_fmt(h) for h in per_node]}"
        )
    if strategy == "STRICT_SPREAD" and len(bundles) > len(nodes):
        raise PlacementError(
            f"infeasible placement: STRICT_SPREAD of {len(bundles)} bundles needs as many nodes, "
            f"the cluster has {len(nodes)}{where}"
        )


def create_placement_group(
    bundles: list[dict[str, float]],
    strategy: str,
    timeout_s: float,
    label_selector: dict[str, str] | None = None,
    name: str = "",
) -> PlacementGroup:
    """Check, create and wait for a placement group; on timeout it is removed again."""
    check_feasible(bundles, strategy, label_selector)
    kwargs: dict[str, Any] = {"strategy": strategy, "name": name}
    if label_selector:
        kwargs["bundle_label_selector"] = [dict(label_selector) for _ in bundles]
    pg = placement_group(bundles, **kwargs)
    wait_ready(pg, timeout_s, bundles, remove_on_timeout=True)
    return pg


def wait_ready(
    pg: PlacementGroup,
    timeout_s: float,
    bundles: list[dict[str, float]] | None = None,
    remove_on_timeout: bool = False,
) -> None:
    """Wait for ``pg`` to be placed, or raise ``PlacementError`` after ``timeout_s``."""
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        if remove_on_timeout:
            remove_placement_group(pg)
        asked = bundles if bundles is not None else pg.bundle_specs
        raise PlacementError(
            f"placement group of bundles {[_fmt(b) for b in asked]} was not placed within "
            f"{timeout_s:g}s (placement_timeout_s); resources available now: "
            f"{_fmt(ray.available_resources())} of {_fmt(ray.cluster_resources())}"
        ) from None


def check_bundle_share(pg: PlacementGroup, indices: list[int], share: dict[str, float]) -> None:
    """Each bundle ``indices[i]`` of a caller's placement group must hold ``share`` (what one
    engine reserves) and have it free now (not taken by trainer actors), else
    ``PlacementError`` naming bundle and resource."""
    specs = pg.bundle_specs
    free_now = ray.available_resources()
    for index in indices:
        if index >= len(specs):
            raise PlacementError(
                f"bundle_indices has {index}, but the placement group has {len(specs)} bundles"
            )
        if not _fits(specs[index], share):
            raise PlacementError(
                f"bundle {index} of the placement group is {_fmt(specs[index])}; an engine "
                f"needs {_fmt(share)}"
            )
        # Ray accounts each bundle's resources as "<resource>_group_<index>_<pg id>".
        free = {k: free_now.get(f"{k}_group_{index}_{pg.id.hex()}", 0.0) for k in share}
        if not _fits(free, share):
            raise PlacementError(
                f"bundle {index} of the placement group has {_fmt(free)} free of "
                f"{_fmt(specs[index])} (the rest is held by other actors); an engine needs "
                f"{_fmt(share)}"
            )
