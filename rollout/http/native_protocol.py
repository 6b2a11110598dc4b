"""Request bodies of SGLang's native control endpoints (``managers/io_struct.py``'s fields).

Unknown fields and wrong types are rejected (400 naming the field and value); fields SGLang
has that change nothing here (cache / CUDA-graph knobs) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AbortReq(Strict):
    rid: str | None = ""
    abort_all: StrictBool = False
    finished_reason: Any = None
    abort_message: str | None = None


class PauseGenerationReq(Strict):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class MemoryReq(Strict):
    tags: list[str] | None = None


class UpdateWeightFromDiskReq(Strict):
    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: StrictBool = True
    abort_all_requests: StrictBool = False
    is_async: StrictBool = False
    torch_empty_cache: StrictBool = False
    keep_pause: StrictBool = False
    recapture_cuda_graph: StrictBool = False
    token_step: StrictInt = 0


class UpdateWeightsFromTensorReq(Strict):
    serialized_named_tensors: list[str]
    load_format: str | None = None
    flush_cache: StrictBool = True
    abort_all_requests: StrictBool = False
    weight_version: str | None = None
    # Newer SGLang's: no draft model and no CUDA cache to empty here, so no effect.
    disable_draft_model: StrictBool | None = None
    torch_empty_cache: StrictBool = False


class InitWeightsUpdateGroupReq(Strict):
    master_address: str
    master_port: StrictInt | str
    rank_offset: StrictInt
    world_size: StrictInt
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributedReq(Strict):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[StrictInt]]
    group_name: str = "weight_update_group"
    flush_cache: StrictBool = True
    abort_all_requests: StrictBool = False
    weight_version: str | None = None
    load_format: str | None = None


class DestroyWeightsUpdateGroupReq(Strict):
    group_name: str = "weight_update_group"


class GetWeightsByNameReq(Strict):
    name: str
    truncate_size: StrictInt = 100


class UpdateWeightVersionReq(Strict):
    new_version: str
    abort_all_requests: StrictBool = False
