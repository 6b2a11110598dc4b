"""The model facts the engine needs, read from a HF ``config.json`` (no transformers import)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from engine_core.errors import ModelLoadError


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only Llama-family model."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    model_type: str = ""  # config.json's (SGLang's get_model_info reports it)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _require(cfg: dict[str, Any], key: str, path: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ModelLoadError(f"{path}: config field {key!r} is missing")
    return cfg[key]


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older writes
    # `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "llama3", "linear"):
        raise ModelLoadError(
            f"unsupported rope_type {rope_type!r} (supported: default, llama3, linear)"
        )
    params["rope_type"] = rope_type
    return theta, params


def _eos_ids(model_path: str, cfg: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    sources = [cfg]
    gen_path = os.path.join(model_path, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            sources.append(json.load(f))
    for src in sources:
        eos = src.get("eos_token_id")
        for tok in eos if isinstance(eos, list) else [eos]:
            if isinstance(tok, int) and tok not in ids:
                ids.append(tok)
    return tuple(ids)


def load_model_config(model_path: str) -> ModelConfig:
    """Read ``model_path/config.json``; raise ``ModelLoadError`` naming what is wrong."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"no config.json in model_path={model_path!r}")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    from engine_core.models.registry import ARCHITECTURES

    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(
            f"{path}: unsupported architectures={archs!r}; supported: {sorted(ARCHITECTURES)}"
        )
    default_bias, qk_norm = ARCHITECTURES[arch].qkv_bias, ARCHITECTURES[arch].qk_norm
    num_heads = int(_require(cfg, "num_attention_heads", path))
    hidden = int(_require(cfg, "hidden_size", path))
    head_dim = cfg.get("head_dim") or hidden // num_heads
    theta, scaling = _rope(cfg)
    sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    return ModelConfig(
        architecture=arch,
        vocab_size=int(_require(cfg, "vocab_size", path)),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size", path)),
        num_layers=int(_require(cfg, "num_hidden_layers", path)),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", default_bias)) or default_bias,
        qk_norm=qk_norm,
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=int(sliding) if sliding else None,
        eos_token_ids=_eos_ids(model_path, cfg),
        torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        model_type=str(cfg.get("model_type") or ""),
    )


def serving_context_length(model_cfg: ModelConfig, configured: int | None) -> int:
    """The longest sequence an engine serves: ``configured`` (else the model's
    ``max_position_embeddings``), capped at a sliding window -- such models run full attention
    here, and the cap keeps that exact."""
    limit = configured or model_cfg.max_position_embeddings
    return min(limit, model_cfg.sliding_window) if model_cfg.sliding_window else limit
