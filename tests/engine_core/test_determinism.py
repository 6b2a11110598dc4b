"""Deterministic mode: a request's tokens and logprobs are bitwise identical whatever else runs.

Each invariance claim is its own test. Comparisons are exact (``==`` on Python floats from the
same float32 values, i.e. bitwise), never approximate.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from engine_core import Engine
from engine_core.model_config import load_model_config
from kernels import cpu_attention, cpu_fused, cpu_linear

TARGET = [7, 19, 23, 5, 88, 41, 3, 17, 29, 31, 2, 64, 9]
GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
SEEDED = {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True, "sampling_seed": 99}


def others(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(1, 40))] for _ in range(count)]


def signature(out: dict) -> tuple:
    meta = out["meta_info"]
    return (
        tuple(out["output_ids"]),
        tuple(lp for lp, _, _ in meta["output_token_logprobs"]),
        tuple(lp for lp, _, _ in meta["input_token_logprobs"][1:]),
    )


def run_batch(engine: Engine, prompts: list, params: dict, index: int) -> tuple:
    outs = engine.generate(
        input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=0
    )
    return signature(outs[index])


@pytest.fixture(scope="module")
def path(model_dir):
    return model_dir("llama")


@pytest.fixture(scope="module")
def engine(path):
    with Engine(path, device="cpu", deterministic=True, page_size=4) as eng:
        yield eng


@pytest.fixture(scope="module")
def alone(engine):
    return {
        name: run_batch(engine, [TARGET], params, 0)
        for name, params in (("greedy", GREEDY), ("seeded", SEEDED))
    }


@pytest.mark.parametrize("params_name", ["greedy", "seeded"])
@pytest.mark.parametrize("partners", [1, 7, 64])
def test_invariant_to_batch_partners(engine, alone, params_name, partners):
    params = GREEDY if params_name == "greedy" else SEEDED
    batch = others(partners, seed=partners)
    position = partners // 2
    prompts = batch[:position] + [TARGET] + batch[position:]
    assert run_batch(engine, prompts, params, position) == alone[params_name]


@pytest.mark.parametrize("budget", [1, 3, 8, 2048])
def test_invariant_to_chunked_prefill_budget(path, alone, budget):
    with Engine(
        path, device="cpu", deterministic=True, page_size=4, max_num_batched_tokens=budget
    ) as eng:
        prompts = others(5, seed=budget) + [TARGET]
        assert run_batch(eng, prompts, GREEDY, 5) == alone["greedy"]


def test_invariant_to_cached_prefix_recompute(path, alone):
    # A tiny KV budget forces retraction: the request's KV is dropped and recomputed in other
    # batches, and decode then reads a prefix computed by a different forward.
    with Engine(path, device="cpu", deterministic=True, page_size=4, max_total_tokens=96) as eng:
        prompts = others(6, seed=5) + [TARGET]
        got = run_batch(eng, prompts, GREEDY, 6)
        assert eng.get_server_info()["num_retractions"] > 0
    assert got == alone["greedy"]


def test_invariant_to_arrival_order(engine, alone):
    batch = others(9, seed=3) + [TARGET]
    for seed in range(3):
        order = list(range(len(batch)))
        random.Random(seed).shuffle(order)
        prompts = [batch[i] for i in order]
        assert run_batch(engine, prompts, SEEDED, order.index(9)) == alone["seeded"]


def test_invariant_across_runs_and_engines(path, engine, alone):
    assert run_batch(engine, [TARGET], GREEDY, 0) == alone["greedy"]
    with Engine(path, device="cpu", deterministic=True, page_size=4) as other:
        assert run_batch(other, [TARGET], SEEDED, 0) == alone["seeded"]


# ---- prefix cache: a hit, a partial hit and a full-prompt hit equal a miss, bit for bit ----
SHARED = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
QUESTION = SHARED + [40, 41, 42, 43, 44, 45]
# Input logprobs are reported from position 21 on, so the cache may serve up to 20 tokens.
CACHED_KW = {"return_logprob": True, "logprob_start_len": 21}


def cached_run(engine: Engine, prompts: list, params: dict) -> list[tuple]:
    outs = engine.generate(input_ids=prompts, sampling_params=params, **CACHED_KW)
    outs = outs if isinstance(outs, list) else [outs]
    return [(signature(o), o["meta_info"]["cached_tokens"]) for o in outs]


@pytest.fixture(scope="module")
def uncached(path):
    with Engine(
        path, device="cpu", deterministic=True, page_size=4, enable_prefix_cache=False
    ) as e:
        return {
            name: cached_run(e, [QUESTION], params)[0][0]
            for name, params in (("greedy", GREEDY), ("seeded", SEEDED))
        }


@pytest.mark.parametrize("params_name", ["greedy", "seeded"])
@pytest.mark.parametrize(
    ("warm", "hit"),
    [
        ([], 0),  # miss
        ([SHARED + [90, 91, 92, 93]], 20),  # another question on the same system prompt
        # partial hit: 2 shared pages, and the third page's first token by copy-on-write
        ([SHARED[:9] + [99] * 11], 9),
        ([QUESTION], 20),  # the same prompt again: capped by the logprob rows still needed
    ],
)
def test_prefix_cache_hit_equals_miss(path, uncached, params_name, warm, hit):
    params = GREEDY if params_name == "greedy" else SEEDED
    with Engine(path, device="cpu", deterministic=True, page_size=4) as eng:
        if warm:
            cached_run(eng, warm, GREEDY)
        ((got, cached_tokens),) = cached_run(eng, [QUESTION] + others(3, seed=hit), params)[:1]
    assert cached_tokens == hit
    assert got == uncached[params_name]


def test_prefix_cache_samples_of_one_prompt_equal_uncached(path):
    params = dict(SEEDED, n=4)
    runs = []
    for enabled in (False, True):
        with Engine(
            path, device="cpu", deterministic=True, page_size=4, enable_prefix_cache=enabled
        ) as eng:
            runs.append(cached_run(eng, [QUESTION], params))
            prefill = eng.get_server_info()["prefill_tokens"]
    (off, on) = runs
    assert [sig for sig, _ in on] == [sig for sig, _ in off]
    assert [hit for _, hit in off] == [0] * 4
    assert [hit for _, hit in on] == [0, 20, 20, 20]  # the first computes, three reuse it
    assert prefill == len(QUESTION) + 3 * (len(QUESTION) - 20)


def test_prefix_cache_page_aligned_samples_compute_one_token_each(path):
    """A page-aligned prompt's samples reuse all of it but the last token (its page by copy),
    bit for bit equal to the uncached engine."""
    prompt = QUESTION[:24]  # 6 pages of 4
    params = dict(SEEDED, n=4)
    runs, computed = [], []
    for enabled in (False, True):
        with Engine(
            path, device="cpu", deterministic=True, page_size=4, enable_prefix_cache=enabled
        ) as eng:
            outs = eng.generate(input_ids=[prompt], sampling_params=params, return_logprob=True)
            runs.append([signature(o)[:2] for o in outs])
            hits = [o["meta_info"]["cached_tokens"] for o in outs]
            computed.append(eng.get_server_info()["prefill_tokens"])
    assert runs[0] == runs[1]
    assert hits == [0, 23, 23, 23]
    assert computed == [4 * 24, 24 + 3]


def _batch_pair(path: str, **config) -> tuple[tuple, tuple]:
    """TARGET's greedy signature alone, then beside partners whose prefill makes a big step."""
    with Engine(path, device="cpu", page_size=4, **config) as eng:
        lone = run_batch(eng, [TARGET], GREEDY, 0)
        partners = [p * 4 for p in others(7, seed=7)]
        return lone, run_batch(eng, partners + [TARGET], GREEDY, 7)


