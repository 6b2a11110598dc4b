"""``FusedDecoderLayer``: a Llama decoder layer as one C call (``kernels.cpu_decoder_layer``)
for the steps whose every op already runs a C kernel -- chosen once per engine like the
matmul, the attention backend and the elementwise ops.

It takes every step of at most ``MAX_ROWS`` rows (the C attention kernel runs every row,
decode and prefill); bigger steps run the modules, where the per-op overhead is a small
share. The result is bitwise the modules' (same kernels, same order), so which path a step
takes changes no bit: deterministic mode and the trainer-side alignment hold whatever the mix.

Built only for fp32 CPU engines with TP 1 (a row-parallel layer all-reduces between the
kernels) on the packed linear, the C attention and the fused elementwise ops; a layer with
q/k norms (Qwen3) keeps its modules.
"""

from __future__ import annotations

import weakref
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


class FusedDecoderLayer:
    """The one-call layer for an engine (see the module docstring)."""

    def __init__(self, linear: PackedLinear) -> None:
        self.linear = linear
        # The step being run: its attention metadata and RoPE tables (kept alive while the
        # C structure points at them), the structure, and its workspace.
        self._step_of: tuple[Any, Any] | None = None
        self._step: c.Step | None = None
        self._workspace = torch.empty(0)
        self._layers: dict[int, tuple] = {}  # id(layer) -> (layer, packs, addresses, structure)

    def takes(self, x: torch.Tensor, meta: Any) -> bool:
        """Whether this step is the C kernels' and small enough (else the modules run it)."""
        return (
            isinstance(meta, RowsMeta)
            and x.dim() == 2
            and x.shape[0] <= MAX_ROWS
            and x.dtype == torch.float32
            and x.is_contiguous()
        )

    def __call__(self, layer, rope: RopeTables, x: torch.Tensor, meta: RowsMeta) -> torch.Tensor:
        if self._step_of is None or self._step_of[0] is not meta or self._step_of[1] is not rope:
            self._start_step(layer, rope, x, meta)
        packs = tuple(self.linear.packed(m.weight) for m in _matrices(layer))  # repacks if stale
        weights = self._layer(layer, packs)
        return c.decoder_layer(c.kernels(packs[0].panels.dtype), weights, self._step, x)

    def _layer(self, layer, packs: tuple) -> c.Layer:
        """The layer's C structure, rebuilt only when an address in it may have changed (a new
        pack, a rebound norm or bias, a reallocated KV cache): building it is most of the
        Python a layer call costs."""
        attn, bias = layer.self_attn.attn, layer.self_attn.qkv_proj.bias
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        key = (
            *(n.weight.data_ptr() for n in norms),
            None if bias is None else bias.data_ptr(),
            attn.k_cache.data_ptr(),
            attn.v_cache.data_ptr(),
        )
        cached = self._layers.get(id(layer))
        # The layer and its packs by identity (a repack makes new PackedWeight objects),
        # through weak references so a released pack is freed, not kept alive here; the rest
        # by address.
        if (
            cached is not None
            and cached[0]() is layer
            and cached[2] == key
            and all(ref() is pack for ref, pack in zip(cached[1], packs))
        ):
            return cached[3]
        weights = c.Layer(
            *key[:2],
            *(p.panels.data_ptr() for p in packs),
            *(None if p.scales is None else p.scales.data_ptr() for p in packs),
            *key[2:],
            *(n.eps for n in norms),
        )
        refs = tuple(weakref.ref(pack) for pack in packs)
        # Weak: the layers own this op, so a strong reference back would make a cycle that
        # keeps a closed engine's model alive until the garbage collector runs.
        self._layers[id(layer)] = (weakref.ref(layer), refs, key, weights)
        return weights

    def _start_step(self, layer, rope: RopeTables, x: torch.Tensor, meta: RowsMeta) -> None:
        attn = layer.self_attn.attn
        rows, hidden = x.shape
        inter = layer.mlp.down_proj.weight.shape[1]
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


def _matrices(layer) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)


def choose_fused_layer(linear, attention, elementwise, tp_size: int) -> FusedDecoderLayer | None:
    """The one-call layer where every op it fuses is a C kernel here, else None."""
    if (
        tp_size == 1
        and isinstance(linear, PackedLinear)
        and isinstance(attention, CpuKernelAttention)
        and isinstance(elementwise, CpuFusedElementwise)
        and c.available()
    ):
        return FusedDecoderLayer(linear)
    return None
