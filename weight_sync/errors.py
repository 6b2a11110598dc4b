"""Exceptions raised by :mod:`weight_sync`.

Every transport failure surfaces as a :class:`WeightSyncError` (a ``RuntimeError``) whose
message names the group, the rank and the operation that failed; a wait that ran past its
timeout raises the :class:`WeightSyncTimeout` subclass. Invalid inputs (a tensor that does not
match the plan, a bad dtype string) raise ``ValueError``/``TypeError`` before anything is sent.
"""

from __future__ import annotations


class WeightSyncError(RuntimeError):
    """A weight transfer failed (peer died, stream out of sync, sender aborted, ...).

    After this error the group's stream may be desynchronised: destroy the group and create a
    new one unless the docstring of the raising function says the stream stays in sync.
    """


class WeightSyncTimeout(WeightSyncError):
    """A collective or rendezvous did not complete within the group's timeout."""
