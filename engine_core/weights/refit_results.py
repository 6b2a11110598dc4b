"""What SGLang's refit and weight-group verbs return: ``(success, message)`` tuples.

SGLang's ``Engine`` returns ``(True, message)`` or ``(False, message)`` from
``update_weights_from_tensor`` / ``_from_distributed``, ``init_weights_update_group`` and
``destroy_weights_update_group`` (``update_weights_from_disk`` adds ``num_paused_requests``);
a failed refit here leaves the weights and version unchanged, so ``(False, message)`` is
always safe to retry. ``EngineConfig.refit_errors="raise"`` raises the typed error instead
(the Ray ``EngineActor`` does, so the service's callers see the error type).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from engine_core.errors import EngineReleasedError
from engine_core.execution.rank_client import RemoteError
from weight_sync import WeightSyncError

log = logging.getLogger(__name__)

# What a refit can fail with while the engine keeps serving: bad input (ValueError and its
# typed subclasses: ModelLoadError, RefitStateError, ...), a broken transfer, released weights,
# a TP rank's error. Anything else (EngineStoppedError, a bug) still raises.
REFIT_FAILURES = (ValueError, TypeError, WeightSyncError, EngineReleasedError, RemoteError)

# SGLang's success messages (model_runner.py), so log-matching callers keep working.
DISK_OK = "Succeeded to update model weights."
TENSOR_OK = "Success"
DISTRIBUTED_OK = "Succeeded to update parameter online."
GROUP_INIT_OK = "Succeeded to initialize custom process group."
GROUP_DESTROY_OK = "Succeeded to destroy custom process group."
GROUP_MISSING = "The group to be destroyed does not exist."


def with_version(message: str, version: str | None) -> str:
    """SGLang's tokenizer manager appends the version a refit was given."""
    return message if version is None else f"{message} Weight version updated to {version}."


class RefitResults:
    """Turns a verb's outcome into SGLang's tuple, or re-raises (``refit_errors="raise"``)."""

    def __init__(self, refit_errors: str) -> None:
        self.raise_errors = refit_errors == "raise"

    def run(self, verb: str, action: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
        """``action`` returns ``(success, message)``; a refit failure becomes
        ``(False, "<ErrorType>: <message>")`` (logged) unless errors are raised."""
        try:
            return action()
        except REFIT_FAILURES as exc:
            if self.raise_errors:
                raise
            message = f"{type(exc).__name__}: {exc}"
            log.warning("%s failed: %s", verb, message)
            return False, message
