"""Per-bucket control message shared by :mod:`sender` and :mod:`receiver`.

Before every bucket the sender broadcasts a small int64 header. It lets receivers (1) verify
that the byte stream matches the plan they got by RPC (version, plan fingerprint, bucket index,
size) instead of silently loading garbage, and (2) learn that the sender aborted (e.g. a bad
tensor), so they raise at once instead of waiting for the timeout.

Headers do not cost a round trip per bucket: both sides post them asynchronously, and a
receiver posts header and bucket ``i + 1`` as soon as header ``i`` checked out, while bucket
``i`` is still on the wire. So a receiver always has exactly one header-and-bucket pair posted
that the sender has not decided on yet; that is why an abort header is followed by a dummy
bucket of the announced size (skipped if empty), and nothing after it: the update ends there,
the stream stays in sync and the group reusable.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from weight_sync.errors import WeightSyncError
from weight_sync.group import PendingOp, WeightGroup
from weight_sync.spec import UpdatePlan

MAGIC = 0x5753_4844  # "WSHD"
STATUS_OK = 0
STATUS_ABORT = 1
_FIELDS = ("magic", "version", "fingerprint", "index", "num_buckets", "nbytes", "status")


def _version_code(version: int | str) -> int:
    # String versions travel as a CRC32; the full value is already covered by the fingerprint.
    if isinstance(version, str):
        return zlib.crc32(version.encode())
    return version % (1 << 62)  # must fit the int64 header


def _encode(plan: UpdatePlan, fingerprint: int, index: int, status: int) -> torch.Tensor:
    nbytes = plan.buckets[index].nbytes if index < len(plan.buckets) else 0
    version = _version_code(plan.weight_version)
    values = [MAGIC, version, fingerprint, index, len(plan.buckets), nbytes, status]
    return torch.tensor(values, dtype=torch.int64)


def send_header(
    group: WeightGroup, src: int, plan: UpdatePlan, fingerprint: int, index: int, status: int
) -> PendingOp:
    """Start broadcasting the header for bucket ``index`` (``status`` OK or ABORT)."""
    header = _encode(plan, fingerprint, index, status).to(group.device)
    return group.broadcast_async(header, src, f"header {index}/{len(plan.buckets)}")


def post_header(group: WeightGroup, src: int, plan: UpdatePlan, index: int) -> PendingHeader:
    """Start receiving the header for bucket ``index``; check it with :func:`check_header`."""
    n = len(plan.buckets)
    got = torch.zeros(len(_FIELDS), dtype=torch.int64, device=group.device)
    what = f"header {index}/{n} (weight_version {plan.weight_version})"
    return PendingHeader(group.broadcast_async(got, src, what), got, index)


def post_bucket(
    group: WeightGroup, src: int, plan: UpdatePlan, index: int, target: torch.Tensor
) -> tuple[PendingHeader, PendingOp | None]:
    """Post the receives of header ``index`` and of its bucket's bytes into ``target`` (a uint8
    tensor of at least the bucket's size); an empty bucket has no bytes on the wire."""
    header, nbytes = post_header(group, src, plan, index), plan.buckets[index].nbytes
    if not nbytes:
        return header, None
    what = f"bucket {index}/{len(plan.buckets)} ({nbytes} bytes, version {plan.weight_version})"
    return header, group.broadcast_async(target[:nbytes], src, what)


@dataclass
class PendingHeader:
    op: PendingOp
    got: torch.Tensor
    index: int


def check_header(
    group: WeightGroup, header: PendingHeader, plan: UpdatePlan, fingerprint: int
) -> bool:
    """Wait for ``header``; ``True`` if the sender aborted the update there (its dummy bucket
    still follows: receive it before raising :func:`aborted_error`, to stay in sync).

    Raises ``WeightSyncError`` if the stream does not match ``plan``.
    """
    header.op.wait()
    index, n = header.index, len(plan.buckets)
    fields = dict(zip(_FIELDS, header.got.cpu().tolist()))
    aborted = fields["status"] == STATUS_ABORT
    # An abort header must match the plan too: its dummy bucket has the size this plan says.
    status = STATUS_ABORT if aborted else STATUS_OK
    expected = dict(zip(_FIELDS, _encode(plan, fingerprint, index, status).tolist()))
    if fields == expected:
        return aborted
    diff = {k: (fields[k], expected[k]) for k in _FIELDS if fields[k] != expected[k]}
    raise WeightSyncError(
        f"weight-sync group {group.name!r}: stream does not match the plan at bucket "
        f"{index}/{n} (got, expected): {diff}; destroy and recreate the group"
    )


def aborted_error(group: WeightGroup, plan: UpdatePlan, index: int) -> WeightSyncError:
    return WeightSyncError(
        f"weight-sync group {group.name!r}: sender aborted update (plan weight_version "
        f"{plan.weight_version!r}) before bucket {index}/{len(plan.buckets)}; see the sender's "
        "error"
    )
