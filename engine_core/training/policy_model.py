"""``PolicyModel``: the trainer's model, built from the engine's own layers and kernels.

With identical weights, ``token_logprobs`` equals the engine's ``output_token_logprobs``
(deterministic mode) bit for bit, at any batch size and packing on either side: the forward
runs the same modules in the same order through the same batch-invariant kernels (matmul,
attention), and the logprob is computed exactly as the engine's sampler computes it
(``log_softmax(logits / T)`` over the full vocabulary, ``T`` a per-row fp32 column). Gradients
flow through the same forward: each kernel's backward is the plain-torch gradient of the same
function (``training.autograd_ops``). The contract is written out in docs/ALIGNMENT.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.config import EngineConfig
from engine_core.execution.model_runner import _deterministic_linear, resolve_dtype
from engine_core.layers.elementwise import choose_elementwise
from engine_core.layers.sharded import WeightOwner
from engine_core.model_config import load_model_config
from engine_core.models.llama import ModelOps
from engine_core.models.registry import ARCHITECTURES
from engine_core.parallel import TPContext
from engine_core.training import autograd_ops as ops
from engine_core.training.autograd_elementwise import differentiable_elementwise
from engine_core.weights.loader import hf_name, hf_names, iter_checkpoint, load_weights


class PolicyModel(nn.Module):
    """A trainable ``torch.nn.Module`` whose ``named_parameters()`` carry HF names (push them
    to engines with ``update_weights_from_tensor`` or ``weight_sync`` as they are).

    The engine's layers fuse q/k/v and gate/up into one parameter each; here those are HF's
    separate parameters, concatenated into the fused weight at every forward (same values,
    so the same bits), so an optimizer sees exactly the checkpoint's tensors.
    """

    def __init__(
        self,
        model_dir: str,
        deterministic: bool = True,
        device: str = "cpu",
        dtype: str = "auto",
        page_size: int = 16,
    ) -> None:
        super().__init__()
        self.model_cfg = model_cfg = load_model_config(model_dir)
        self.deterministic = deterministic
        self.page_size = page_size
        self.device = torch.device(device)
        # The engine's own choices for this model, device and dtype (EngineConfig validates).
        config = EngineConfig("", dtype=dtype, device=device, deterministic=deterministic)
        self.dtype = resolve_dtype(config, model_cfg)
        linear, self.matmul = F.linear, "off"
        if deterministic:
            linear, self.matmul = _deterministic_linear(model_cfg, 1, self.dtype, self.device)
        attention = ops.TrainingAttention(self._attention_kernel() if deterministic else None)
        arch = ARCHITECTURES[model_cfg.architecture].model_class
        with torch.device(self.device):
            self.model = arch(
                model_cfg,
                TPContext(),
                model_cfg.max_position_embeddings,
                ModelOps(
                    attention,
                    ops.differentiable_linear(linear),
                    differentiable_elementwise(choose_elementwise(self.device, self.dtype)),
                ),
            ).to(self.dtype)
        load_weights(self.model, iter_checkpoint(model_dir), require_complete=True)
        self._unfuse()

    def _attention_kernel(self) -> Callable:
        from kernels import cpu_attention

        if self.device.type == "cpu" and self.dtype == torch.float32 and cpu_attention.available():
            return ops.c_kernel_attention
        return ops.varlen_kernel_attention

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str,
        deterministic: bool = True,
        device: str = "cpu",
        dtype: str = "auto",
        page_size: int = 16,
        trainable: Callable[[str], bool] | None = None,
    ) -> PolicyModel:
        """Load a HF checkpoint directory through the engine's loader. ``trainable(name)``
        picks the parameters that get gradients (default: all)."""
        policy = cls(model_dir, deterministic, device, dtype, page_size)
        for name, param in policy.named_parameters():
            param.requires_grad_(trainable is None or trainable(name))
        return policy

    def _unfuse(self) -> None:
        """Give every HF tensor its own leaf parameter (fused layers get theirs in ``parts``)."""
        by_name: dict[str, nn.Parameter] = {}
        self._fused: list[tuple[nn.Module, str, list[nn.Parameter]]] = []
        self.parts = nn.ParameterList()  # owns the fused layers' parts (``.to()`` moves them)
        for path, module in self.model.named_modules():
            if not isinstance(module, WeightOwner):
                continue
            for leaf in module.loaded_leaves():
                ids = module.shard_ids()
                if ids == (None,):
                    by_name[hf_name(self.model, (path, leaf, None))] = getattr(module, leaf)
                    continue
                parts = [nn.Parameter(module.shard_view(leaf, i).detach().clone()) for i in ids]
                del module._parameters[leaf]  # from now on a tensor rebuilt from the parts
                self._fused.append((module, leaf, parts))
                self.parts.extend(parts)
                for shard, part in zip(ids, parts):
                    by_name[hf_name(self.model, (path, leaf, shard))] = part
        self._fuse()
        self._hf = [(name, by_name[name]) for name in hf_names(self.model)]

    def _fuse(self) -> None:
        for module, leaf, parts in self._fused:
            setattr(module, leaf, torch.cat(parts))  # differentiable; values copied exactly

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate=True):
        """HF names (``model.layers.0.self_attn.q_proj.weight``, ...), in checkpoint order."""
        for name, param in self._hf:
            yield prefix + name, param

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """``{HF name: tensor}`` (detached): a checkpoint, or a refit's payload."""
        return {name: param.detach() for name, param in self._hf}

    # ---------------------------------------------------------------- forward
    def forward(
        self, sequences: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, ops.SequenceLayout]:
        """Final hidden states of every token of the packed sequences, and their layout."""
        lengths = [len(s) for s in sequences]
        if not lengths or min(lengths) < 1:
            raise ValueError("sequences must be non-empty token lists")
        ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=self.device)
        layout = ops.SequenceLayout.of(lengths, self.page_size, self.device)
        self._fuse()
        return self.model(ids, layout.row_pos, layout), layout

    def token_logprobs(
        self,
        sequences: Sequence[Sequence[int]],
        prompt_lens: Sequence[int],
        temperature: float = 1.0,
    ) -> list[torch.Tensor]:
        """Per-token logprobs of each completion token (``sequences[i][prompt_lens[i]:]``),
        differentiable: the quantity the engine reports as ``output_token_logprobs``, computed
        as its sampler does (``temperature`` 1.0 for greedy requests, as the engine reports)."""
        if len(prompt_lens) != len(sequences):
            raise ValueError("one prompt length per sequence")
        rows, targets, counts = [], [], []
        hidden, layout = self(sequences)
        for seq, start, offset in zip(sequences, prompt_lens, layout.cu_lens):
            if not 1 <= start <= len(seq):
                raise ValueError(f"prompt length {start} outside 1..{len(seq)}")
            # row p predicts token p + 1: completion tokens start..len-1 come from rows start-1..
            rows.extend(range(offset + start - 1, offset + len(seq) - 1))
            targets.extend(seq[start:])
            counts.append(len(seq) - start)
        if not rows:
            return [hidden.new_zeros(0) for _ in sequences]
        dev = self.device
        logits = self.model.logits(hidden.index_select(0, torch.tensor(rows, device=dev)))
        temps = torch.full((len(rows), 1), float(temperature), dtype=torch.float32, device=dev)
        logprobs = torch.log_softmax(logits / temps, dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=dev).unsqueeze(1)).squeeze(1)
        return list(chosen.split(counts))


def logprob_diff(
    engine_logprobs: Sequence[Sequence[float]], trainer_logprobs: Sequence[torch.Tensor]
) -> float:
    """Max |rollout - trainer| logprob over every token (0.0: training-serving aligned).
    ``engine_logprobs``: per sequence, the values of ``output_token_logprobs``."""
    worst = 0.0
    for rollout, trainer in zip(engine_logprobs, trainer_logprobs, strict=True):
        ours = torch.tensor(list(rollout), dtype=torch.float32)
        theirs = trainer.detach().to(torch.float32).cpu()
        if ours.shape != theirs.shape:
            raise ValueError(
                f"token counts differ: rollout {ours.shape[0]}, trainer {theirs.shape[0]}"
            )
        if ours.numel():
            worst = max(worst, (ours - theirs).abs().max().item())
    return worst
