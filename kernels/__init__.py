"""Hot-path kernels of the rollout engine, each with a plain-torch reference of the same semantics.

Every op has ``<op>_ref`` (torch), ``<op>_triton`` (defined only when Triton is importable) and a
dispatcher that uses Triton for CUDA tensors and the torch path otherwise; on CPU, where the C
kernels of ``csrc/`` build (``cpu_*.py``), the engine's fp32 paths use those instead (linear,
attention, elementwise ops, token choice). ``apply_penalties`` (SGLang's sampling penalties) is
elementwise torch on every device.
All of them are batch invariant: a row's / request's result is bitwise independent of what else
is in the batch (see each module's docstring for the contract).
"""

from __future__ import annotations

from ._triton import HAS_TRITON
from .attention import paged_attention, store_kv
from .matmul import linear as batch_invariant_linear
from .penalties import apply_penalties
from .rmsnorm import rms_norm
from .sampling import greedy_tokens, sample_tokens, seeded_uniform

__all__ = [
    "HAS_TRITON",
    "store_kv",
    "paged_attention",
    "rms_norm",
    "batch_invariant_linear",
    "seeded_uniform",
    "sample_tokens",
    "greedy_tokens",
    "apply_penalties",
]
