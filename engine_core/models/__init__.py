"""Model definitions. One Llama-family implementation covers Llama, Mistral, Qwen2 and Qwen3."""

from engine_core.models.llama import LlamaFamilyForCausalLM

__all__ = ["LlamaFamilyForCausalLM"]
