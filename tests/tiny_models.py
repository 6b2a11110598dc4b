"""Tiny random-weight HF models (saved with safetensors) and a small trained BPE tokenizer.

Shared by tests and benchmarks' smoke paths; everything is built offline.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "reinforcement learning from human feedback trains a policy",
    "rollouts are sampled from the policy and scored by a reward model",
    "paged attention stores keys and values in fixed size pages",
    "hello world, stop here. the end!",
    "numbers 0 1 2 3 4 5 6 7 8 9 and symbols + - * / = ? ; :",
] * 20

VOCAB = 320

ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        cls="LlamaConfig",
        arch="LlamaForCausalLM",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "llama3": dict(
        cls="LlamaConfig",
        arch="LlamaForCausalLM",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "qwen2": dict(
        cls="Qwen2Config",
        arch="Qwen2ForCausalLM",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        cls="Qwen3Config",
        arch="Qwen3ForCausalLM",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        cls="MistralConfig",
        arch="MistralForCausalLM",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
}


@functools.lru_cache(maxsize=1)
def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_model(path: str, kind: str = "llama", seed: int = 0, **overrides: Any) -> str:
    """Write a random-weight model of ``kind`` (see ARCH_CONFIGS) into ``path``; returns path."""
    import transformers

    spec = dict(ARCH_CONFIGS[kind])
    spec.update(overrides)
    cls = getattr(transformers, spec.pop("cls"))
    arch = spec.pop("arch")
    tokenizer = build_tokenizer()
    spec.setdefault("eos_token_id", tokenizer.eos_token_id)
    spec.setdefault("max_position_embeddings", 256)
    config = cls(
        vocab_size=VOCAB,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        architectures=[arch],
        **spec,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # larger weights than the default init, so logits are not all ~equal
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
            if "bias" in name:
                p.normal_(0.0, 0.5)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def load_hf(path: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
