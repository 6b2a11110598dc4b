"""EngineActor: the Engine API over Ray returns what the in-process Engine returns."""

from __future__ import annotations

import os

import pytest
import ray

from engine_core import Engine
from rollout import deploy
from rollout.engine_actor import EngineActor

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = [[5, 17, 29, 41], [7, 8, 9], [100, 3, 44, 2, 90]]


@pytest.fixture(scope="module")
def actor(ray_local, tiny_model):
    handle = EngineActor.options(num_cpus=0.5, max_restarts=0).remote(tiny_model, {"device": "cpu"})
    yield handle
    ray.kill(handle)


@pytest.fixture(scope="module")
def local_engine(tiny_model):
    with Engine(tiny_model, device="cpu") as engine:
        yield engine


def _strip(out: dict) -> dict:
    return {k: out[k] for k in ("text", "output_ids")} | {
        k: out["meta_info"][k] for k in ("finish_reason", "prompt_tokens", "completion_tokens")
    }


def test_remote_generate_matches_in_process_engine(actor, local_engine):
    single = ray.get(actor.generate.remote(input_ids=PROMPTS[0], sampling_params=GREEDY))
    batch = ray.get(actor.generate.remote(input_ids=PROMPTS, sampling_params=GREEDY))
    want = local_engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert isinstance(single, dict) and isinstance(batch, list)
    assert _strip(single) == _strip(want[0])
    assert [_strip(o) for o in batch] == [_strip(o) for o in want]


def test_remote_logprobs_and_text_prompt_match(actor, local_engine):
    kwargs = dict(prompt="the quick brown fox", sampling_params=dict(GREEDY, n=2))
    got = ray.get(actor.async_generate.remote(return_logprob=True, **kwargs))
    want = local_engine.generate(return_logprob=True, **kwargs)
    assert [_strip(o) for o in got] == [_strip(o) for o in want]
    for g, w in zip(got, want):
        lp_got = [lp for lp, _, _ in g["meta_info"]["output_token_logprobs"]]
        lp_want = [lp for lp, _, _ in w["meta_info"]["output_token_logprobs"]]
        assert lp_got == pytest.approx(lp_want, abs=1e-4)


def test_stream_chunks_end_with_the_full_output(actor):
    full = ray.get(actor.generate.remote(input_ids=PROMPTS[1], sampling_params=GREEDY))
    stream = actor.generate_stream.remote(input_ids=PROMPTS[1], sampling_params=GREEDY)
    chunks = [ray.get(ref) for ref in stream]
    assert len(chunks) > 1
    assert chunks[-1]["output_ids"] == full["output_ids"]  # cumulative chunks, as SGLang
    with pytest.raises(ValueError, match="generate_stream"):
        ray.get(actor.generate.remote(input_ids=PROMPTS[1], sampling_params=GREEDY, stream=True))


def test_bad_request_is_a_value_error_naming_the_field(actor):
    with pytest.raises(ValueError, match=r"max_new_tokens=-1"):
        ray.get(actor.generate.remote(input_ids=[1, 2], sampling_params={"max_new_tokens": -1}))
    # The engine keeps serving.
    assert ray.get(actor.health.remote())["ok"]


def test_abort_request(actor):
    long = {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True}
    ref = actor.generate.remote(input_ids=[1, 2, 3], sampling_params=long, rid="to-abort")
    # Calls from one caller start in order, and generate queues its request before it awaits,
    # so the abort always finds the request in flight.
    ray.get(actor.abort_request.remote(rid="to-abort"))
    out = ray.get(ref, timeout=60)
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["completion_tokens"] < 200


def test_server_info_and_health(actor):
    info = ray.get(actor.get_server_info.remote())
    health = ray.get(actor.health.remote())
    assert info["config"]["device"] == "cpu" and info["actor"]["pid"] == health["pid"]
    assert health["ok"] and health["weight_version"] == "default"
    assert health["node_id"] == ray.get_runtime_context().get_node_id()
    assert health["reconstructed"] is False


def test_refit_verbs_forward_to_engine(actor, local_engine):
    # A verb the engine has is forwarded (get_weights_by_name lands with the disk refit) ...
    if hasattr(Engine, "get_weights_by_name"):
        name = "model.norm.weight"
        got = ray.get(actor.get_weights_by_name.remote(name, 4))
        assert got == pytest.approx(local_engine.get_weights_by_name(name, 4))
    # ... one it does not have yet fails with a message naming it.
    verbs = ["release_memory_occupation", "pause_generation", "init_weights_update_group"]
    missing = [v for v in verbs if not hasattr(Engine, v)]
    for verb in missing:
        with pytest.raises(AttributeError, match=f"no {verb}"):
            ray.get(getattr(actor, verb).remote())


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                kids.append(int(entry))
    return kids


def test_tp_ranks_live_in_the_actors_reservation(ray_local, tiny_model, local_engine):
    config = {"model_path": tiny_model, "engine": {"device": "cpu", "tp_size": 2}}
    with deploy(dict(config, cpus_per_rank=0.5)) as service:
        # One bundle holding both ranks' CPUs, all of it taken by the actor.
        assert service.placement_group.bundle_specs == [{"CPU": 1.0}]
        actor_pid = service.health()[0]["pid"]
        # Rank 1 is a process the actor spawned (same node, same reservation), not a Ray task.
        assert _children(actor_pid)
        got = service.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    want = local_engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