def _without_c_kernels(monkeypatch) -> None:
    """A machine where the C kernels cannot be built (no compiler, no AVX2/FMA): the engine
    falls back to torch's matmul (MKL), SDPA and the torch elementwise formulas."""
    for module in (cpu_linear, cpu_attention, cpu_fused):
        monkeypatch.setattr(module, "available", lambda: False)


@pytest.mark.skipif(
    not (cpu_linear.available() and cpu_attention.available()),
    reason="no C compiler / AVX2+FMA: default mode runs the torch fallback",
)
def test_default_mode_on_the_c_kernels_is_batch_invariant(model_dir):
    """On CPU in fp32 every op of default mode is a C kernel with a fixed per-row order (the
    packed linear at every row count, the attention kernel for every row), so default mode
    is batch invariant there too."""
    lone, batched = _batch_pair(model_dir("llama", intermediate_size=384))
    assert lone == batched


def test_default_mode_without_the_c_kernels_is_not_batch_invariant(model_dir, monkeypatch):
    """Negative control: on the torch fallback, batching changes the logprob bits (MKL
    blocks a big batch's rows differently from a lone row for the wider MLP's K; SDPA's
    prefill differs from its decode), which the comparisons above would catch."""
    _without_c_kernels(monkeypatch)
    path = model_dir("llama", intermediate_size=384)
    lone, batched = _batch_pair(path)
    assert lone[0] == batched[0]  # the same greedy tokens ...
    if lone[1:] == batched[1:] and not blas_batch_dependent(load_model_config(path)):
        pytest.skip("this machine's BLAS is batch invariant for the model's shapes")
    assert lone[1:] != batched[1:]  # ... but not the same logprob bits


def blas_batch_dependent(mc) -> bool:
    """Whether ``F.linear`` gives a row other bits alone than inside a batch for some weight
    shape of the model (BLAS kernels differ by CPU: on some, nothing here may differ)."""
    qkv = (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim
    shapes = [
        (mc.hidden_size, qkv),
        (mc.q_size, mc.hidden_size),
        (mc.hidden_size, 2 * mc.intermediate_size),
        (mc.intermediate_size, mc.hidden_size),
        (mc.hidden_size, mc.vocab_size),
    ]
    gen = torch.Generator().manual_seed(0)
    for k, n in shapes:
        w, x = torch.randn(n, k, generator=gen), torch.randn(300, k, generator=gen)
        for m in (2, 3, 5, 8, 13, 40, 300):
            batch = F.linear(x[:m], w)
            if any(not torch.equal(F.linear(x[i : i + 1], w)[0], batch[i]) for i in range(m)):
                return True
    return False
