"""Seeded sampling: counter-based uniforms (torch == Triton bitwise), greedy, filters, batch
invariance and sampling frequencies."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import sample_tokens, seeded_uniform
from kernels.sampling import seeded_uniform_ref

SEEDS = torch.tensor([0, 1, -1, 2**62 + 12345, -(2**63), 987654321987, 7], dtype=torch.int64)
POSITIONS = torch.tensor([0, 5, 2**40, 7, 3, 2**31 - 1, 0], dtype=torch.int64)


def _params(b, temp=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return dict(
        temperatures=torch.full((b,), temp),
        top_ks=torch.full((b,), top_k, dtype=torch.int64),
        top_ps=torch.full((b,), top_p),
        min_ps=torch.full((b,), min_p),
    )


def _sample(logits, seeds, positions, **kw):
    p = _params(logits.shape[0], **kw)
    return sample_tokens(logits, seeds=seeds, positions=positions, **p)


def test_uniform_range_and_statistics():
    u = seeded_uniform(torch.arange(500), torch.zeros(500, dtype=torch.int64), 400)
    assert u.dtype == torch.float32 and u.shape == (500, 400)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.std().item() - math.sqrt(1 / 12)) < 0.005
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005
    # neighbouring seeds / positions / shifted vocab indices are uncorrelated
    u2 = seeded_uniform(torch.arange(500), torch.ones(500, dtype=torch.int64), 400)
    for a, b in [(u[:-1], u[1:]), (u[:-1, 1:], u[1:, :-1]), (u, u2)]:
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.01


def test_uniform_depends_only_on_seed_position_index():
    full = seeded_uniform(SEEDS, POSITIONS, 97)
    for i in range(len(SEEDS)):
        assert torch.equal(seeded_uniform(SEEDS[i : i + 1], POSITIONS[i : i + 1], 97)[0], full[i])
    assert torch.equal(seeded_uniform(SEEDS, POSITIONS, 50), full[:, :50])  # prefix of vocab
    assert not torch.equal(full[0], full[6])  # seed 0 vs seed 7, same position


def test_greedy_is_argmax_lowest_id_on_ties():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    logits[2, 10] = logits[2, 30] = 100.0  # tie -> 10
    out = _sample(logits, SEEDS[:6], POSITIONS[:6], temp=0.0, top_k=5, top_p=0.5)
    assert out.dtype == torch.int64
    assert torch.equal(out, logits.argmax(-1)) and out[2] == 10


@pytest.mark.parametrize("filt", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_degenerate_filters_equal_greedy(filt):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 300, generator=gen)
    seeds, positions = torch.arange(32), torch.arange(32) * 3
    assert torch.equal(_sample(logits, seeds, positions, temp=1.3, **filt), logits.argmax(-1))


def test_same_seed_and_position_same_token_whatever_the_batch():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(12, 64, generator=gen) * 0.5  # flat: many plausible tokens
    temps = torch.tensor([1.0, 0.0, 0.7, 1.5] * 3)
    top_ks = torch.tensor([0, 5, 10, 64, 3, 0, 0, 1, 20, 0, 8, 0])
    top_ps = torch.tensor([1.0, 0.9, 0.5, 1.0, 1.0, 0.3, 0.95, 1.0, 0.8, 1.0, 1.0, 0.6])
    min_ps = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.05, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0, 0.0])
    seeds = torch.arange(12) * 1000 + 3
    positions = torch.arange(12) + 40
    cols = (temps, top_ks, top_ps, min_ps, seeds, positions)
    full = sample_tokens(logits, *cols)
    assert len(set(full.tolist())) > 3  # actually random
    for idx in ([5], [11, 0], [3, 7, 1, 9], list(range(11, -1, -1))):
        sel = torch.tensor(idx)
        assert torch.equal(sample_tokens(logits[sel], *(c[sel] for c in cols)), full[sel])
    # a different position or seed changes the stream
    moved = sample_tokens(logits, temps, top_ks, top_ps, min_ps, seeds, positions + 1)
    assert not torch.equal(moved, full)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a filtered token"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize(
    "filt,expect_kept",
    [
        (dict(), [0, 1, 2, 3, 4, 5]),
        (dict(top_k=3), [0, 1, 2]),
        (dict(top_p=0.7), [0, 1, 2]),  # probs ~ .39 .25 .17 .12: mass .65 < .7 before 2
        (dict(min_p=0.4), [0, 1, 2]),
        (dict(top_k=4, top_p=0.8, min_p=0.3), [0, 1, 2]),
    ],
)
def test_sampling_frequencies_follow_filtered_distribution(filt, expect_kept):
    logits = torch.tensor([2.0, 1.6, 1.25, 0.9, 0.2, -1.0])
    temp = 0.9
    n = 6000
    out = _sample(
        logits.expand(n, -1).contiguous(),
        torch.arange(n) * 7919 + 11,
        torch.full((n,), 123),
        temp=temp,
        **filt,
    )
    probs = torch.softmax(logits.double() / temp, -1)
    mask = torch.zeros(6, dtype=torch.bool)
    mask[expect_kept] = True
    probs = torch.where(mask, probs, 0.0)
    probs /= probs.sum()
    counts = torch.bincount(out, minlength=6).double()
    # chi-square, df <= 5: p = 0.001 critical value 20.5
    assert _chi_square(counts, probs) < 20.5, (counts, probs * n)


def test_positions_give_independent_draws_for_one_seed():
    logits = torch.zeros(2000, 2)  # fair coin
    out = _sample(logits, torch.full((2000,), 42), torch.arange(2000))
    assert abs(out.double().mean().item() - 0.5) < 0.05
    # no lag-1 correlation along positions
    assert abs(torch.corrcoef(torch.stack([out[:-1], out[1:]]).double())[0, 1]) < 0.08


triton = pytest.importorskip("triton")
from kernels.sampling import seeded_uniform_triton  # noqa: E402


@pytest.mark.parametrize("vocab,block", [(300, 128), (64, 64), (5, 16)])
def test_triton_uniform_bitwise_equal_to_torch(vocab, block):
    ref = seeded_uniform_ref(SEEDS, POSITIONS, vocab)
    out = seeded_uniform_triton(SEEDS, POSITIONS, vocab, block=block)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
