"""``/update_weights_from_tensor``'s ``serialized_named_tensors`` as this server reads them:
base64 of safetensors bytes (one entry per TP rank, as SGLang sends one per rank; every entry
must then hold the same full tensors, the engine shards them itself).

SGLang's own entries are base64 pickles (``MultiprocessingSerializer``); this server never
unpickles what a client sends, so those are refused with a 400 naming the field. A trainer
makes an entry with ``base64.b64encode(safetensors.torch.save(state_dict))``."""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

from rollout.http.errors import bad_request

FIELD = "serialized_named_tensors"


def _looks_like_safetensors(raw: bytes) -> bool:
    if len(raw) < 9:
        return False
    (header_len,) = struct.unpack("<Q", raw[:8])
    return 0 < header_len <= len(raw) - 8 and raw[8:9] == b"{"


def decode_named_tensors(entries: list[str]) -> dict[str, Any]:
    """The tensors of the first entry (``{HF name: tensor}``); 400 naming the field otherwise."""
    from safetensors.torch import load

    if not entries:
        raise bad_request(FIELD, entries, "must hold at least one entry")
    try:
        raw = base64.b64decode(entries[0], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{FIELD}[0]", entries[0][:40], f"not base64 ({exc})") from None
    if not _looks_like_safetensors(raw):
        raise bad_request(
            f"{FIELD}[0]",
            entries[0][:40],
            "not base64 safetensors bytes (pickled tensors are never loaded: send "
            "base64.b64encode(safetensors.torch.save(tensors)))",
        )
    try:
        return load(raw)
    except Exception as exc:  # safetensors raises its own error type for corrupt headers
        raise bad_request(f"{FIELD}[0]", entries[0][:40], f"corrupt safetensors ({exc})") from None
