"""``update_weights_from_tensor`` with the payloads verl and slime send ``sglang.Engine``.

The serializer here does what SGLang's ``MultiprocessingSerializer.serialize`` does
(``python/sglang/srt/utils``): a ``ForkingPickler`` dump with torch's reductions, base64 text
when ``output_str``; one payload per TP rank. Flattened buckets follow
``srt/weight_sync/tensor_bucket.py``: every tensor flattened and concatenated, plus a list of
``FlattenedTensorMetadata(name, shape, dtype, start_idx, end_idx, numel)`` -- defined here under
SGLang's module name, so the pickle names the class exactly as SGLang's does."""

from __future__ import annotations

import base64
import io
import os
import pickle
import sys
import types
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's reductions, as SGLang's import does)
from safetensors.torch import load_file

from engine_core import Engine, ModelLoadError

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4], [9, 8, 7, 6, 5]]
BUCKET_MODULE = "sglang.srt.weight_sync.tensor_bucket"


@dataclass
class FlattenedTensorMetadata:
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


@pytest.fixture
def sglang_bucket_module(monkeypatch):
    """Pickle ``FlattenedTensorMetadata`` under SGLang's module path (sglang is not installed)."""
    module = types.ModuleType(BUCKET_MODULE)
    module.FlattenedTensorMetadata = FlattenedTensorMetadata
    for name in ("sglang", "sglang.srt", "sglang.srt.weight_sync"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, BUCKET_MODULE, module)
    monkeypatch.setattr(FlattenedTensorMetadata, "__module__", BUCKET_MODULE)


def serialize(obj, output_str: bool = False):
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    data = buf.getvalue()
    return base64.b64encode(data).decode("utf-8") if output_str else data


def flattened_bucket(pairs) -> dict:
    metadata, flats, start = [], [], 0
    for name, tensor in pairs:
        flat = tensor.flatten()
        metadata.append(
            FlattenedTensorMetadata(
                name, tensor.shape, tensor.dtype, start, start + flat.numel(), flat.numel()
            )
        )
        flats.append(flat)
        start += flat.numel()
    return {"flattened_tensor": torch.cat(flats), "metadata": metadata}


def tensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def run(engine: Engine) -> list:
    # Drop the prefix cache: in default mode a cache hit changes the last bits of logprobs
    # (another batch computed the shared KV); these tests compare weights through outputs.
    engine.flush_cache()
    return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


@pytest.fixture(scope="module")
def qwen2(model_dir):
    """Qwen2 (q/k/v biases: fused weights and biases) and the outputs of its new weights."""
    old, new = model_dir("qwen2"), model_dir("qwen2", seed=1)
    with Engine(new, device="cpu") as fresh:
        return old, new, run(fresh)


def test_serialized_pairs_per_rank_load(qwen2):
    old, new, expected = qwen2
    with Engine(old, device="cpu") as engine:
        before = run(engine)
        payloads = [serialize(list(tensors(new).items()))]  # tp_size 1: one payload
        assert engine.update_weights_from_tensor(payloads) == (True, "Success")
        assert run(engine) == expected != before


@pytest.mark.parametrize("tp_size", [1, 2])
def test_flattened_bucket_base64_payload_per_rank(qwen2, sglang_bucket_module, tp_size):
    old, new, expected = qwen2
    with Engine(old, device="cpu", tp_size=tp_size) as engine:
        bucket = flattened_bucket(list(tensors(new).items()))
        payloads = [serialize(bucket, output_str=True) for _ in range(tp_size)]
        ok, message = engine.update_weights_from_tensor(
            payloads, load_format="flattened_bucket", flush_cache=False, weight_version="b1"
        )
        assert (ok, message) == (True, "Success Weight version updated to b1.")
        assert run(engine) == expected and engine.weight_version == "b1"


def fused(named: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """SGLang's internal names: q/k/v -> qkv_proj, gate/up -> gate_up_proj (HF order, dim 0)."""
    out, done = [], set()
    for name in named:
        for parts, fused_name in (
            (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
            (("gate_proj", "up_proj"), "gate_up_proj"),
        ):
            hit = next((p for p in parts if f".{p}." in name), None)
            if hit is None:
                continue
            target = name.replace(hit, fused_name)
            if target not in done:
                done.add(target)
                out.append((target, torch.cat([named[name.replace(hit, p)] for p in parts])))
            break
        else:
            out.append((name, named[name]))
    return out


def test_direct_load_with_fused_names(qwen2):
    old, new, expected = qwen2
    pairs = fused(tensors(new))
    assert any(n.endswith("qkv_proj.bias") for n, _ in pairs)
    with Engine(old, device="cpu") as engine:
        assert engine.update_weights_from_tensor(pairs, load_format="direct")[0] is True
        assert run(engine) == expected


def test_bad_payloads_fail_with_weights_unchanged(qwen2, sglang_bucket_module):
    old, new, _ = qwen2
    named = tensors(new)
    with Engine(old, device="cpu") as engine:
        before, sums = run(engine), engine.get_weights_checksum()
        qkv = next(t for n, t in fused(named) if n.endswith("layers.0.self_attn.qkv_proj.weight"))
        cases = [
            # a fused tensor with a row missing
            ([("model.layers.0.self_attn.qkv_proj.weight", qkv[:-1])], "direct", "fused weight"),
            # one payload per TP rank: tp_size 1 takes exactly one
            ([serialize(list(named.items()))] * 2, None, "one per TP rank"),
            # a pickle naming anything but a weight payload's classes is refused, not run
            ([pickle.dumps(os.system)], None, "not a weight payload"),
            (["not base64!"], None, "base64"),
            ([serialize({"flattened_tensor": torch.zeros(3)})], "flattened_bucket", "expected"),
        ]
        for payload, load_format, text in cases:
            ok, message = engine.update_weights_from_tensor(payload, load_format=load_format)
            assert not ok and message.startswith("ModelLoadError") and text in message, message
        assert engine.get_weights_checksum() == sums and run(engine) == before
        assert engine.weight_version == "default"


def test_refit_errors_raise_opt_in(qwen2):
    old, new, _ = qwen2
    with Engine(old, device="cpu", refit_errors="raise") as engine:
        with pytest.raises(ModelLoadError, match="fused weight"):
            engine.update_weights_from_tensor(
                [("model.layers.0.mlp.gate_up_proj.weight", torch.zeros(3, 3))], "direct"
            )
        assert engine.weight_version == "default"


@dataclass
class LocalSerializedTensor:
    """verl's wrapper (SGLang's ``LocalSerializedTensor``): one serialized tensor per TP rank."""

    values: list


def test_local_serialized_tensors_per_rank(qwen2):
    old, new, expected = qwen2
    with Engine(old, device="cpu", tp_size=2) as engine:
        named = [
            (name, LocalSerializedTensor([serialize(t), serialize(t, output_str=True)]))
            for name, t in tensors(new).items()
        ]
        assert engine.update_weights_from_tensor(named) == (True, "Success")
        assert run(engine) == expected
        ok, message = engine.update_weights_from_tensor(
            [(named[0][0], LocalSerializedTensor([b"x"]))]
        )
        assert not ok and "one per TP rank (2)" in message
