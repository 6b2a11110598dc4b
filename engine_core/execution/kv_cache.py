"""One rank's paged KV cache: how many pages fit, and the per-layer K/V tensors.

The page *bookkeeping* (which request holds which page) is the engine's
``scheduling.page_pool``; this only owns the memory, bound to every attention layer.
"""

from __future__ import annotations

import torch

from engine_core.config import EngineConfig
from engine_core.model_config import ModelConfig


def kv_bytes_per_page(model_cfg: ModelConfig, local_kv_heads: int, page_size: int, dtype) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * model_cfg.num_layers * page_size * local_kv_heads * model_cfg.head_dim * elem


class KVCache:
    """K/V pages of every layer: ``[num_pages, page_size, kv_heads, head_dim]`` each."""

    def __init__(
        self,
        model,
        config: EngineConfig,
        model_cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layers = model.attention_layers()
        self.page_size = config.page_size
        self.dtype, self.device = dtype, device
        if config.max_total_tokens is not None:
            self.num_pages = -(-config.max_total_tokens // self.page_size)
        else:
            local_kv = self.layers[0].num_kv_heads
            per_page = kv_bytes_per_page(model_cfg, local_kv, self.page_size, dtype)
            budget = config.kv_cache_memory_bytes
            if budget is None:  # the Engine resolves the default (engine_core.kv_budget)
                raise ValueError("kv_cache_memory_bytes must be resolved before the KV cache")
            self.num_pages = max(1, budget // per_page)
        self.allocate()

    def allocate(self) -> None:
        for layer in self.layers:
            shape = (self.num_pages, self.page_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """K/V of page ``src`` into page ``dst``, every layer (an exact copy)."""
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.device)
        for layer in self.layers:
            layer.k_cache.index_copy_(0, dst, layer.k_cache.index_select(0, src))
            layer.v_cache.index_copy_(0, dst, layer.v_cache.index_select(0, src))

    def release(self) -> int:
        """Drop every layer's K/V tensors; returns the bytes they held."""
        freed = self.nbytes()
        for layer in self.layers:
            layer.k_cache = torch.empty(0, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.empty(0, dtype=self.dtype, device=self.device)
        return freed

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers
            for t in (layer.k_cache, layer.v_cache)
        )
