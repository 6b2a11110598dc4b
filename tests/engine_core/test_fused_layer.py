"""The one-call decoder layers (``engine_core.layers.fused_layer``,
``kernels.cpu_decoder_layer``): chosen where every op they fuse is a C kernel, taken by every
step of at most ``MAX_ROWS`` rows, and bitwise the module path on every step they take -- in
default and deterministic mode, with a qkv bias, and with narrow weight packs."""

from __future__ import annotations

import pytest
import torch

from engine_core import Engine
from engine_core.layers import fused_layer
from engine_core.layers.attention_backends import RowsMeta
from engine_core.layers.fused_layer import FusedDecoderLayers
from engine_core.layers.packed_linear import PackedLinear
from kernels import cpu_decoder_layer

pytestmark = pytest.mark.skipif(
    not cpu_decoder_layer.available(), reason="no C compiler / AVX2+FMA"
)

PROMPTS = [[5 + i for i in range(n)] for n in (3, 17, 40, 9)]
PARAMS = {"max_new_tokens": 7, "temperature": 0.0, "ignore_eos": True, "n": 2}


def _model(engine: Engine):
    return engine.ranks._transport.rank.runner.model.model


def _rollout(path: str, fused: bool, monkeypatch, prompts=PROMPTS, params=PARAMS, **config):
    """Outputs and logprobs of one rollout, and the rows of each step the one-call path ran."""
    calls = []
    real_call = FusedDecoderLayers.__call__

    def counted(self, *args):
        calls.append(args[2].shape[0])
        return real_call(self, *args)

    monkeypatch.setattr(FusedDecoderLayers, "__call__", counted)
    with Engine(path, skip_tokenizer_init=True, **config) as engine:
        if not fused:
            _model(engine).fused = None
        outs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    got = [(o["output_ids"], o["meta_info"]["output_token_logprobs"]) for o in outs]
    return got, calls


@pytest.mark.parametrize(
    "kind, config",
    [
        ("llama", {}),
        ("llama", {"deterministic": True}),
        ("qwen2", {}),  # qkv bias
        ("qwen2", {"deterministic": True}),
        ("llama", {"weight_dtype": "int8"}),
        ("llama", {"weight_dtype": "bfloat16", "deterministic": True}),
    ],
)
def test_the_one_call_layer_is_bitwise_the_modules(model_dir, monkeypatch, kind, config):
    path = model_dir(kind)
    fused, calls = _rollout(path, True, monkeypatch, **config)
    modules, none = _rollout(path, False, monkeypatch, **config)
    assert calls and not none  # the fused run took it, the other never did
    assert fused == modules
    # Every step runs C kernels in both modes: prefill steps take the one-call layer too.
    assert max(calls) > len(PROMPTS) * PARAMS["n"]  # more rows than sequences: a prefill


# 19 prompts x n=2: decode steps of 38 rows, which the C stack splits by rows (one group of
# 19 rows per thread on two cores); n=2 puts two sequences on the same prompt pages.
MANY = [[7 + (i * 5 + j) % 90 for j in range(4 + 3 * i)] for i in range(18)] + [PROMPTS[1]]
SAMPLED = {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 3, "ignore_eos": True, "n": 2}


@pytest.mark.parametrize("config", [{}, {"deterministic": True}])
def test_decode_steps_split_by_rows_are_bitwise_the_modules(model_dir, monkeypatch, config):
    path = model_dir("llama")
    fused, calls = _rollout(path, True, monkeypatch, MANY, SAMPLED, **config)
    modules, _ = _rollout(path, False, monkeypatch, MANY, SAMPLED, **config)
    assert calls.count(2 * len(MANY)) >= 3  # decode steps of 38 rows, split
    assert fused == modules


@pytest.mark.parametrize("layers", [1, 3])
def test_any_number_of_layers_lands_in_the_output(model_dir, monkeypatch, layers):
    """The C stack ping-pongs between two buffers and must end in the output for an odd
    count and a single layer too (the test models otherwise have two)."""
    path = model_dir("llama", num_hidden_layers=layers)
    fused, calls = _rollout(path, True, monkeypatch)
    modules, _ = _rollout(path, False, monkeypatch)
    assert calls and fused == modules


def test_chosen_where_every_fused_op_is_a_c_kernel(model_dir):
    with Engine(model_dir("llama"), skip_tokenizer_init=True) as engine:
        assert isinstance(_model(engine).fused, FusedDecoderLayers)
    # q/k norms sit between the kernels: Qwen3 keeps its modules.
    with Engine(model_dir("qwen3"), skip_tokenizer_init=True) as engine:
        assert _model(engine).fused is None
    assert fused_layer.choose_fused_layers(torch.nn.functional.linear, None, None, 1) is None
    assert fused_layer.choose_fused_layers(PackedLinear(), None, None, 2) is None


def _meta(rows: int) -> RowsMeta:
    i64 = torch.zeros(rows, dtype=torch.long)
    return RowsMeta(i64, i64.view(rows, 1), i64, i64)


def test_takes_the_c_kernels_steps_up_to_max_rows():
    op = FusedDecoderLayers(PackedLinear())
    x = torch.zeros(4, 8)
    assert op.takes(x, _meta(4))
    assert not op.takes(x, object())  # another backend's metadata
    assert not op.takes(x.double(), _meta(4))
    assert not op.takes(torch.zeros(8, 4).t(), _meta(4))  # not contiguous
    rows = fused_layer.MAX_ROWS
    assert op.takes(torch.zeros(rows, 8), _meta(rows))
    assert not op.takes(torch.zeros(rows + 1, 8), _meta(rows + 1))  # workspace bound


def test_the_one_call_layer_follows_refits_and_released_memory(model_dir):
    """Its per-layer structures point at packs and KV caches: a refit (new packs) and a
    release/resume (packs dropped, KV cache reallocated) must be followed, never stale."""
    old, new = model_dir("llama"), model_dir("llama", seed=1)

    def greedy(engine: Engine):
        outs = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS, return_logprob=True)
        return [(o["output_ids"], o["meta_info"]["output_token_logprobs"]) for o in outs]

    with Engine(new, skip_tokenizer_init=True) as fresh:
        expected = greedy(fresh)
    with Engine(old, skip_tokenizer_init=True) as engine:
        before = greedy(engine)  # the structures are built on the old weights
        assert engine.update_weights_from_disk(new)[0]
        assert greedy(engine) == expected != before
        engine.release_memory_occupation()
        engine.resume_memory_occupation()
        assert greedy(engine) == expected


def test_the_one_call_layers_follow_a_write_through_a_parameter(model_dir):
    """A write through a parameter outside a refit (its version moves) repacks that weight
    before the next step: the one-call path then equals the modules on the new weight."""

    def greedy(engine: Engine):
        outs = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS, return_logprob=True)
        return [(o["output_ids"], o["meta_info"]["output_token_logprobs"]) for o in outs]

    with Engine(model_dir("llama"), skip_tokenizer_init=True) as engine:
        before = greedy(engine)  # the structures are built on the old values
        with torch.no_grad():
            _model(engine).layers[1].mlp.down_proj.weight.mul_(-1.0)
        fused_after = greedy(engine)
        _model(engine).fused = None
        modules_after = greedy(engine)
    assert fused_after == modules_after != before
