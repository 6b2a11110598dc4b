"""Every Llama decoder layer of a model in one C call (``csrc/decoder_layer_cpu.c``,
``decoder_stack``), fp32 on CPU.

The C function runs the existing kernels -- ``cpu_linear`` (packed weights), ``cpu_fused``
(RMSNorm, residual add + RMSNorm, SiLU-mul, RoPE) and ``cpu_attention`` -- through function
pointers taken from their own loaded libraries, in the module path's order, plus the glue
(copy q out of the fused qkv rows, write K/V by slot, the last residual add). Contract: the
output is **bitwise** the module path's for the same inputs (same machine code, same operands;
the glue is copies and one exact fp32 add per element), checked in
``tests/engine_core/test_fused_layer.py``.

``available()`` is False where any of the four libraries cannot be built; callers keep the
module path.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels import cpu_attention, cpu_fused, cpu_linear
from kernels._cbuild import load

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class Kernels(ctypes.Structure):
    """The kernels' entry points (``Kernels`` in the C file)."""

    _fields_ = [
        ("linear", _P),
        ("rms_norm", _P),
        ("add_rms_norm", _P),
        ("silu_mul", _P),
        ("rope", _P),
        ("attention", _P),
    ]


class Layer(ctypes.Structure):
    """One layer's parameters and KV cache, as addresses (``Layer`` in the C file)."""

    _fields_ = [
        ("in_norm", _P),
        ("post_norm", _P),
        ("qkv", _P),
        ("o", _P),
        ("gate_up", _P),
        ("down", _P),
        ("qkv_scales", _P),
        ("o_scales", _P),
        ("gate_up_scales", _P),
        ("down_scales", _P),
        ("qkv_bias", _P),
        ("k_cache", _P),
        ("v_cache", _P),
        ("in_eps", _F),
        ("post_eps", _F),
    ]


class Step(ctypes.Structure):
    """A step's shapes, attention metadata, RoPE rows and workspace (``Step`` in the C file)."""

    _fields_ = [
        *((name, _I) for name in ("T", "H", "Hq", "Hk", "D", "I", "page_size", "max_pages")),
        ("scale", _F),
        *((name, _P) for name in ("cos", "sin", "slots", "page_table", "row_seq", "row_pos")),
        ("work", _P),
    ]


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if not (cpu_linear.available() and cpu_fused.available() and cpu_attention.available()):
        return None
    lib = load("decoder_layer_cpu", ("-ffp-contract=off",))
    if lib is None:
        return None
    lib.decoder_stack_f32.restype = ctypes.c_int
    lib.decoder_stack_f32.argtypes = [_P, _P, _I, _P, _P, _P, _P]
    lib.workspace_floats.restype = _I
    lib.workspace_floats.argtypes = [_I] * 6
    return lib


def available() -> bool:
    return _library() is not None


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


@functools.cache
def kernels(weight_dtype: torch.dtype) -> Kernels:
    """The entry points for packs of ``weight_dtype`` (fp32, bf16 or int8 panels); the
    structure is cached, so it outlives every call that points at it."""
    assert available(), "C kernels unavailable; check available() first"
    fused = cpu_fused._library()
    return Kernels(
        _address(cpu_linear._kernel(weight_dtype)),
        _address(fused.rms_norm_f32),
        _address(fused.add_rms_norm_f32),
        _address(fused.silu_mul_f32),
        _address(fused.rope_qk_f32),
        _address(cpu_attention._library().paged_attention_f32),
    )


def workspace_floats(rows: int, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int):
    """Floats of scratch one layer call needs for ``rows`` token rows."""
    return int(_library().workspace_floats(rows, hidden, heads, kv_heads, head_dim, inter))


def decoder_stack(kern: Kernels, layers: ctypes.Array, step: Step, x: torch.Tensor) -> torch.Tensor:
    """Every layer of ``layers`` (a ctypes array of ``Layer``, at least one) applied in turn to
    ``x`` [T, H] (contiguous fp32 CPU); each layer writes its K/V rows of the step into its
    cache at ``step.slots`` first. Every address in ``layers`` and ``step`` must stay alive for
    the call (the caller holds the tensors)."""
    assert len(layers) > 0, "decoder_stack needs at least one layer"
    out, spare = torch.empty_like(x), torch.empty_like(x)
    failed = _library().decoder_stack_f32(
        ctypes.addressof(kern),
        ctypes.addressof(layers),
        len(layers),
        ctypes.addressof(step),
        x.data_ptr(),
        out.data_ptr(),
        spare.data_ptr(),
    )
    if failed:
        raise MemoryError("decoder_stack_f32: out of memory for the attention score buffer")
    return out
