"""The one place that decides how Ray is started: process environment, ``ray.init`` arguments and
the runtime_env every actor of the service inherits.

Defaults are quiet and local: no usage stats, no dashboard, and a Ray started here lives on
loopback (127.0.0.1). Values a user already exported win (``setdefault``), so an operator can
still opt in to, e.g., usage stats.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

# Read by Ray when the driver and the processes it launches start, so they are put into the
# environment before ``ray.init`` / ``Cluster`` starts anything.
QUIET_ENV: dict[str, str] = {"RAY_USAGE_STATS_ENABLED": "0"}
# Ray's "no cluster" mode: the node's IP is 127.0.0.1 (also when a 127.0.0.1 address is joined,
# which Ray otherwise rewrites to the host's external IP). Only for Ray on this machine: a driver
# joining a real cluster must advertise a reachable IP.
LOOPBACK_ENV: dict[str, str] = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# Environment of every worker process of the service (engine and driver actors).
WORKER_ENV: dict[str, str] = {
    # Fork-after-tokenizer-use warnings; engines tokenize on one thread anyway.
    "TOKENIZERS_PARALLELISM": "false",
    # Ray's own deprecation chatter from inside actor methods (e.g. runtime_context) is noise.
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}

LOOPBACK = "127.0.0.1"


def is_loopback(address: str | None) -> bool:
    """True for "start Ray here" (None) and for addresses on this machine's loopback."""
    if address is None:
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def apply_process_env(loopback: bool = True) -> None:
    """Put ``QUIET_ENV`` (and, for a local Ray, ``LOOPBACK_ENV``) into ``os.environ``, keeping
    values already set."""
    for key, value in {**QUIET_ENV, **(LOOPBACK_ENV if loopback else {})}.items():
        os.environ.setdefault(key, value)
    consts = sys.modules.get("ray._private.ray_constants")
    if loopback and consts is not None:
        # Ray reads this variable once, when it is imported; if that already happened (the caller
        # imported ray first), bring its parsed value in line with the environment.
        value = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower()
        consts.ENABLE_RAY_CLUSTER = value in ("1", "true")


def runtime_env() -> dict[str, Any]:
    """The runtime_env of the service's job (passed to ``ray.init``; actors inherit it)."""
    return {"env_vars": dict(WORKER_ENV)}


def head_node_args(
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    resources: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Arguments for a local head node (``ray.init`` or ``ray.cluster_utils.Cluster``)."""
    args: dict[str, Any] = {"include_dashboard": False, "node_ip_address": LOOPBACK}
    if num_cpus is not None:
        args["num_cpus"] = num_cpus
    if num_gpus is not None:
        args["num_gpus"] = num_gpus
    if resources:
        args["resources"] = dict(resources)
    return args


def init_ray(
    address: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    resources: dict[str, float] | None = None,
) -> bool:
    """Start (``address=None``) or join (``address="auto"`` / ``"host:port"``) Ray quietly.

    Returns True when this call initialized Ray (the caller then owns ``ray.shutdown()``), False
    when Ray was already initialized in this process (the existing instance is used as is).
    """
    import ray

    if ray.is_initialized():
        return False
    apply_process_env(loopback=is_loopback(address))
    kwargs: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "runtime_env": runtime_env(),
        # The service's own RPC traffic is the output; worker stdout still reaches the driver.
        "log_to_driver": True,
    }
    if address is None:
        head = head_node_args(num_cpus, num_gpus, resources)
        kwargs["include_dashboard"] = head.pop("include_dashboard")
        kwargs["_node_ip_address"] = head.pop("node_ip_address")
        kwargs.update(head)
    else:
        kwargs["address"] = address
    ray.init(**kwargs)
    return True


def make_cluster(head: dict[str, Any] | None = None):
    """A ``ray.cluster_utils.Cluster`` (simulated multi-node, for tests) with a quiet loopback
    head; add nodes with ``cluster.add_node(**node_args(...))`` and join with
    ``init_ray(cluster.address)``."""
    from ray.cluster_utils import Cluster

    apply_process_env(loopback=True)
    return Cluster(initialize_head=True, head_node_args={**head_node_args(), **(head or {})})


def node_args(
    num_cpus: float,
    resources: dict[str, float] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Arguments for ``Cluster.add_node`` (loopback, no dashboard)."""
    args: dict[str, Any] = {"num_cpus": num_cpus, "node_ip_address": LOOPBACK}
    if resources:
        args["resources"] = dict(resources)
    if labels:
        args["labels"] = dict(labels)
    return args
