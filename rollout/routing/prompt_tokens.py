"""``PromptTokens``: the driver's tokenizer for text prompts, loaded only when first needed.

The router names prefixes by token pages, so a text prompt must become the token ids the
engine will see: the engine encodes a prompt with ``tokenizer.encode(text)`` of the model's HF
tokenizer (``engine_core.requests.factory``; no chat template is applied to ``prompt``), and so
does this. Loaded lazily and only for a policy that ``needs_token_ids``. If the tokenizer cannot
be loaded here (e.g. the model directory is not on the driver's node), text prompts are routed
without prefix hints (logged once) -- never an error: the engine reports bad prompts itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def _load(model_path: str) -> Any:
    from engine_core.tokenizer import load_tokenizer

    return load_tokenizer(model_path)


class PromptTokens:
    """``encode(text)`` -> the engine's token ids for ``text``, or None without a tokenizer."""

    def __init__(self, model_path: str, loader: Callable[[str], Any] = _load) -> None:
        self.model_path = model_path
        self._loader = loader
        self._tokenizer: Any = None
        self._failed = False

    def encode(self, text: str) -> tuple[int, ...] | None:
        tokenizer = self._get()
        if tokenizer is None or not isinstance(text, str) or not text:
            return None
        return tuple(tokenizer.encode(text))

    def _get(self) -> Any:
        if self._tokenizer is None and not self._failed:
            try:
                self._tokenizer = self._loader(self.model_path)
            except Exception as exc:
                self._failed = True
                log.warning(
                    "cache-aware router: no tokenizer at %s (%s); text prompts are routed "
                    "without prefix hints",
                    self.model_path,
                    exc,
                )
        return self._tokenizer
