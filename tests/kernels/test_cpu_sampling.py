"""The C token choice (``kernels/cpu_sampling.py``) against the torch formulation
(``kernels/sampling.py``): the same uniforms bit for bit, torch.argmax exactly, and sampled
tokens that differ only where float rounding decides; rows are batch invariant and the
samples follow softmax(logits / T) restricted by top-k, top-p and min-p."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import cpu_sampling, sample_tokens
from kernels.sampling import _sample_torch, seeded_uniform_ref

pytestmark = pytest.mark.skipif(not cpu_sampling.available(), reason="C kernel not built here")

SEEDS = torch.tensor([0, 1, -5, 2**62, -(2**63), 2**63 - 1], dtype=torch.int64)
POSITIONS = torch.tensor([0, 7, 2**40, -3, 5, 2**33 + 1], dtype=torch.int64)


@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 1000, 49157])
def test_uniforms_are_the_reference_bits(vocab):
    got = cpu_sampling.seeded_uniform(SEEDS, POSITIONS, vocab)
    assert torch.equal(got, seeded_uniform_ref(SEEDS, POSITIONS, vocab))


SPECIAL = st.sampled_from([0.0, -0.0, 1.0, 1.0, -1.0, 3.5, math.inf, -math.inf, math.nan])
VALUES = st.one_of(SPECIAL, st.floats(width=32, allow_nan=False, allow_infinity=False))


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.lists(VALUES, min_size=1, max_size=40), min_size=1, max_size=4))
def test_argmax_is_torch_argmax(rows):
    width = min(len(r) for r in rows)
    logits = torch.tensor([r[:width] for r in rows], dtype=torch.float32)
    assert torch.equal(cpu_sampling.argmax_rows(logits), logits.argmax(-1))


@pytest.mark.parametrize("vocab", [13, 64, 1003])
def test_argmax_ties_go_to_the_lowest_index(vocab):
    logits = torch.randn(4, vocab)
    logits[0] = 1.0  # all equal
    logits[1, [3, 3 + 8, vocab - 1]] = 50.0  # the same lane, and the tail
    logits[2, [vocab - 1, 5]] = 50.0
    logits[3, [2, 6]] = math.nan  # the first NaN
    assert cpu_sampling.argmax_rows(logits).tolist() == [0, 3, 5, 2]
    assert torch.equal(cpu_sampling.argmax_rows(logits), logits.argmax(-1))


def _plain(logits, temps, min_ps, seeds, positions) -> torch.Tensor:
    """sample_rows with top-k and top-p off."""
    rows = logits.shape[0]
    off_k, off_p = torch.full((rows,), -1), torch.ones(rows)
    return cpu_sampling.sample_rows(logits, temps, off_k, off_p, min_ps, seeds, positions)


def _reference_gap(logits, temps, min_ps, seeds, positions) -> torch.Tensor:
    """Per row, the float64 gap between the best and second-best kept perturbed scores."""
    u = seeded_uniform_ref(seeds, positions, logits.shape[1]).double()
    z = logits.double() / temps.double()[:, None]
    logp = torch.log_softmax(z, dim=-1)
    probs = logp.exp()
    kept = probs >= min_ps.double()[:, None] * probs.amax(-1, keepdim=True)
    score = (logp - torch.log(-torch.log(u))).masked_fill(~kept, -math.inf)
    top2 = score.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def _batch(rows: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 4
    temps = torch.rand(rows, generator=g) * 2 + 0.05
    min_ps = torch.where(
        torch.rand(rows, generator=g) < 0.5, torch.rand(rows, generator=g) * 0.3, 0
    )
    seeds = torch.randint(-(2**62), 2**62, (rows,), generator=g)
    positions = torch.randint(0, 10_000, (rows,), generator=g)
    return logits, temps, min_ps, seeds, positions


@pytest.mark.parametrize("vocab", [3, 8, 1001, 32003])
def test_sampled_tokens_match_the_torch_formulation(vocab):
    logits, temps, min_ps, seeds, positions = _batch(256, vocab, vocab)
    off_k, off_p = torch.full((256,), -1), torch.ones(256)
    want = _sample_torch(logits, temps, off_k, off_p, min_ps, seeds, positions)
    got = _plain(logits, temps, min_ps, seeds, positions)
    differ = (got != want).nonzero().squeeze(1)
    gaps = _reference_gap(logits, temps, min_ps, seeds, positions)
    # exp/log a few ulp apart can only reorder scores that tie to rounding
    assert all(gaps[r] < 1e-4 for r in differ.tolist()), (differ, gaps[differ])
    assert len(differ) <= 2


def test_rows_are_batch_invariant():
    logits, temps, min_ps, seeds, positions = _batch(24, 5003, 1)
    temps[::4] = 0.0  # greedy rows among sampled ones
    top_ks = torch.tensor([-1, 7, -1, 300] * 6)
    top_ps = torch.tensor([1.0, 1.0, 0.8, 0.95] * 6)
    cols = (temps, top_ks, top_ps, min_ps, seeds, positions)
    batch = cpu_sampling.sample_rows(logits, *cols)
    for r in range(24):
        alone = cpu_sampling.sample_rows(logits[r : r + 1], *(c[r : r + 1] for c in cols))
        assert alone.item() == batch[r].item()
    assert torch.equal(batch[::4], logits[::4].argmax(-1))


def test_samples_follow_the_softmax():
    """40 000 positions of one row: each token's frequency within 5 sigma of its probability."""
    n, temperature = 40_000, 0.8
    row = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -3.0])
    logits = row.repeat(n, 1).contiguous()
    tokens = _plain(
        logits, torch.full((n,), temperature), torch.zeros(n), torch.full((n,), 42),
        torch.arange(n),
    )  # fmt: skip
    probs = torch.softmax(row.double() / temperature, -1)
    freq = torch.bincount(tokens, minlength=6).double() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-12).all(), (freq, probs)


