"""Multi-turn sessions: the key a request's conversation is known by, and where it is pinned.

The key (``session_key``), as SGLang names things:

1. an explicit ``session_id`` (SGLang's ``GenerateReqInput.session_id``: "stable identity
   shared by requests in the same session"), else
2. the request's ``rid`` with one trailing ``_r<digits>`` (retry) and then one trailing
   ``_t<digits>`` (turn) suffix stripped, as SGLang's router derives its routing key from a rid:
   ``conv7_t2_r1`` -> ``conv7``; a rid without those suffixes is its own key. Keys longer than
   128 bytes (the router's cap) are not keys.

``SessionTable`` pins a key to the engine that served it last (bounded, least recently used
keys forgotten first); the router keeps the conversation there while load is balanced.
Pure Python.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_KEY_BYTES = 128


def _strip_suffix(text: str, tag: str) -> str:
    head, sep, tail = text.rpartition("_")
    if sep and tail[:1] == tag and tail[1:].isdigit() and tail[1:].isascii():
        return head
    return text


def session_key(session_id: object, rid: object) -> str | None:
    """The session a request belongs to, or None (see the module docstring)."""
    if isinstance(session_id, str) and session_id:
        kind, key = "session", session_id
    elif isinstance(rid, str) and rid:
        kind, key = "rid", _strip_suffix(_strip_suffix(rid, "r"), "t") or rid
    else:
        return None
    # Namespaced, so a session id can never collide with a rid-derived key.
    return f"{kind}:{key}" if len(key.encode()) <= MAX_KEY_BYTES else None


class SessionTable:
    """Session key -> engine index, at most ``max_sessions`` (LRU)."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._pins: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pins)

    def get(self, key: str) -> int | None:
        return self._pins.get(key)

    def pin(self, key: str, engine: int) -> None:
        self._pins[key] = engine
        self._pins.move_to_end(key)
        while len(self._pins) > self.max_sessions:
            self._pins.popitem(last=False)

    def forget_engine(self, engine: int) -> None:
        """``engine`` died: its conversations are routed afresh (their KV is gone)."""
        for key in [k for k, e in self._pins.items() if e == engine]:
            del self._pins[key]
