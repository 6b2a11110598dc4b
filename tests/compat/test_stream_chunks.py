"""Stream chunks as SGLang's ``tokenizer_manager`` output processor builds them: by default
(``incremental_streaming_output=False``) every chunk holds the output so far -- text,
``output_ids`` and the output logprobs; with ``incremental_streaming_output=True`` a chunk holds
only the new part, its output-side ``meta_info`` lists sliced to the new tokens."""

from __future__ import annotations

import pytest

from engine_core import Engine

PARAMS = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
IDS = [5, 17, 29, 41, 53]
SLICED = ("output_token_logprobs", "weight_versions")


def stream(engine: Engine) -> list[dict]:
    return list(
        engine.generate(input_ids=IDS, sampling_params=PARAMS, return_logprob=True, stream=True)
    )


@pytest.fixture(scope="module")
def full(tiny_model):
    with Engine(tiny_model, device="cpu", max_total_tokens=256) as engine:
        return engine.generate(input_ids=IDS, sampling_params=PARAMS, return_logprob=True)


def test_default_chunks_are_cumulative(tiny_model, full):
    with Engine(tiny_model, device="cpu", max_total_tokens=256) as engine:
        chunks = stream(engine)
    assert len(chunks) > 2
    for chunk in chunks:
        n = len(chunk["output_ids"])
        assert chunk["output_ids"] == full["output_ids"][:n]
        for key in SLICED:
            assert chunk["meta_info"][key] == full["meta_info"][key][:n]
    last = chunks[-1]
    assert (last["text"], last["output_ids"]) == (full["text"], full["output_ids"])


def test_incremental_chunks_concatenate(tiny_model, full):
    with Engine(
        tiny_model, device="cpu", max_total_tokens=256, incremental_streaming_output=True
    ) as engine:
        assert engine.get_server_info()["incremental_streaming_output"] is True
        chunks = stream(engine)
    assert len(chunks) > 2
    assert sum((c["output_ids"] for c in chunks), []) == full["output_ids"]
    assert "".join(c["text"] for c in chunks) == full["text"]
    for key in SLICED:
        assert sum((c["meta_info"][key] for c in chunks), []) == full["meta_info"][key]
    assert all(len(c["meta_info"]["output_token_logprobs"]) == len(c["output_ids"]) for c in chunks)
