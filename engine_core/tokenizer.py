"""Tokenizer loading and the text side of outputs (decoding, stop strings)."""

from __future__ import annotations

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


def stable_prefix(text: str) -> str:
    """Drop a trailing replacement char: an incomplete UTF-8 sequence that the next token may
    complete, so streamed chunks never contain half a character."""
    return text[:-1] if text.endswith("\ufffd") else text
