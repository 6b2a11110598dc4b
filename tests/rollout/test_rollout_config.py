"""ServiceConfig validation, the YAML edge, routing policies and the progress line (no Ray)."""

from __future__ import annotations

import io
import os
import time

import pytest

from rollout.config import ServiceConfig, check_model, load_config
from rollout.policies import (
    POLICIES,
    EngineLoad,
    GroupInfo,
    RoutingPolicy,
    make_policy,
    register_policy,
)
from rollout.progress import ProgressBar, render

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


@pytest.mark.parametrize("mode", ["local", "colocated", "disaggregated"])
def test_shipped_configs_load(mode):
    cfg = load_config(os.path.join(CONFIGS, f"{mode}.yaml"))
    assert cfg.mode == mode
    assert cfg.engine_resources()


def test_yaml_unknown_field_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("mode: local\nnum_engine: 2\n")
    with pytest.raises(ValueError, match=r"num_engine=2: unknown field in .*bad.yaml"):
        load_config(str(path))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"policy": "fastest"},
            r"policy='fastest': unknown policy; known: \['cache_aware', 'least_load'",
        ),
        ({"router": {"cache_threshold": 2}}, r"router\.cache_threshold=2: must be below 1"),
        ({"router": {"hops": 1}}, r"router\.hops=1: unknown field"),
        ({"mode": "cloud"}, r"mode='cloud'"),
        ({"num_engines": 0}, r"num_engines=0"),
        ({"engine": {"page_size": 0}}, r"page_size=0"),
        ({"engine": {"tp_degree": 2}}, r"tp_degree=2: unknown engine option"),
        ({"engine": {"model_path": "x"}}, r"engine.model_path"),
        ({"placement_strategy": "RANDOM"}, r"placement_strategy='RANDOM'"),
        ({"mode": "disaggregated"}, r"engine_resource=None: .*needs engine_resource"),
        ({"mode": "colocated", "cpus_per_rank": 2.0}, r"bundle=\{'CPU': 1.0\}: .*CPU=2"),
        ({"mode": "colocated", "bundle_indices": [0, 0], "num_engines": 2}, r"bundle_indices"),
        ({"mode": "local", "address": "auto"}, r"address='auto'"),
        ({"gpus_per_rank": 0.75, "engine": {"tp_size": 2}}, r"gpus_per_rank=0.75"),
        ({"cpus_per_rank": 0.0}, r"cpus_per_rank=0.0"),
        ({"ready_timeout_s": 0}, r"ready_timeout_s=0"),
    ],
)
def test_bad_config_names_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServiceConfig(model_path="/nonexistent", **kwargs)


def test_tp_size_must_divide_heads(tiny_model):
    # The tiny llama has 4 attention heads and 2 KV heads.
    check_model(ServiceConfig(model_path=tiny_model, engine={"tp_size": 2}), tiny_model)
    check_model(ServiceConfig(model_path=tiny_model, engine={"tp_size": 4}), tiny_model)
    with pytest.raises(ValueError, match=r"tp_size=3: does not divide num_attention_heads=4"):
        check_model(ServiceConfig(model_path=tiny_model, engine={"tp_size": 3}), tiny_model)


def test_tp_size_checked_before_ray_starts(tiny_model):
    from rollout import deploy

    started = time.monotonic()
    with pytest.raises(ValueError, match=r"tp_size=3: does not divide num_attention_heads=4"):
        deploy({"model_path": tiny_model, "engine": {"tp_size": 3, "device": "cpu"}})
    assert time.monotonic() - started < 5


def test_resources_reserve_all_tp_ranks():
    cfg = ServiceConfig(
        mode="disaggregated",
        engine={"tp_size": 2},
        cpus_per_rank=1.5,
        gpus_per_rank=1.0,
        engine_resource="rollout_engine",
    )
    assert cfg.engine_resources() == {"CPU": 3.0, "GPU": 2.0, "rollout_engine": 1.0}


# ---------------------------------------------------------------------- policies
def _group(i: int, est: int = 10) -> GroupInfo:
    return GroupInfo(index=i, prompt=None, input_ids=(1, 2), n=4, est_tokens=est)


def test_round_robin_cycles_and_skips_down_engines():
    policy = make_policy("round_robin")
    all3 = [EngineLoad(i, 0, 0) for i in range(3)]
    assert [policy.choose(_group(i), all3) for i in range(4)] == [0, 1, 2, 0]
    without_2 = [all3[0], all3[1]]
    assert [policy.choose(_group(i), without_2) for i in range(3)] == [1, 0, 1]


def test_least_load_picks_fewest_outstanding_tokens():
    policy = make_policy("least_load")
    loads = [EngineLoad(0, 500, 2), EngineLoad(1, 100, 5), EngineLoad(2, 100, 1)]
    assert policy.choose(_group(0), loads) == 2
    assert policy.choose(_group(0), [EngineLoad(3, 0, 0), EngineLoad(1, 0, 0)]) == 1


def test_policy_registry_is_pluggable():
    @register_policy("always_last")
    class AlwaysLast(RoutingPolicy):
        def choose(self, group, engines):
            return max(e.index for e in engines)

    try:
        assert ServiceConfig(policy="always_last").policy == "always_last"
        assert make_policy("always_last").choose(_group(0), [EngineLoad(0, 0, 0)]) == 0
    finally:
        POLICIES.pop("always_last")
    with pytest.raises(ValueError, match="unknown"):
        make_policy("always_last")


# ---------------------------------------------------------------------- progress
SNAP = {
    "finished_samples": 16,
    "total_samples": 64,
    "completion_tokens": 512,
    "tokens_per_s": 128.0,
    "elapsed_s": 4.0,
    "resent_groups": 1,
}


def test_progress_line():
    line = render(SNAP, width=8)
    assert line.startswith("[##......] 16/64 samples  512 tok  128.0 tok/s  4.0s")
    assert "1 groups re-sent" in line


def test_progress_bar_only_on_a_tty():
    quiet = io.StringIO()
    ProgressBar(quiet).update(SNAP)  # StringIO is not a TTY
    assert quiet.getvalue() == ""
    forced = io.StringIO()
    bar = ProgressBar(forced, enabled=True)
    bar.update(SNAP)
    bar.close()
    assert forced.getvalue().startswith("\r[") and forced.getvalue().endswith("\n")
