"""A full refit over HTTP from a trainer process built with the stock recipe (rendezvous +
``PrefixStore`` + torch's ``_new_process_group_helper``, as SGLang's tests, verl, slime use):
``/init_weights_update_group`` -> ``/update_weights_from_distributed`` -> generation on the new
weights, versions advance -> ``/destroy_weights_update_group``."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import httpx
import pytest
from safetensors.torch import load_file
from trainer import stock_trainer

from engine_core import Engine
from weight_sync import free_port

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


def test_refit_over_http_from_a_trainer_process(server, tiny_model_v2):
    weights = os.path.join(tiny_model_v2, "model.safetensors")
    tensors = load_file(weights)
    names = sorted(tensors)
    with Engine(tiny_model_v2, device="cpu") as fresh:
        expected = fresh.generate(input_ids=[1, 2, 3], sampling_params=GREEDY)["output_ids"]
    port, group = free_port(), "http-refit"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    trainer = ctx.Process(target=stock_trainer, args=(port, 2, group, weights, names, q))
    trainer.start()
    client = httpx.Client(base_url=server.url, timeout=120)
    try:
        before = client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": GREEDY})
        assert before.json()["output_ids"] != expected  # the refit must change something
        init = {
            "master_address": "127.0.0.1",
            "master_port": port,
            "rank_offset": 1,
            "world_size": 2,
            "group_name": group,
            "backend": "gloo",
        }
        joined = client.post("/init_weights_update_group", json=init)
        assert joined.status_code == 200 and joined.json()["success"] is True, joined.text

        # a generation in flight while the update arrives keeps being served
        inflight: dict = {}
        long = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
        runner = threading.Thread(
            target=lambda: inflight.update(
                client.post("/generate", json={"input_ids": [5, 6], "sampling_params": long}).json()
            )
        )
        runner.start()
        body = {
            "names": names,
            "dtypes": ["float32"] * len(names),
            "shapes": [list(tensors[n].shape) for n in names],
            "group_name": group,
            "weight_version": "step-1",
        }
        updated = client.post("/update_weights_from_distributed", json=body)
        assert updated.status_code == 200 and updated.json()["success"] is True, updated.text
        assert q.get(timeout=60) == "sent"
        runner.join(timeout=120)
        assert inflight["meta_info"]["completion_tokens"] == 40
        assert set(inflight["meta_info"]["weight_versions"]) <= {"default", "step-1"}

        assert client.get("/get_weight_version").json()["weight_version"] == "step-1"
        after = client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": GREEDY})
        assert after.json()["output_ids"] == expected
        assert after.json()["meta_info"]["weight_versions"] == ["step-1"] * 6
        metrics = client.get("/metrics").text
        assert 'rollout:weight_version_info{engine="0",version="step-1"} 1.0' in metrics
        assert "rollout:refit_duration_seconds_count 1" in metrics

        # a bad update (unknown name) fails with the weights and version unchanged
        bad = dict(body, names=["no.such.weight"], dtypes=["float32"], shapes=[[2]])
        bad["weight_version"] = "step-2"
        failed = client.post("/update_weights_from_distributed", json=bad)
        assert failed.status_code == 400 and failed.json()["success"] is False
        assert "no.such.weight" in failed.json()["message"]
        assert client.get("/get_weight_version").json()["weight_version"] == "step-1"

        gone = client.post("/destroy_weights_update_group", json={"group_name": group})
        assert gone.status_code == 200 and gone.json()["success"] is True
    finally:
        client.close()
        trainer.join(timeout=30)
        if trainer.is_alive():
            trainer.kill()
    assert trainer.exitcode == 0


@pytest.mark.parametrize("port", ["not-a-port"])
def test_bad_group_is_a_400_and_the_server_serves_on(server, port):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        init = {
            "master_address": "127.0.0.1",
            "master_port": port,
            "rank_offset": 1,
            "world_size": 2,
            "group_name": "bad",
            "backend": "gloo",
        }
        failed = client.post("/init_weights_update_group", json=init)
        assert failed.status_code == 400 and failed.json()["success"] is False
        assert "master_port='not-a-port'" in failed.json()["message"]
        ok = client.post("/generate", json={"input_ids": [1, 2], "sampling_params": GREEDY})
        assert ok.status_code == 200
