"""SGLang-shaped output dicts built from a request's state."""

from __future__ import annotations

from typing import Any

from engine_core.request import Request


def meta_info(req: Request, weight_version: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "id": req.rid,
        "finish_reason": req.finish_reason,
        "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
        "weight_version": weight_version,
        "weight_versions": list(req.output_versions),
    }
    if req.return_logprob:
        info.update(_logprob_fields(req))
    return info


def _logprob_fields(req: Request) -> dict[str, Any]:
    start = req.input_logprob_start
    input_ids = req.prompt_ids[start:]
    fields: dict[str, Any] = {
        "input_token_logprobs": [(lp, tok, None) for lp, tok in zip(req.input_logprobs, input_ids)],
        "output_token_logprobs": [
            (lp, tok, None) for lp, tok in zip(req.output_logprobs, req.output_ids)
        ],
    }
    if req.top_logprobs_num > 0:
        fields["input_top_logprobs"] = [
            None if tops is None else [(lp, tok, None) for lp, tok in tops]
            for tops in req.input_top_logprobs
        ]
        fields["output_top_logprobs"] = [
            [(lp, tok, None) for lp, tok in tops] for tops in req.output_top_logprobs
        ]
    return fields


def final_output(req: Request, text: str, weight_version: str) -> dict[str, Any]:
    return {
        "text": text,
        "output_ids": list(req.output_ids),
        "meta_info": meta_info(req, weight_version),
    }
