"""SGLang's refit results (``entrypoints/engine.py`` -> ``tokenizer_control_mixin`` ->
``model_runner``): ``(success, message)`` tuples (disk: ``+ num_paused_requests``) with SGLang's
messages; a failure is ``(False, message)`` with weights and version unchanged;
``refit_errors="raise"`` raises the typed error instead."""

from __future__ import annotations

import pytest

from engine_core import Engine, InvalidConfigError, InvalidRequestError, ModelLoadError

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
IDS = [5, 9, 13, 2, 7]


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(tiny_model, device="cpu", max_total_tokens=256) as eng:
        yield eng


def state(engine: Engine) -> tuple:
    """What a failed refit must leave as it was: weights, version, outputs."""
    out = engine.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"]
    return engine.get_weights_checksum(), engine.weight_version, out


def test_disk_refit_success_tuple(tiny_model, tiny_model_v2):
    with Engine(tiny_model, device="cpu", max_total_tokens=256) as e:
        assert e.update_weights_from_disk(tiny_model_v2) == (
            True,
            "Succeeded to update model weights.",
            0,
        )


def test_failures_are_false_tuples_with_weights_unchanged(engine, tmp_path):
    before = state(engine)
    calls = [
        (engine.update_weights_from_disk, (str(tmp_path / "missing"),), "ModelLoadError"),
        (engine.update_weights_from_tensor, ([("model.norm.weight", 1.0)],), "ModelLoadError"),
        (engine.update_weights_from_tensor, (42,), "TypeError"),
        (engine.init_weights_update_group, ("127.0.0.1", 1, 5, 2, "g"), "ValueError"),
        # rank 0 is the trainer (the sender): an engine there would "receive" its own memory
        (
            engine.init_weights_update_group,
            ("127.0.0.1", 1, 0, 1, "g"),
            "ValueError: invalid rank_offset=0",
        ),
        (
            engine.init_weights_update_group,
            ("127.0.0.1", 1, "1", 2, "g"),
            "ValueError: invalid rank_offset='1'",
        ),
        (
            engine.init_weights_update_group,
            ("127.0.0.1", 1, 1, 2, 5),
            "ValueError: invalid group_name=5",
        ),
        (
            engine.init_weights_update_group,
            ("127.0.0.1", 1, 1, 2, "g", "gloo", float("inf")),
            "ValueError: invalid timeout_s=inf",
        ),
        (
            engine.init_weights_update_group,
            ("127.0.0.1", 1, 1, 2, "g", "gloo", 1e30),
            "ValueError: invalid timeout_s=1e+30",
        ),
        (
            engine.update_weights_from_distributed,
            (["model.norm.weight"], ["float32"], [[4], [4]]),
            "ValueError",
        ),
        (  # SGLang's positional order (load_format sixth); a flattened bucket has one dtype
            engine.update_weights_from_distributed,
            (["a", "b"], ["float32", "bfloat16"], [[4], [4]], "g", True, "flattened_bucket"),
            "ModelLoadError",
        ),
        (  # a group never joined
            engine.update_weights_from_distributed,
            (["model.norm.weight"], ["float32"], [[64]], "never-joined"),
            "ValueError: no weight-update group 'never-joined'",
        ),
    ]
    for verb, args, error in calls:
        result = verb(*args)
        assert result[0] is False and result[1].startswith(error), (verb.__name__, result)
        assert state(engine) == before, verb.__name__
    assert engine.destroy_weights_update_group("never-made") == (
        False,
        "The group to be destroyed does not exist.",
    )


def test_refit_errors_raise(tiny_model, tmp_path):
    with Engine(tiny_model, device="cpu", max_total_tokens=256, refit_errors="raise") as e:
        with pytest.raises(ModelLoadError):
            e.update_weights_from_disk(str(tmp_path / "missing"))
        with pytest.raises(ValueError, match="rank_offset=5"):
            e.init_weights_update_group("127.0.0.1", 1, 5, 2, "g")
        assert e.weight_version == "default"
    with pytest.raises(InvalidConfigError, match="refit_errors='ignore'"):
        Engine(tiny_model, device="cpu", refit_errors="ignore")


def test_flags_and_labels_take_their_sglang_types(engine, tiny_model_v2):
    """``commit="no"`` is truthy and an int label would become "7" by ``str``: both refused,
    nothing written; the same for the bool flags of the request-control verbs."""
    import torch

    name = "model.norm.weight"
    tensor = torch.tensor(engine.get_weights_by_name(name, 10**6))
    before = state(engine)
    for kwargs, error in [
        (dict(commit="no"), "ValueError: invalid commit='no'"),
        (dict(weight_version=7), "ValueError: invalid weight_version=7"),
        (dict(weight_version=""), "ValueError: invalid weight_version=''"),
    ]:
        ok, message = engine.update_weights_from_tensor([(name, tensor)], **kwargs)
        assert not ok and message.startswith(error), message
    ok, message, _ = engine.update_weights_from_disk(tiny_model_v2, weight_version=["v"])
    assert not ok and "invalid weight_version=['v']" in message
    assert state(engine) == before
    with pytest.raises(InvalidRequestError, match="abort_all='no'"):
        engine.abort_request(abort_all="no")
    with pytest.raises(InvalidRequestError, match="abort_all_requests='false'"):
        engine.update_weight_version("v9", abort_all_requests="false")
    assert engine.weight_version == before[1]
