"""Per-rank model execution: builds the model, owns the KV cache, turns a StepPlan into tensors,
runs the forward and samples. With layers/ and models/, the only place that makes tensors."""

from __future__ import annotations

import functools
import logging

import torch

from engine_core.config import EngineConfig
from engine_core.layers.attention import AttentionMetadata, DecodeGroup, PrefillSeq
from engine_core.loader import (
    StagedWeights,
    iter_checkpoint,
    load_weights,
    param_view,
    stage_weights,
)
from engine_core.memory import RunnerMemory
from engine_core.model_config import ModelConfig
from engine_core.models.llama import Backend, LlamaFamilyForCausalLM
from engine_core.parallel import TPContext
from engine_core.sampler import sample_step
from engine_core.step_plan import StepPlan, StepResult

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(config: EngineConfig, model_cfg: ModelConfig) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if config.device == "cpu":
        return torch.float32  # no fast bf16/fp16 matmul on this class of CPU
    return _DTYPES.get(model_cfg.torch_dtype, torch.float32)


def kv_bytes_per_page(model_cfg: ModelConfig, local_kv_heads: int, page_size: int, dtype) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * model_cfg.num_layers * page_size * local_kv_heads * model_cfg.head_dim * elem


class ModelRunner(RunnerMemory):
    """Holds one rank's model shard and KV cache (release/restore: ``RunnerMemory``)."""

    def __init__(
        self,
        config: EngineConfig,
        model_cfg: ModelConfig,
        context_length: int,
        tp: TPContext | None = None,
    ):
        self.config = config
        self.model_cfg = model_cfg
        self.tp = tp or TPContext()
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config, model_cfg)
        self.page_size = config.page_size
        self.deterministic_matmul = "off"
        self.model = self._build_model(context_length)
        load_weights(self.model, iter_checkpoint(config.model_path), require_complete=True)
        self.num_pages = self._num_pages()
        self._allocate_kv_cache()
        self._staged: StagedWeights | None = None

    def _build_model(self, context_length: int) -> LlamaFamilyForCausalLM:
        backend = (
            Backend(linear=self._deterministic_linear()) if self.config.deterministic else Backend()
        )
        with torch.device(self.device):
            model = LlamaFamilyForCausalLM(self.model_cfg, self.tp, context_length, backend)
        return model.to(self.dtype).eval()

    def _deterministic_linear(self):
        """A batch-invariant matmul: Triton on CUDA; on CPU the BLAS itself when the start-up
        probe proves its rows batch-invariant for every weight shape, else fixed M tiles."""
        import kernels
        from kernels.invariant_linear import padded_linear, rows_invariant

        if self.device.type == "cuda":
            return kernels.batch_invariant_linear
        mc, tp = self.model_cfg, self.tp.size
        local_qkv = (mc.num_heads // tp + 2 * max(1, mc.num_kv_heads // tp)) * mc.head_dim
        shapes = [
            (mc.hidden_size, local_qkv),
            (mc.q_size // tp, mc.hidden_size),
            (mc.hidden_size, 2 * mc.intermediate_size // tp),
            (mc.intermediate_size // tp, mc.hidden_size),
            (mc.hidden_size, -(-mc.vocab_size // tp)),
        ]
        threads = torch.get_num_threads()
        if all(rows_invariant(k, n, self.dtype, threads) for k, n in shapes):
            self.deterministic_matmul = "blas (proved row-invariant at start-up)"
            return padded_linear
        self.deterministic_matmul = "fixed 16-row tiles"
        return kernels.batch_invariant_linear

    def _num_pages(self) -> int:
        if self.config.max_total_tokens is not None:
            return -(-self.config.max_total_tokens // self.page_size)
        local_kv = self.model.model.layers[0].self_attn.kv_heads
        per_page = kv_bytes_per_page(self.model_cfg, local_kv, self.page_size, self.dtype)
        return max(1, self.config.kv_cache_memory_bytes // per_page)

    def _allocate_kv_cache(self) -> None:
        for layer in self.model.attention_layers():
            shape = (self.num_pages, self.page_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, sample: bool = True) -> StepResult | None:
        """Run one step. TP ranks other than 0 pass ``sample=False``: they join the forward's
        collectives (including the LM head's gather) but leave sampling to rank 0."""
        ids, positions, meta = self._prepare(plan)
        hidden = self.model(ids, positions, meta)
        if not plan.logit_rows:
            return StepResult([], None, [])
        rows = torch.tensor(plan.logit_rows, dtype=torch.long, device=self.device)
        logits = self.model.logits(hidden.index_select(0, rows))
        return sample_step(logits, plan) if sample else None

    def _prepare(self, plan: StepPlan):
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        ps = self.page_size
        for seq in plan.seqs:
            ids.extend(seq.token_ids)
            for pos in range(seq.start, seq.start + len(seq.token_ids)):
                positions.append(pos)
                slots.append(seq.pages[pos // ps] * ps + pos % ps)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            decode=self._decode_group(plan),
            prefills=self._prefill_seqs(plan),
        )
        if dev.type == "cuda":
            self._add_varlen(plan, meta)
        elif self._use_c_kernel:
            self._add_rows(plan, meta)
        elif self.config.deterministic:
            # No C kernel (no compiler, or not fp32): the batch-invariant torch reference.
            self._add_varlen(plan, meta)
            meta.kernel_path = True
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        return ids_t, torch.tensor(positions, dtype=torch.long, device=dev), meta

    def _decode_group(self, plan: StepPlan) -> DecodeGroup | None:
        rows, tables, lens = [], [], []
        row = 0
        for seq in plan.seqs:
            if len(seq.token_ids) == 1:
                kv_len = seq.start + 1
                rows.append(row)
                tables.append(seq.pages[: -(-kv_len // self.page_size)])
                lens.append(kv_len)
            row += len(seq.token_ids)
        if not rows:
            return None
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        kv_pos = torch.arange(width * self.page_size, device=dev)
        mask = kv_pos.unsqueeze(0) < torch.tensor(lens, device=dev).unsqueeze(1)
        all_rows = len(rows) == row
        return DecodeGroup(
            rows=None if all_rows else torch.tensor(rows, dtype=torch.long, device=dev),
            page_table=torch.tensor(padded, dtype=torch.long, device=dev),
            mask=mask.view(len(rows), 1, 1, -1),
        )

    def _prefill_seqs(self, plan: StepPlan) -> list[PrefillSeq]:
        out, row = [], 0
        for seq in plan.seqs:
            q_len = len(seq.token_ids)
            if q_len > 1:
                kv_len = seq.start + q_len
                pages = seq.pages[: -(-kv_len // self.page_size)]
                q_pos = torch.arange(seq.start, kv_len, device=self.device).unsqueeze(1)
                mask = torch.arange(kv_len, device=self.device).unsqueeze(0) <= q_pos
                pages_t = torch.tensor(pages, dtype=torch.long, device=self.device)
                out.append(PrefillSeq(row, q_len, kv_len, pages_t, mask))
            row += q_len
        return out

    @functools.cached_property
    def _use_c_kernel(self) -> bool:
        from kernels import cpu_attention

        return self.dtype == torch.float32 and cpu_attention.available()

    def _add_rows(self, plan: StepPlan, meta: AttentionMetadata) -> None:
        width = max(len(s.pages) for s in plan.seqs)
        table = [s.pages + [0] * (width - len(s.pages)) for s in plan.seqs]
        row_seq, row_pos = [], []
        for index, seq in enumerate(plan.seqs):
            row_seq.extend([index] * len(seq.token_ids))
            row_pos.extend(range(seq.start, seq.start + len(seq.token_ids)))
        i64 = dict(dtype=torch.long, device=self.device)
        meta.all_pages = torch.tensor(table, **i64)
        meta.row_seq = torch.tensor(row_seq, **i64)
        meta.row_pos = torch.tensor(row_pos, **i64)
        meta.fixed_order = self.config.deterministic

    def _add_varlen(self, plan: StepPlan, meta: AttentionMetadata) -> None:
        width = max(len(s.pages) for s in plan.seqs)
        table = [s.pages + [0] * (width - len(s.pages)) for s in plan.seqs]
        cu = [0]
        for s in plan.seqs:
            cu.append(cu[-1] + len(s.token_ids))
        lens = [s.start + len(s.token_ids) for s in plan.seqs]
        i32 = dict(dtype=torch.int32, device=self.device)
        meta.page_table = torch.tensor(table, **i32)
        meta.cu_q_lens = torch.tensor(cu, **i32)
        meta.seq_lens = torch.tensor(lens, **i32)

    # ---- weights (the same ingest path as checkpoint load), two-phase for TP atomicity ----
    def stage_weights(
        self, named_tensors, *, require_complete: bool, strict_dtype: bool, adopt: bool = False
    ) -> int:
        """Validate this rank's shards of ``named_tensors``; nothing is written until commit.
        ``adopt``: the tensors' memory is handed over (see ``loader.StagedWeights``)."""
        self._staged = stage_weights(
            self.model,
            named_tensors,
            require_complete=require_complete,
            expected_dtype=self.dtype if strict_dtype else None,
            adopt=adopt,
        )
        return len(self._staged.names)

    def weight_storages(self) -> set[int]:
        """Data pointers of the storages the parameters live in (a staging buffer the
        parameters adopted must not be received into again)."""
        return {p.untyped_storage().data_ptr() for p in self.model.parameters()}

    def stage_checkpoint(self, model_path: str) -> int:
        return self.stage_weights(
            iter_checkpoint(model_path), require_complete=True, strict_dtype=False
        )

    def commit_weights(self) -> int:
        staged, self._staged = self._staged, None
        assert staged is not None, "commit_weights without stage_weights"
        count = staged.commit()
        if "refit" in self.__dict__:
            # The weights are switched: what follows must not fail the refit (e.g. no memory
            # for the spare buffer on a GPU whose KV cache took the rest).
            try:
                if self.config.keep_refit_staging:
                    self.refit.reserve_spares(self.weight_storages())
                else:
                    self.refit.release_staging(self.weight_storages())  # buffers nothing uses
            except Exception:
                log.warning("could not prepare the refit staging spare; continuing", exc_info=True)
        return count

    def discard_weights(self) -> None:
        self._staged = None

    # ---- trainer refits (weight-update groups, shared buckets, held updates, checksums) ----
    @functools.cached_property
    def refit(self):
        from engine_core.refit_rank import RankRefit

        return RankRefit(self)

    def _release_staging(self, counted: set[int]) -> int:
        # Only a runner that refitted has arenas; do not build the refit state just for this.
        if "refit" not in self.__dict__:
            return 0
        return self.refit.release_staging(counted)

    def refit_call(self, method: str, *args, **kwargs):
        """Run ``RankRefit.<method>`` on this rank (the executor calls it on every rank)."""
        return getattr(self.refit, method)(*args, **kwargs)

    def get_weight(self, name: str) -> torch.Tensor:
        return param_view(self.model, name)

    def get_weight_values(self, name: str, truncate_size: int) -> list[float]:
        return self.get_weight(name).flatten()[:truncate_size].float().tolist()

    def info(self) -> dict:
        return {"num_pages": self.num_pages, "dtype": str(self.dtype).replace("torch.", "")}
