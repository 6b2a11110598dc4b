"""Which HF architectures the engine serves, and the model class of each.

Adding an architecture is adding a row here (and its class in ``models/``): the model config
reader, the loader and the ranks take everything else from the class (``packed_modules``,
the layers' shard protocol).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine_core.models.llama import LlamaFamilyForCausalLM


@dataclass(frozen=True)
class Architecture:
    model_class: type
    qkv_bias: bool  # default of ``attention_bias`` (Qwen2 always has it)
    qk_norm: bool  # q/k RMSNorm (Qwen3)


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(LlamaFamilyForCausalLM, False, False),
    "MistralForCausalLM": Architecture(LlamaFamilyForCausalLM, False, False),
    "Qwen2ForCausalLM": Architecture(LlamaFamilyForCausalLM, True, False),
    "Qwen3ForCausalLM": Architecture(LlamaFamilyForCausalLM, False, True),
}
