"""The start-up proof behind deterministic mode's BLAS matmul on CPU, and the engine's choice.

``padded_linear``'s batch invariance is a property of one BLAS build, so nothing here asserts
that the proof passes on this machine: its claim is checked only where it passes, its logic
against fake BLASes that are (not) batch invariant, and the engine is checked to follow it --
padded BLAS when every weight shape passes, the fixed-tile fallback otherwise. Those engine
tests take the C kernel away (``kernels.cpu_linear``, preferred where it builds); the last test
checks that the engine prefers it.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from kernel_test_utils import tile_rows_position_invariant

import kernels
import kernels.cpu_linear as cpu_linear
import kernels.invariant_linear as invariant_linear
from engine_core import Engine
from kernels.invariant_linear import ROW_BLOCK, padded_linear, rows_invariant
from kernels.matmul import DEFAULT_TILE_M, linear_ref

THREADS = torch.get_num_threads()


def test_padded_linear_matches_f_linear():
    torch.manual_seed(1)
    w, b = torch.randn(10, 8), torch.randn(10)
    for rows in (1, 3, 4, 7):
        x = torch.randn(rows, 8)
        out = padded_linear(x, w, b)
        assert out.shape == (rows, 10)
        torch.testing.assert_close(out, F.linear(x, w, b))
        torch.testing.assert_close(padded_linear(x, w), F.linear(x, w))


@pytest.mark.parametrize(
    "k,n,dtype", [(64, 96, torch.float32), (576, 1536, torch.float32), (64, 320, torch.bfloat16)]
)
def test_padded_rows_invariant_where_the_proof_holds(k, n, dtype):
    """Where the proof passes for a shape, fresh rows and batch sizes it did not probe are
    batch invariant too (a failure here is a hole in the proof the engine relies on)."""
    if not rows_invariant(k, n, dtype, THREADS):
        pytest.skip("this BLAS fails the proof for this shape: the engine uses fixed tiles")
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(70, k, generator=gen).to(dtype)
    alone = torch.cat([padded_linear(x[i : i + 1], w) for i in range(len(x))])
    for rows in (4, 8, 10, 15, 16, 17, 40, 70):
        assert torch.equal(padded_linear(x[:rows], w), alone[:rows]), rows
    assert torch.equal(padded_linear(x[30:37], w), alone[30:37])


def _fake_blas(monkeypatch, perturbed):
    """Make ``padded_linear`` call a BLAS that nudges every row's last bits when
    ``perturbed(M)`` (so rows depend on the batch exactly for those M)."""

    def linear(x, w, b=None):
        out = F.linear(x, w, b)
        return torch.nextafter(out, out + 1) if perturbed(x.shape[0]) else out

    monkeypatch.setattr(invariant_linear, "F", types.SimpleNamespace(linear=linear))
    return rows_invariant.__wrapped__  # bypass the cache of real results


def test_proof_rejects_a_batch_dependent_blas(monkeypatch):
    assert not _fake_blas(monkeypatch, lambda m: m > 4)(16, 24, torch.float32, THREADS)
    assert not _fake_blas(monkeypatch, lambda m: m == 64)(16, 24, torch.float32, THREADS)


def test_proof_accepts_what_padding_fixes(monkeypatch):
    # a BLAS that only misbehaves for a leftover block of rows: padding never shows it one
    proof = _fake_blas(monkeypatch, lambda m: m % ROW_BLOCK != 0)
    assert proof(16, 24, torch.float32, THREADS)
    assert not _fake_blas(monkeypatch, lambda m: m % 8 != 0)(16, 24, torch.float32, THREADS)


# ---------------------------------------------------------------- the engine's choice --------

TARGET = [7, 19, 23, 5, 88, 41, 3, 17, 29, 31, 2, 64, 9]
PARTNERS = [[11 + i, 40 + 3 * i, 5] * (1 + i % 4) for i in range(6)]
GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


def _signature(engine, prompts, index):
    outs = engine.generate(
        input_ids=prompts, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0
    )
    meta = outs[index]["meta_info"]
    return (
        outs[index]["output_ids"],
        [lp for lp, _, _ in meta["output_token_logprobs"]],
        [lp for lp, _, _ in meta["input_token_logprobs"][1:]],
    )


class _Spy:
    """Counts calls to a linear and records the (K, N, dtype) shapes it saw."""

    def __init__(self, fn):
        self.fn, self.calls, self.shapes = fn, 0, set()

    def __call__(self, x, w, b=None):
        self.calls += 1
        self.shapes.add((w.shape[1], w.shape[0], x.dtype))
        return self.fn(x, w, b)


class _PackedSpy(_Spy):
    def __call__(self, x, w, b=None):
        self.calls += 1
        self.shapes.add((w.in_features, w.out_features, x.dtype))
        return self.fn(x, w, b)


@pytest.fixture
def no_c_kernel(monkeypatch):
    monkeypatch.setattr(cpu_linear, "available", lambda: False)


def _deterministic_engine(model_dir):
    return Engine(model_dir("llama"), device="cpu", deterministic=True, page_size=4)


def test_engine_choice_follows_the_proof(model_dir, monkeypatch, no_c_kernel):
    verdicts = []

    def recorded(*args):
        verdicts.append(rows_invariant(*args))
        return verdicts[-1]

    monkeypatch.setattr(invariant_linear, "rows_invariant", recorded)
    with _deterministic_engine(model_dir) as engine:
        label = engine.runner.deterministic_matmul
    assert len(verdicts) >= 2  # the proof ran (for the engine's weight shapes)
    assert label == (
        "blas (proved row-invariant at start-up)" if all(verdicts) else "fixed 16-row tiles"
    )


@pytest.mark.parametrize("failing", ["all", "lm_head"])
def test_failed_proof_falls_back_to_fixed_tiles(model_dir, monkeypatch, failing, no_c_kernel):
    vocab = 320  # tests/tiny_models.py VOCAB: the LM head is (hidden, vocab)
    verdict = (lambda k, n, d, t: False) if failing == "all" else (lambda k, n, d, t: n != vocab)
    monkeypatch.setattr(invariant_linear, "rows_invariant", verdict)

    def no_blas(*args, **kwargs):
        raise AssertionError("padded BLAS used although the proof failed")

    monkeypatch.setattr(invariant_linear, "padded_linear", no_blas)
    spy = _Spy(kernels.batch_invariant_linear)
    monkeypatch.setattr(kernels, "batch_invariant_linear", spy)
    with _deterministic_engine(model_dir) as engine:
        assert engine.runner.deterministic_matmul == "fixed 16-row tiles"
        alone = _signature(engine, [TARGET], 0)
        # the target first: its rows keep their positions inside every 16-row tile, so only
        # the batch size and the partners change -- invariant on any BLAS
        assert _signature(engine, [TARGET] + PARTNERS, 0) == alone
        assert spy.calls > 0
        # between partners its rows move inside the tiles: that also needs the BLAS to round
        # all positions of one tile alike (probed for the shapes the model used)
        if all(
            tile_rows_position_invariant(linear_ref, DEFAULT_TILE_M, k, n, dtype)
            for k, n, dtype in spy.shapes
        ):
            assert _signature(engine, PARTNERS[:3] + [TARGET] + PARTNERS[3:], 3) == alone


def test_passing_proof_uses_padded_blas(model_dir, monkeypatch, no_c_kernel):
    monkeypatch.setattr(invariant_linear, "rows_invariant", lambda *args: True)
    spy = _Spy(padded_linear)
    monkeypatch.setattr(invariant_linear, "padded_linear", spy)
    with _deterministic_engine(model_dir) as engine:
        assert engine.runner.deterministic_matmul == "blas (proved row-invariant at start-up)"
        engine.generate(input_ids=TARGET, sampling_params=GREEDY)
    assert spy.calls > 0


@pytest.mark.skipif(not cpu_linear.available(), reason="no C compiler / AVX2+FMA")
def test_the_c_kernel_is_preferred_and_needs_no_proof(model_dir, monkeypatch):
    def no_proof(*args):
        raise AssertionError("the BLAS proof ran although the C kernel is available")

    monkeypatch.setattr(invariant_linear, "rows_invariant", no_proof)
    spy = _PackedSpy(cpu_linear.packed_linear)
    monkeypatch.setattr(cpu_linear, "packed_linear", spy)
    with _deterministic_engine(model_dir) as engine:
        assert engine.runner.deterministic_matmul == "C kernel (row-invariant by construction)"
        alone = _signature(engine, [TARGET], 0)
        assert _signature(engine, PARTNERS[:3] + [TARGET] + PARTNERS[3:], 3) == alone
    assert spy.calls > 0
