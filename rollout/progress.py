"""A one-line ``\\r`` progress bar for rollouts (no dependency), drawn only on a terminal."""

from __future__ import annotations

import sys
from typing import Any, TextIO


def render(snap: dict[str, Any], width: int = 24) -> str:
    """``[#####.....] 40/64 samples  1234 tok  210.5 tok/s  3.2s`` for a progress snapshot."""
    total = max(snap["total_samples"], 1)
    filled = int(width * snap["finished_samples"] / total)
    line = (
        f"[{'#' * filled}{'.' * (width - filled)}] {snap['finished_samples']}/"
        f"{snap['total_samples']} samples  {snap['completion_tokens']} tok  "
        f"{snap['tokens_per_s']:.1f} tok/s  {snap['elapsed_s']:.1f}s"
    )
    if snap.get("resent_groups"):
        line += f"  ({snap['resent_groups']} groups re-sent)"
    return line


class ProgressBar:
    """Redraws one line on ``stream``; inactive (draws nothing) unless it is a TTY or
    ``enabled=True`` forces it."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = isatty if enabled is None else enabled
        self._width = 0

    def update(self, snap: dict[str, Any] | None) -> None:
        if not self.enabled or snap is None:
            return
        line = render(snap)
        pad = max(self._width - len(line), 0)
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
        self._width = 0
