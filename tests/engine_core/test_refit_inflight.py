"""A refit while requests are in flight: none is lost, and each output's ``weight_versions``
say which weights produced which token (old ones first, then the new ones)."""

from __future__ import annotations

import threading
import time

from refit_workers import Step, tensors_for

from engine_core import Engine

PARAMS = {"temperature": 0, "max_new_tokens": 120, "ignore_eos": True}
PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
ORDER = ["default", "v1"]


def test_refit_while_requests_in_flight(model_dir):
    old, new = model_dir("llama"), model_dir("llama", seed=1)
    named = tensors_for(Step(new, "v1"))
    with Engine(old, device="cpu") as reference:
        ref = reference.generate(input_ids=PROMPTS, sampling_params=PARAMS)
    with Engine(old, device="cpu") as engine:
        box: dict = {}
        worker = threading.Thread(
            target=lambda: box.update(
                out=engine.generate(input_ids=PROMPTS, sampling_params=PARAMS)
            )
        )
        worker.start()
        deadline = time.monotonic() + 60
        while engine.loop.stats.generated_tokens < 5 * len(PROMPTS):
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.001)
        engine.update_weights_from_tensor(named, weight_version="v1")
        worker.join(120)
        later = engine.generate(input_ids=PROMPTS[0], sampling_params=PARAMS)
    outs = box["out"]
    assert len(outs) == len(PROMPTS)
    for out, want in zip(outs, ref):
        meta = out["meta_info"]
        versions = meta["weight_versions"]
        assert meta["finish_reason"]["type"] == "length" and len(out["output_ids"]) == 120
        assert len(versions) == 120 and set(versions) == set(ORDER)
        assert versions == sorted(versions, key=ORDER.index)  # non-decreasing
        assert meta["weight_version"] == "v1"
        # The tokens labelled with the old version are exactly what the old weights produce.
        k = versions.count("default")
        assert out["output_ids"][:k] == want["output_ids"][:k]
        assert out["output_ids"] != want["output_ids"]
    assert later["meta_info"]["weight_versions"] == ["v1"] * 120
