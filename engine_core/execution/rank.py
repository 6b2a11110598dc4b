"""One TP rank: its model shard, KV cache, weights, memory and refit state.

``Rank`` builds its parts in order; its public methods are everything a rank executes. The
engine reaches them on every rank at once through ``execution.rank_client.RankClient`` (in
this process for tp_size 1, in one worker process per rank otherwise), always in the same
order on every rank so their collectives line up.

Weights are staged (validated, nothing written) and then committed, on every rank, so a refit
is atomic across TP ranks (``weights.refitter``); checkpoint load, resume from a checkpoint
and every refit go through the same ``weights.loader`` path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine_core.config import EngineConfig
from engine_core.control.rank_memory import RankMemory
from engine_core.execution.kv_cache import KVCache
from engine_core.execution.model_runner import ModelRunner, build_model, resolve_dtype
from engine_core.model_config import ModelConfig
from engine_core.parallel import TPContext
from engine_core.scheduling.step_plan import StepPlan, StepResult
from engine_core.weights.loader import (
    StagedWeights,
    iter_checkpoint,
    load_weights,
    param_view,
    stage_weights,
)
from engine_core.weights.rank_refit import RankRefit
from engine_core.weights.sglang_payloads import decode_pairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInfo:
    num_pages: int
    dtype: str
    deterministic_matmul: str  # how deterministic mode's matmul is batch-invariant ("off")


class Rank:
    """Holds one rank's model shard and everything attached to it."""

    def __init__(
        self,
        config: EngineConfig,
        model_cfg: ModelConfig,
        context_length: int,
        tp: TPContext | None = None,
    ) -> None:
        self.config = config
        self.tp = tp or TPContext()
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config, model_cfg)
        self.model, attention, self.deterministic_matmul, self.packed = build_model(
            config, model_cfg, self.tp, context_length, self.dtype
        )
        load_weights(self.model, iter_checkpoint(config.model_path), require_complete=True)
        self._repack()  # before the KV cache takes its share of memory
        self._staged: StagedWeights | None = None
        self.kv = KVCache(self.model, config, model_cfg, self.dtype, self.device)
        self.runner = ModelRunner(self.model, attention, config.page_size, self.device, self.tp)
        self.refit = RankRefit(self)
        self.memory = RankMemory(self.model, self.kv, self.device, self.refit, self.packed)

    def info(self) -> RankInfo:
        return RankInfo(
            self.kv.num_pages, str(self.dtype).replace("torch.", ""), self.deterministic_matmul
        )

    # ---------------------------------------------------------------- steps
    def execute(self, plan: StepPlan) -> StepResult | None:
        """One forward step; rank 0 samples (other ranks join the collectives only)."""
        if plan.page_copies:  # before any KV write of this step (the source may be reused)
            self.kv.copy_pages(plan.page_copies)
        return self.runner.execute(plan)

    # ---------------------------------------------------------------- weights (two-phase)
    def stage_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        require_complete: bool,
        strict_dtype: bool,
        adopt: bool = False,
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

    def stage_checkpoint(self, model_path: str) -> int:
        return self.stage_weights(
            iter_checkpoint(model_path), require_complete=True, strict_dtype=False
        )

    def commit_weights(self) -> int:
        staged, self._staged = self._staged, None
        assert staged is not None, "commit_weights without stage_weights"
        count = staged.commit()
        self._repack()
        self.refit.after_commit(self.config.keep_refit_staging)
        return count

    def close(self) -> None:
        """Free the KV cache and the packed weights at engine shutdown (an in-process rank
        otherwise holds them as long as anything references the engine). The parameters
        stay, so a closed engine's weights can still be read."""
        self.kv.release()
        if self.packed is not None:
            self.packed.release()

    def _repack(self) -> None:
        """The packed matmul's copies follow every write of the parameters."""
        if self.packed is not None:
            self.packed.refresh(self.model)

    def discard_weights(self) -> None:
        self._staged = None

    def weight_storages(self) -> set[int]:
        """Data pointers of the storages the parameters live in (a staging buffer the
        parameters adopted must not be received into again)."""
        return {p.untyped_storage().data_ptr() for p in self.model.parameters()}

    def get_weight(self, name: str) -> torch.Tensor:
        return param_view(self.model, name)

    def get_weight_values(self, name: str, truncate_size: int) -> list:
        """SGLang's shape: ``tolist()`` of the first ``truncate_size`` rows (dim 0)."""
        return self.get_weight(name)[:truncate_size].float().tolist()

    # ---------------------------------------------------------------- trainer refits
    def init_group(self, *args: Any) -> int:
        return self.refit.init_group(*args)

    def destroy_group(self, group_name: str) -> bool:
        return self.refit.destroy_group(group_name)

    def stage_distributed(self, group_name: str, plan, metas, hold: bool) -> int:
        return self.refit.stage_distributed(group_name, plan, metas, hold)

    def stage_received(self, group_name: str, pairs, hold: bool) -> int:
        return self.refit.stage_received(group_name, pairs, hold)

    def stage_colocated(self, handles: Sequence[Any], hold: bool = False) -> int:
        return self.refit.stage_colocated(handles, hold)

    def stage_pairs(self, pairs: list[tuple[str, torch.Tensor]], hold: bool = False) -> int:
        return self.refit.hold_tensors(pairs) if hold else self.refit.stage_pairs(pairs)

    def stage_serialized(self, payload: Any, load_format: str | None, hold: bool = False) -> int:
        """This rank's SGLang payload (``weights.sglang_payloads``), decoded here."""
        pairs = decode_pairs(payload, load_format)
        return self.refit.hold_tensors(pairs) if hold else self.refit.stage_pairs(pairs)

    def restage_held(self) -> int:
        return self.refit.restage_held()

    def discard_held(self) -> None:
        self.refit.discard_held()

    def has_held(self) -> bool:
        return self.refit.has_held()

    def checksums(self, names: Sequence[str] | None) -> dict[str, str]:
        return self.refit.checksums(names)

    def close_groups(self) -> None:
        self.refit.close()

    # ---------------------------------------------------------------- memory
    def release_kv_cache(self) -> int:
        return self.memory.release_kv_cache()

    def resume_kv_cache(self) -> None:
        self.kv.allocate()

    def release_weights(self, host_copy: bool) -> int:
        return self.memory.release_weights(host_copy)

    def resume_weights(self, source: str, checkpoint: str | None = None) -> None:
        self.memory.resume_weights(source, checkpoint)

    def check_weights_loaded(self) -> None:
        self.memory.check_weights_loaded()

    def memory_bytes(self) -> dict[str, int]:
        return self.memory.memory_bytes()
