"""``/update_weights_from_tensor``'s ``serialized_named_tensors`` as this server reads them.

Two kinds of entry (one per TP rank, as SGLang sends one per rank):

- SGLang's own: base64 text of a ``MultiprocessingSerializer`` payload (a ``ForkingPickler``
  dump of ``[(name, tensor), ...]`` or, with ``load_format="flattened_bucket"``, of a
  ``FlattenedTensorBucket`` dict), what verl's and slime's HTTP clients send. The entries go
  to the engine's payload path unchanged: each TP rank decodes its own entry with the
  engine's restricted unpickler (``engine_core/weights/sglang_payloads.py``: torch's rebuild
  functions only; anything else is refused), so this server never unpickles a client's bytes
  itself. The tensors travel as torch shares them (shared-memory descriptors, CUDA IPC
  handles): the client must be on this host and keep them alive until the answer. CPU
  tensors need ``torch.multiprocessing.set_sharing_strategy("file_system")`` on a client that
  did not start the server (the default descriptor passing authenticates with the key of the
  process tree that made them; a failed fetch is the engine's ``(False, message)``).
- base64 safetensors bytes (``base64.b64encode(safetensors.torch.save(state_dict))``), for
  clients without torch's sharing: every entry then holds the same full tensors (the engine
  shards them itself), only the first is read.

An entry that is not base64 is a 400 naming it; what the engine cannot decode is its
``(False, message)`` answer."""

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


def _decoded(entries: list[str]) -> list[bytes]:
    if not entries:
        raise bad_request(FIELD, entries, "must hold at least one entry (one per TP rank)")
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(base64.b64decode(entry, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise bad_request(f"{FIELD}[{i}]", entry[:40], f"not base64 ({exc})") from None
    return out


def is_safetensors(entries: list[str]) -> bool:
    """Whether the entries are base64 safetensors (else SGLang's serialized payloads); a 400
    naming the entry that is not base64."""
    return _looks_like_safetensors(_decoded(entries)[0])


def named_tensors_of(entries: list[str]) -> Any:
    """What ``Engine.update_weights_from_tensor`` takes for these entries: the first entry's
    ``{HF name: tensor}`` for safetensors, else the per-rank payload strings unchanged."""
    if not is_safetensors(entries):
        return list(entries)
    from safetensors.torch import load

    try:
        return load(base64.b64decode(entries[0]))
    except Exception as exc:  # safetensors raises its own error type for corrupt headers
        raise bad_request(f"{FIELD}[0]", entries[0][:40], f"corrupt safetensors ({exc})") from None
