"""Argument checks of the refit verbs, made before any rank is asked to do anything: SGLang's
types (a truthy "no" must not commit, nor an int become a label by ``str``) and what the
weight-update group protocol needs (rank 0 is the sender)."""

from __future__ import annotations

from weight_sync.group import check_timeout


def check_refit_flags(version: object, commit: object = True) -> None:
    """``weight_version``: a non-empty str or None; ``commit``: a bool."""
    if version is not None and (not isinstance(version, str) or not version):
        raise ValueError(f"invalid weight_version={version!r}: must be a non-empty str or None")
    if not isinstance(commit, bool):
        raise ValueError(f"invalid commit={commit!r}: must be a bool")


def check_group_args(
    rank_offset: object, world_size: object, group_name: object, timeout_s: object, tp: int
) -> None:
    """An engine of ``tp`` ranks joining as ranks ``rank_offset .. rank_offset + tp - 1`` of
    ``world_size``; rank 0 is the trainer, which broadcasts (an engine there would "receive"
    its own memory)."""
    for name, value in (("rank_offset", rank_offset), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"invalid {name}={value!r}: must be an int")
    if not isinstance(group_name, str) or not group_name:
        raise ValueError(f"invalid group_name={group_name!r}: must be a non-empty str")
    if rank_offset < 1:  # type: ignore[operator]
        raise ValueError(
            f"invalid rank_offset={rank_offset}: rank 0 is the sender (the trainer), so an "
            "engine's ranks start at 1 or above"
        )
    check_timeout(timeout_s)
    if rank_offset + tp > world_size:  # type: ignore[operator]
        raise ValueError(
            f"rank_offset={rank_offset} with tp_size={tp} does not fit world_size={world_size}"
        )