def test_min_p_keeps_only_likely_tokens():
    n, min_p = 20_000, 0.3
    row = torch.tensor([2.0, 1.5, 0.9, 0.1, -1.0, 1.9])
    probs = torch.softmax(row.double(), -1)
    allowed = set((probs >= min_p * probs.max()).nonzero().squeeze(1).tolist())
    tokens = _plain(
        row.repeat(n, 1).contiguous(), torch.ones(n), torch.full((n,), min_p),
        torch.full((n,), 7), torch.arange(n),
    )  # fmt: skip
    assert set(tokens.tolist()) == allowed  # every allowed token drawn, no other


def test_special_values_give_an_index_in_range():
    vocab = 37
    logits = torch.randn(5, vocab)
    logits[0, :30] = -math.inf  # banned tokens are never drawn
    logits[1, 4] = math.nan
    logits[2, 9] = math.inf
    logits[3] = -math.inf
    ones = torch.ones(5)
    for k, p in ((-1, 1.0), (3, 1.0), (-1, 0.9)):
        ks, ps = torch.full((5,), k), torch.full((5,), p)
        tokens = cpu_sampling.sample_rows(
            logits, ones, ks, ps, torch.zeros(5), torch.arange(5), ones.long()
        )
        assert all(0 <= t < vocab for t in tokens.tolist())
        assert tokens[0] >= 30


def _kept_with_slack(row, temperature, k, p, min_p, slack=1e-5) -> set[int]:
    """Tokens the float64 formulation keeps, counting a top-p boundary within ``slack``."""
    probs = torch.softmax(row.double() / temperature, -1)
    order = torch.argsort(-probs, stable=True)  # descending, ties to the lower id
    if 0 < k < len(probs):
        order = order[:k]
    sorted_probs = probs[order]
    before = (sorted_probs.cumsum(0) - sorted_probs) / sorted_probs.sum()
    if p < 1.0:
        keep = before < p + slack
        keep[0] = True
        order = order[keep]
    kept = order[probs[order] >= min_p * probs.max() * (1 - slack)] if min_p > 0 else order
    return set(kept.tolist())


