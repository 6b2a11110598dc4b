"""SGLang's sampling penalties on a batch of logits rows, elementwise (batch invariant).

Per row ``b`` and vocab index ``v``, with ``c = counts[b, v]`` the number of times ``v`` occurs
in the request's output so far (the prompt is not counted) and ``x = logits[b, v]``::

    x = x * r if x < 0 else x / r        where c > 0    (repetition_penalty r)
    x = x - f * c - p * (c > 0)                          (frequency f, presence p)
    x = -inf                             where banned   (min_new_tokens not reached)

in that order: the multiplicative penalty on the model's logits, then the additive ones (as
SGLang's scaling then linear penalties, and HF / vLLM). Every output element depends only on
the same element of the inputs and its row's three scalars, so a row's result is bitwise
independent of the other rows; neutral values (r = 1, f = p = 0, nothing banned) leave a row
bitwise unchanged. The same torch code serves every device.
"""

from __future__ import annotations

import torch

__all__ = ["apply_penalties"]


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    repetition: torch.Tensor,
    banned: torch.Tensor,
) -> torch.Tensor:
    """Penalized copy of fp32 ``logits [B, V]``.

    ``counts [B, V]`` (float32 occurrence counts), ``frequency`` / ``presence`` /
    ``repetition`` ``[B]`` float32, ``banned [B, V]`` bool. Returns a new tensor.
    """
    present = counts > 0
    scale = torch.where(present, repetition[:, None], 1.0)
    out = torch.where(logits < 0, logits * scale, logits / scale)
    out = out - frequency[:, None] * counts
    out = out - presence[:, None] * present.to(out.dtype)
    return out.masked_fill(banned, float("-inf"))
