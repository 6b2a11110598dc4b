"""``rollout serve --num-engines 2``: the HTTP server in front of the Ray service. Generation
goes through the driver's routing policy (round robin here: a batch lands on both engines),
streams too; state endpoints list both engines; a distributed refit over HTTP reaches every
engine (world = trainer + 2 engine ranks) and versions advance on both."""

from __future__ import annotations

import base64
import multiprocessing as mp
import os

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file
from server_process import ServerProcess
from trainer import stock_trainer

from engine_core import Engine
from weight_sync import free_port

pytestmark = pytest.mark.slow  # Ray, two engine actors: ~1 min on 2 cores
GREEDY = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}


@pytest.fixture(scope="module")
def service(chat_model):
    args = ["--model-path", chat_model, "--num-engines", "2", "--served-model-name", "tiny"]
    args += ["--set", "cpus_per_rank=0.5", "--set", "num_cpus=2", "--engine", "device=cpu"]
    proc = ServerProcess(args, timeout_s=300)
    yield proc
    assert proc.stop(timeout_s=120) == 0


def test_generation_is_routed_over_both_engines(service, chat_model):
    with httpx.Client(base_url=service.url, timeout=120) as client:
        prompts = [[1, 2, 3], [4, 5, 6], [7, 8], [9, 10]]
        outs = client.post(
            "/generate", json={"input_ids": prompts, "sampling_params": GREEDY}
        ).json()
        assert {o["meta_info"]["engine_index"] for o in outs} == {0, 1}
        with Engine(chat_model, device="cpu") as oracle:
            want = oracle.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == [w["output_ids"] for w in want]
        payload = {"input_ids": [1, 2, 3], "sampling_params": GREEDY, "stream": True}
        with client.stream("POST", "/generate", json=payload) as response:
            events = [x[6:] for x in response.iter_lines() if x.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert '"output_ids":' + str(want[0]["output_ids"]).replace(" ", "") in events[-2]
        info = client.get("/get_server_info").json()
        assert info["num_engines"] == 2 and len(info["internal_states"]) == 2
        assert len(client.get("/v1/loads").json()["loads"]) == 2
        assert 'sglang:num_running_reqs{engine="1"}' in client.get("/metrics").text
    chat = openai.OpenAI(base_url=service.url + "/v1", api_key="x", max_retries=0)
    out = chat.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, n=2
    )
    assert len(out.choices) == 2 and out.usage.completion_tokens == 6


def test_distributed_refit_reaches_every_engine(service, tiny_model_v2):
    weights = os.path.join(tiny_model_v2, "model.safetensors")
    tensors = load_file(weights)
    names = sorted(tensors)
    port, group = free_port(), "http-service-refit"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    trainer = ctx.Process(target=stock_trainer, args=(port, 3, group, weights, names, q))
    trainer.start()
    try:
        with httpx.Client(base_url=service.url, timeout=180) as client:
            init = {
                "master_address": "127.0.0.1",
                "master_port": port,
                "rank_offset": 1,
                "world_size": 3,
                "group_name": group,
                "backend": "gloo",
            }
            joined = client.post("/init_weights_update_group", json=init)
            assert joined.status_code == 200 and joined.json()["ranks"] == [1, 2], joined.text
            body = {
                "names": names,
                "dtypes": ["float32"] * len(names),
                "shapes": [list(tensors[n].shape) for n in names],
                "group_name": group,
                "weight_version": "svc-1",
            }
            updated = client.post("/update_weights_from_distributed", json=body)
            assert updated.status_code == 200 and updated.json()["success"], updated.text
            assert q.get(timeout=60) == "sent"
            versions = client.get("/get_weight_version").json()["weight_versions"]
            assert versions == ["svc-1", "svc-1"]
            with Engine(tiny_model_v2, device="cpu") as fresh:
                want = fresh.generate(input_ids=[[1, 2], [3, 4]], sampling_params=GREEDY)
            outs = client.post(
                "/generate", json={"input_ids": [[1, 2], [3, 4]], "sampling_params": GREEDY}
            ).json()
            assert [o["output_ids"] for o in outs] == [w["output_ids"] for w in want]
            assert {o["meta_info"]["engine_index"] for o in outs} == {0, 1}
            gone = client.post("/destroy_weights_update_group", json={"group_name": group})
            assert gone.json()["success"] is True
            # An engine's failure tuple (the group is gone) is the answer, every engine unchanged.
            stale = client.post(
                "/update_weights_from_distributed", json=body | {"weight_version": "x"}
            )
            assert stale.status_code == 400 and stale.json()["success"] is False, stale.text
            assert client.get("/get_weight_version").json()["weight_versions"] == ["svc-1"] * 2
    finally:
        trainer.join(timeout=30)
        if trainer.is_alive():
            trainer.kill()


def test_tensor_refit_is_all_or_none_across_engines(service, chat_model, tiny_model_v2):
    from safetensors.torch import save

    new = load_file(os.path.join(tiny_model_v2, "model.safetensors"))
    entry = base64.b64encode(save(new)).decode()
    with httpx.Client(base_url=service.url, timeout=180) as client:
        before = client.get("/get_weight_version").json()["weight_versions"]
        name = "model.layers.0.mlp.down_proj.weight"
        bad = base64.b64encode(save(new | {name: torch.zeros(2, 2)})).decode()
        refused = client.post(
            "/update_weights_from_tensor",
            json={"serialized_named_tensors": [bad], "weight_version": "bad"},
        )
        assert refused.status_code == 400 and refused.json()["success"] is False
        assert client.get("/get_weight_version").json()["weight_versions"] == before
        body = {"serialized_named_tensors": [entry], "weight_version": "tensor-1"}
        ok = client.post("/update_weights_from_tensor", json=body)
        assert ok.status_code == 200 and ok.json()["success"] is True, ok.text
        versions = client.get("/get_weight_version").json()["weight_versions"]
        assert versions == ["tensor-1", "tensor-1"]
        with Engine(tiny_model_v2, device="cpu") as fresh:
            want = fresh.generate(input_ids=[[5, 6], [7, 8]], sampling_params=GREEDY)
        outs = client.post(
            "/generate", json={"input_ids": [[5, 6], [7, 8]], "sampling_params": GREEDY}
        ).json()
        assert [o["output_ids"] for o in outs] == [w["output_ids"] for w in want]
        assert {o["meta_info"]["engine_index"] for o in outs} == {0, 1}