@pytest.mark.parametrize("vocab", [5, 64, 1001, 32003])
def test_top_k_top_p_tokens_match_the_torch_formulation(vocab):
    logits, temps, min_ps, seeds, positions = _batch(128, vocab, 7 + vocab)
    g = torch.Generator().manual_seed(vocab)
    top_ks = torch.where(torch.rand(128, generator=g) < 0.5, torch.randint(1, 60, (128,)), -1)
    top_ps = torch.where(torch.rand(128, generator=g) < 0.6, torch.rand(128, generator=g), 1.0)
    cols = (temps, top_ks, top_ps, min_ps, seeds, positions)
    got = cpu_sampling.sample_rows(logits, *cols)
    want = _sample_torch(logits, *cols)
    for r in range(128):  # every token is one the formulation keeps
        args = (temps[r].item(), top_ks[r].item(), top_ps[r].item(), min_ps[r].item())
        assert got[r].item() in _kept_with_slack(logits[r], *args), r
    assert (got != want).sum() <= 2  # only where float rounding decides


ROW = torch.tensor([2.0, 1.2, 0.3, -0.5, -1.0, 1.9])
# ROW's probabilities: 0.375, 0.168, 0.068, 0.031, 0.019, 0.339 -> rank order 0, 5, 1, 2, 3, 4;
# (3, 0.8) keeps two only because top-p renormalizes over top-k's mass (0.714 / 0.882)
NUCLEI = [(3, 1.0, [0, 1, 5]), (-1, 0.6, [0, 5]), (4, 0.85, [0, 1, 5]), (3, 0.8, [0, 5])]


@pytest.mark.parametrize("k, p, kept", NUCLEI)
def test_top_k_and_top_p_follow_the_renormalized_softmax(k, p, kept):
    """20 000 positions of one row: only the kept tokens, each at its renormalized probability."""
    n = 20_000
    row = ROW
    tokens = cpu_sampling.sample_rows(
        row.repeat(n, 1).contiguous(), torch.ones(n), torch.full((n,), k), torch.full((n,), p),
        torch.zeros(n), torch.full((n,), 11), torch.arange(n),
    )  # fmt: skip
    probs = torch.softmax(row.double(), -1)
    target = torch.zeros(6, dtype=torch.float64)
    target[kept] = probs[kept] / probs[kept].sum()
    freq = torch.bincount(tokens, minlength=6).double() / n
    sigma = (target * (1 - target) / n).sqrt()
    assert ((freq - target).abs() <= 5 * sigma + 1e-12).all(), (freq, target)


def test_sample_tokens_on_cpu_is_the_c_kernel():
    logits, temps, min_ps, seeds, positions = _batch(12, 2001, 3)
    top_ks = torch.tensor([-1, 5, -1, 2001, 40, -1] * 2)
    top_ps = torch.tensor([1.0, 1.0, 0.9, 1.0, 0.5, 1.0] * 2)
    temps[5] = 0.0
    cols = (temps, top_ks, top_ps, min_ps, seeds, positions)
    assert torch.equal(sample_tokens(logits, *cols), cpu_sampling.sample_rows(logits, *cols))


@pytest.mark.parametrize("vocab", [5, 64, 49157])
def test_top_k_1_is_the_first_maximum_of_the_scaled_logits(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(24, vocab, generator=g) * 4
    logits[3, [1, vocab - 1]] = 40.0  # a tie: the lower id
    logits[4, vocab // 2] = math.nan  # non-finite rows: index 0, as the torch formulation
    logits[5, vocab - 1] = math.inf
    logits[6] = -math.inf
    rows = logits.shape[0]
    temps = torch.rand(rows, generator=g) * 2 + 0.05
    cols = (temps, torch.ones(rows, dtype=torch.long), torch.rand(rows, generator=g) * 0.5 + 0.5)
    extra = (torch.rand(rows, generator=g) * 0.3, SEEDS.repeat(4), POSITIONS.repeat(4))
    got = cpu_sampling.sample_rows(logits, *cols, *extra)
    want = (logits / temps[:, None]).argmax(-1)
    want[[4, 5, 6]] = 0
    assert got.tolist() == want.tolist()
    assert got.tolist() == _sample_torch(logits, *cols, *extra).tolist()
