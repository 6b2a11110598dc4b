"""``FusedDecoderLayers``: every decoder layer of a Llama model in one C call
(``kernels.cpu_decoder_layer``) for the steps whose every op already runs a C kernel -- chosen
once per engine like the matmul, the attention backend and the elementwise ops.

It takes every step of at most ``MAX_ROWS`` rows (the C attention kernel runs every row,
decode and prefill); bigger steps run the modules, where the per-op overhead is a small
share. The result is bitwise the modules' (same kernels, same order), so which path a step
takes changes no bit: deterministic mode and the trainer-side alignment hold whatever the mix.

Built only for fp32 CPU engines with TP 1 (a row-parallel layer all-reduces between the
kernels) on the packed linear, the C attention and the fused elementwise ops; a model with
q/k norms (Qwen3) keeps its modules.

The C side takes addresses: every layer's packs, norms, bias and KV cache, gathered into an
array once and reused while a cheap probe (~50 us for 30 layers: the parameters' storage and
version, the KV caches' addresses, the packs' generation) says nothing moved. It follows every
write through a parameter (in place or by rebinding ``.data``), every repack or dropped pack,
and a reallocated KV cache. Replacing a parameter or layer *object* is not followed (the
engine never does; it writes through its parameters).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from engine_core.layers.attention_backends import CpuKernelAttention, RowsMeta
from engine_core.layers.elementwise import CpuFusedElementwise
from engine_core.layers.packed_linear import PackedLinear
from engine_core.layers.rotary import RopeTables
from kernels import cpu_decoder_layer as c

# Above this many rows the per-op overhead this saves is a small share of the step, and the
# workspace (~31 KB a row on the default model) stays bounded.
MAX_ROWS = 512


@dataclass
class _Parts:
    """What one layer's C structure is made from, held so a step can probe it without the
    modules' attribute lookups (those cost ~27 us a layer on the 2-core machine)."""

    matrices: tuple  # qkv, o, gate_up, down weights (Parameters)
    norms: tuple  # input and post-attention norm weights
    eps: tuple  # and their epsilons
    bias: Any  # qkv bias or None
    attn: Any  # the attention module: its KV cache is rebound on (re)allocation


@dataclass
class _Stack:
    layers: weakref.ref  # the ModuleList it was built for
    parts: tuple[_Parts, ...]
    key: tuple  # the probe when built
    kern: c.Kernels
    array: Any  # ctypes array of c.Layer


class FusedDecoderLayers:
    """The one-call layers for an engine (see the module docstring)."""

    def __init__(self, linear: PackedLinear) -> None:
        self.linear = linear
        # The step being run: its attention metadata and RoPE tables (kept alive while the
        # C structure points at them), the structure, and its workspace.
        self._step_of: tuple[Any, ...] | None = None
        self._step: c.Step | None = None
        self._workspace = torch.empty(0)
        self._stack: _Stack | None = None

    def takes(self, x: torch.Tensor, meta: Any) -> bool:
        """Whether this step is the C kernels' and small enough (else the modules run it)."""
        return (
            isinstance(meta, RowsMeta)
            and x.dim() == 2
            and x.shape[0] <= MAX_ROWS
            and x.dtype == torch.float32
            and x.is_contiguous()
        )

    def __call__(self, layers, rope: RopeTables, x: torch.Tensor, meta: RowsMeta) -> torch.Tensor:
        """``layers`` (a non-empty sequence of decoder layers) applied in turn to ``x``: bitwise
        calling each layer's modules."""
        stack = self._current(layers)
        if self._step_of is None or self._step_of[0] is not meta or self._step_of[1] is not rope:
            self._start_step(stack.parts[0], rope, x, meta)
        return c.decoder_stack(stack.kern, stack.array, self._step, x)

    def _current(self, layers) -> _Stack:
        """The layers' C structures, rebuilt only when the probe says an address or a pack in
        them may have changed."""
        stack = self._stack
        if stack is not None and stack.layers() is layers and self._probe(stack.parts) == stack.key:
            return stack
        self._stack = None  # drop the old addresses before repacking
        parts = tuple(_parts(layer) for layer in layers)
        packs = [tuple(self.linear.packed(w) for w in part.matrices) for part in parts]
        (dtype,) = {p.panels.dtype for layer_packs in packs for p in layer_packs}
        structs = [_structure(part, p) for part, p in zip(parts, packs)]
        # Probed after packing: packing bumps the generation.
        self._stack = _Stack(
            weakref.ref(layers),
            parts,
            self._probe(parts),
            c.kernels(dtype),
            (c.Layer * len(structs))(*structs),
        )
        return self._stack

    def _probe(self, parts: tuple[_Parts, ...]) -> tuple:
        key: list = [self.linear.generation]
        for part in parts:
            for w in part.matrices:  # a changed weight must be repacked first
                key += (w.data_ptr(), w._version)
            key += (part.norms[0].data_ptr(), part.norms[1].data_ptr())
            key.append(None if part.bias is None else part.bias.data_ptr())
            key += (part.attn.k_cache.data_ptr(), part.attn.v_cache.data_ptr())
        return tuple(key)

    def _start_step(self, part: _Parts, rope: RopeTables, x: torch.Tensor, meta: RowsMeta) -> None:
        attn = part.attn
        rows, hidden = x.shape
        inter = part.matrices[3].shape[1]  # down_proj's input features
        dims = (hidden, attn.num_heads, attn.num_kv_heads, attn.head_dim, inter)
        need = c.workspace_floats(rows, *dims)
        if self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=torch.float32)
        cos, sin = (t.contiguous() for t in rope)
        self._step_of = (meta, rope, cos, sin)
        self._step = c.Step(
            rows,
            *dims[:-1],
            inter,
            attn.k_cache.shape[1],
            meta.all_pages.shape[1],
            attn.scale,
            cos.data_ptr(),
            sin.data_ptr(),
            meta.slot_mapping.data_ptr(),
            meta.all_pages.data_ptr(),
            meta.row_seq.data_ptr(),
            meta.row_pos.data_ptr(),
            self._workspace.data_ptr(),
        )


def _parts(layer) -> _Parts:
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    return _Parts(
        (attn.qkv_proj.weight, attn.o_proj.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight),
        tuple(n.weight for n in norms),
        tuple(n.eps for n in norms),
        attn.qkv_proj.bias,
        attn.attn,
    )


def _structure(part: _Parts, packs: tuple) -> c.Layer:
    return c.Layer(
        *(n.data_ptr() for n in part.norms),
        *(p.panels.data_ptr() for p in packs),
        *(None if p.scales is None else p.scales.data_ptr() for p in packs),
        None if part.bias is None else part.bias.data_ptr(),
        part.attn.k_cache.data_ptr(),
        part.attn.v_cache.data_ptr(),
        *part.eps,
    )


def choose_fused_layers(linear, attention, elementwise, tp_size: int) -> FusedDecoderLayers | None:
    """The one-call layers where every op they fuse is a C kernel here, else None."""
    if (
        tp_size == 1
        and isinstance(linear, PackedLinear)
        and isinstance(attention, CpuKernelAttention)
        and isinstance(elementwise, CpuFusedElementwise)
        and c.available()
    ):
        return FusedDecoderLayers(linear)
    return None
