"""``CallerRids``: request ids a caller chose for a rollout's prompts, unique in the driver.

SGLang accepts a caller's ``rid`` on ``generate`` (one per prompt in a batch) and so does the
driver: a prompt group is sent to its engine under the caller's rid (its ``n`` samples become
``{rid}-{i}`` on the engine, as the engine names them) instead of the driver's
``{rollout_id}-{group}``, and the rid's session key routes it (``rollout.routing.sessions``).
A rid is refused with ``InvalidRequestError`` naming it when it is not a non-empty str, repeats
within the request, or is already in flight through this driver; an engine-side clash (a rid
sent to the engine directly) stays the engine's own typed error. Pure Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from engine_core.errors import InvalidRequestError
from engine_core.requests.generate_request import GenerateItem


class CallerRids:
    """The caller rids in flight through one driver."""

    def __init__(self) -> None:
        self._inflight: set[str] = set()

    def __contains__(self, rid: str) -> bool:
        return rid in self._inflight

    @contextmanager
    def claimed(self, items: list[GenerateItem]) -> Iterator[list[str]]:
        """Hold the items' rids (none given: nothing held) while the rollout runs."""
        rids = [item.rid for item in items if item.rid is not None]
        if not rids:
            yield []
            return
        if len(rids) != len(items):
            raise InvalidRequestError("rid", [i.rid for i in items], "give one rid per prompt")
        for item in items:
            if not isinstance(item.rid, str) or not item.rid:
                raise InvalidRequestError(f"rid{item.where}", item.rid, "must be a non-empty str")
        if len(set(rids)) != len(rids):
            raise InvalidRequestError("rid", rids, "must be unique within the request")
        clash = next((r for r in rids if r in self._inflight), None)
        if clash is not None:
            raise InvalidRequestError("rid", clash, "duplicates a request in flight")
        self._inflight.update(rids)
        try:
            yield rids
        finally:
            self._inflight.difference_update(rids)
