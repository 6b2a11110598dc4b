"""Tokenizer loading and the text side of outputs (decoding, stop strings)."""

from __future__ import annotations

import re
from typing import Any

from engine_core.errors import ModelLoadError


def load_tokenizer(model_path: str) -> Any:
    """The HF fast tokenizer saved with the model; ModelLoadError if there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except Exception as exc:  # transformers raises OSError/ValueError/… for missing files
        raise ModelLoadError(
            f"cannot load a tokenizer from {model_path!r} ({exc}); "
            "pass skip_tokenizer_init=True to use input_ids only"
        ) from exc


def find_stop_string(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string in ``text`` as (index, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def find_stop_regex(text: str, patterns: list[str]) -> str | None:
    """The first of ``patterns`` that ``re.search`` finds in ``text`` (SGLang's stop_regex).

    SGLang searches a tail of the output long enough for the longest possible match; this
    searches the whole output text, which finds the same matches for unanchored patterns
    (``^`` anchors at the start of the output here, at the start of that tail there)."""
    for pattern in patterns:
        if re.search(pattern, text) is not None:
            return pattern
    return None


def trim_matched_stop(text: str, matched: str, no_stop_trim: bool) -> str:
    """SGLang's detokenizer trimming of a stop-string / stop-regex finish: cut ``text`` at the
    first occurrence of ``matched`` (kept with ``no_stop_trim``, anything after it dropped);
    unchanged when ``matched`` does not occur literally -- as SGLang, which reports a regex
    finish with the pattern as ``matched``, so a regex's text is usually left whole."""
    pos = text.find(matched)
    if pos < 0:
        return text
    return text[: pos + len(matched)] if no_stop_trim else text[:pos]


def stable_prefix(text: str) -> str:
    """Drop a trailing replacement char: an incomplete UTF-8 sequence that the next token may
    complete, so streamed chunks never contain half a character."""
    return text[:-1] if text.endswith("\ufffd") else text
