"""Per-bucket control message shared by :mod:`sender` and :mod:`receiver`.

Before every bucket the sender broadcasts a small int64 header. It lets receivers (1) verify
that the byte stream matches the plan they got by RPC (version, plan fingerprint, bucket index,
size) instead of silently loading garbage, and (2) learn that the sender aborted (e.g. a bad
tensor), so they raise at once instead of waiting for the timeout. Because a header always
precedes its bucket and an abort header is the last message of an update, an abort leaves the
stream in sync and the group reusable.
"""

from __future__ import annotations

import zlib

import torch

from weight_sync.errors import WeightSyncError
from weight_sync.group import WeightGroup
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
) -> None:
    """Broadcast the header for bucket ``index`` (``status`` OK or ABORT)."""
    header = _encode(plan, fingerprint, index, status).to(group.device)
    group.broadcast(header, src, f"header {index}/{len(plan.buckets)}")


def recv_header(
    group: WeightGroup, src: int, plan: UpdatePlan, fingerprint: int, index: int
) -> None:
    """Receive and check the header for bucket ``index``.

    Raises ``WeightSyncError`` if the sender aborted or the stream does not match ``plan``.
    """
    n = len(plan.buckets)
    got = torch.zeros(len(_FIELDS), dtype=torch.int64, device=group.device)
    group.broadcast(got, src, f"header {index}/{n} (weight_version {plan.weight_version})")
    fields = dict(zip(_FIELDS, got.cpu().tolist()))
    if fields["magic"] == MAGIC and fields["status"] == STATUS_ABORT:
        raise WeightSyncError(
            f"weight-sync group {group.name!r}: sender aborted update (plan weight_version "
            f"{plan.weight_version!r}) before bucket {index}/{n}; see the sender's error"
        )
    expected = dict(zip(_FIELDS, _encode(plan, fingerprint, index, STATUS_OK).tolist()))
    if fields != expected:
        diff = {k: (fields[k], expected[k]) for k in _FIELDS if fields[k] != expected[k]}
        raise WeightSyncError(
            f"weight-sync group {group.name!r}: stream does not match the plan at bucket "
            f"{index}/{n} (got, expected): {diff}; destroy and recreate the group"
        )
