"""Weight synchronisation from the trainer to the rollout engines (refit).

Two transports: a standalone gloo/NCCL process group that streams flattened per-dtype buckets
(:class:`WeightSender` / :func:`receive`), and a colocated zero-copy path over shared memory or
CUDA IPC (:class:`ColocatedBuckets` / :func:`load_colocated`). See :mod:`weight_sync.trainer`
for the trainer-side integration. Imports only torch and the standard library.
"""

from __future__ import annotations

from weight_sync.bucket import DEFAULT_BUCKET_BYTES, metas_of, pack, plan_buckets, unpack
from weight_sync.colocated import (
    BucketHandle,
    ColocatedBuckets,
    SegmentPool,
    iter_colocated,
    load_colocated,
    open_bucket,
)
from weight_sync.errors import WeightSyncError, WeightSyncTimeout
from weight_sync.group import WeightGroup, create_group, free_port
from weight_sync.receiver import BucketStream, WeightReceiver, receive
from weight_sync.sender import TransferStats, WeightSender
from weight_sync.shm import list_segments, remove_segments
from weight_sync.spec import BucketMeta, TensorMeta, UpdatePlan, dtype_from_str, dtype_to_str
from weight_sync.trainer import (
    flatten_parameters,
    named_tensors_of,
    push_colocated,
    push_distributed,
)

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "BucketHandle",
    "BucketMeta",
    "BucketStream",
    "ColocatedBuckets",
    "TensorMeta",
    "TransferStats",
    "UpdatePlan",
    "WeightGroup",
    "WeightReceiver",
    "WeightSender",
    "WeightSyncError",
    "WeightSyncTimeout",
    "create_group",
    "dtype_from_str",
    "dtype_to_str",
    "flatten_parameters",
    "free_port",
    "iter_colocated",
    "list_segments",
    "load_colocated",
    "metas_of",
    "named_tensors_of",
    "open_bucket",
    "pack",
    "plan_buckets",
    "push_colocated",
    "push_distributed",
    "receive",
    "remove_segments",
    "SegmentPool",
    "unpack",
]
