"""One rank's forward: build the model, and turn a ``StepPlan`` into tensors, run it, sample.

With the attention backends (``layers.attention_backends``) the only place that makes tensors
from bookkeeping.
"""

from __future__ import annotations

import torch

from engine_core.config import EngineConfig
from engine_core.errors import ModelLoadError
from engine_core.execution.sampler import sample_step
from engine_core.layers.attention import choose_backend
from engine_core.layers.elementwise import choose_elementwise
from engine_core.layers.fused_layer import choose_fused_layers
from engine_core.layers.packed_linear import PackedLinear
from engine_core.layers.sharded import WeightOwner
from engine_core.model_config import ModelConfig
from engine_core.models.llama import ModelOps
from engine_core.models.registry import ARCHITECTURES
from engine_core.parallel import TPContext
from engine_core.scheduling.step_plan import StepPlan, StepResult

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(config: EngineConfig, model_cfg: ModelConfig) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if config.device == "cpu":
        return torch.float32  # no fast bf16/fp16 matmul on this class of CPU
    return _DTYPES.get(model_cfg.torch_dtype, torch.float32)


def build_model(
    config: EngineConfig,
    model_cfg: ModelConfig,
    tp: TPContext,
    context_length: int,
    dtype: torch.dtype,
) -> tuple[torch.nn.Module, object, str, PackedLinear | None]:
    """The architecture's model (weights not loaded), its attention backend, how its matmul is
    batch-invariant in deterministic mode (``"off"`` otherwise), and the packed-weight matmul
    when it uses one (its owner repacks after every weight write: ``execution.rank``)."""
    device = torch.device(config.device)
    attention = choose_backend(device, dtype, config.deterministic)
    linear, matmul = engine_linear(config, model_cfg, tp.size, dtype)
    elementwise = choose_elementwise(device, dtype)
    fused_layers = choose_fused_layers(linear, attention, elementwise, tp.size)
    model_class = ARCHITECTURES[model_cfg.architecture].model_class
    with torch.device(device):
        ops = ModelOps(attention, linear, elementwise, fused_layers)
        model = model_class(model_cfg, tp, context_length, ops)
    model = model.to(dtype).eval()
    if config.weight_dtype == "bfloat16":
        store_matrices_in_bf16(model)
    return model, attention, matmul, linear if isinstance(linear, PackedLinear) else None


def packs_weights(config: EngineConfig, dtype: torch.dtype) -> bool:
    """Whether the engine's matmul keeps a packed copy of the matrices (CPU, fp32 compute,
    the C kernel built)."""
    from kernels import cpu_linear

    return config.device == "cpu" and dtype == torch.float32 and cpu_linear.available()


def packed_copy_fraction(config: EngineConfig, dtype: torch.dtype) -> float:
    """The packed copy's size over the parameters' (what the KV budget adds for it)."""
    if not packs_weights(config, dtype):
        return 0.0
    return 0.25 if config.weight_dtype == "int8" else 1.0


def engine_linear(config: EngineConfig, model_cfg: ModelConfig, tp_size: int, dtype: torch.dtype):
    """The engine's matmul and how it is batch-invariant (``"off"`` in default mode).

    On CPU in fp32 with the C kernel built: packed weights and the kernel at every size, in
    both modes (row-invariant by construction; faster than the BLAS here at every size).
    bf16-stored and int8-packed weights need it.
    """
    device = torch.device(config.device)
    narrow = config.weight_dtype in ("bfloat16", "int8")
    if narrow and not packs_weights(config, dtype):
        raise ModelLoadError(
            f"weight_dtype={config.weight_dtype!r} needs float32 compute and the C linear "
            "kernel (a C compiler and an AVX2/FMA CPU)"
        )
    if packs_weights(config, dtype):
        label = "C kernel (row-invariant by construction)"
        if narrow:
            short = "bf16" if config.weight_dtype == "bfloat16" else "int8"
            label = f"C kernel, {short} weights (row-invariant by construction)"
        op = PackedLinear(int8=config.weight_dtype == "int8")
        return op, label if config.deterministic else "off"
    if config.deterministic:
        return _deterministic_linear(model_cfg, tp_size, dtype, device)
    return torch.nn.functional.linear, "off"


def store_matrices_in_bf16(model: torch.nn.Module) -> None:
    """Linear, embedding and LM-head matrices to bf16 (norms and biases stay in the compute
    dtype). Refits and checkpoint loads then copy into them, rounding to nearest even."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, WeightOwner) and weight is not None and weight.dim() == 2:
            weight.data = weight.data.to(torch.bfloat16)


def _deterministic_linear(mc: ModelConfig, tp: int, dtype: torch.dtype, device: torch.device):
    """A batch-invariant matmul: Triton on CUDA; on CPU in fp32 the C kernel (invariant by
    construction), else the BLAS itself when the start-up probe proves its rows
    batch-invariant for every weight shape, else fixed M tiles."""
    import kernels
    from kernels import cpu_linear
    from kernels.invariant_linear import padded_linear, rows_invariant

    if device.type == "cuda":
        return kernels.batch_invariant_linear, "triton fixed tiles"
    if dtype == torch.float32 and cpu_linear.available():
        return cpu_linear.linear, "C kernel (row-invariant by construction)"
    local_qkv = (mc.num_heads // tp + 2 * max(1, mc.num_kv_heads // tp)) * mc.head_dim
    shapes = [
        (mc.hidden_size, local_qkv),
        (mc.q_size // tp, mc.hidden_size),
        (mc.hidden_size, 2 * mc.intermediate_size // tp),
        (mc.intermediate_size // tp, mc.hidden_size),
        (mc.hidden_size, -(-mc.vocab_size // tp)),
    ]
    threads = torch.get_num_threads()
    if all(rows_invariant(k, n, dtype, threads) for k, n in shapes):
        return padded_linear, "blas (proved row-invariant at start-up)"
    return kernels.batch_invariant_linear, "fixed 16-row tiles"


class ModelRunner:
    """Runs steps of one rank's model through its attention backend."""

    def __init__(
        self, model, attention, page_size: int, device: torch.device, tp: TPContext
    ) -> None:
        self.model = model
        self.attention = attention
        self.page_size = page_size
        self.device = device
        self.samples = tp.rank == 0  # the other ranks join the collectives, rank 0 samples

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult | None:
        ids: list[int] = []
        positions: list[int] = []
        for seq in plan.seqs:
            ids.extend(seq.token_ids)
            positions.extend(range(seq.start, seq.start + len(seq.token_ids)))
        meta = self.attention.build(plan, self.page_size, self.device)
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        hidden = self.model(ids_t, torch.tensor(positions, dtype=torch.long, device=dev), meta)
        if not self.samples:
            if plan.logit_rows:  # the LM head is vocab-parallel: every rank joins its gather
                self.model.logits(hidden.index_select(0, self._rows(plan.logit_rows)))
            return None
        result = StepResult([], None, [])
        if plan.logit_rows:
            logits = self.model.logits(hidden.index_select(0, self._rows(plan.logit_rows)))
            result = sample_step(logits, plan)
        if plan.hidden_rows:  # final-norm hidden states (SGLang's return_hidden_states)
            picked = hidden.index_select(0, self._rows(plan.hidden_rows))
            result.hidden_states = picked.float().cpu().tolist()
        return result

    def _rows(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)
