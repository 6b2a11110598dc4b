"""Sampling penalties: the batched kernel and the sampler against a plain per-token reference
(SGLang's penalizer formulas), bitwise batch invariance, and neutral rows left untouched."""

from __future__ import annotations

import math

import pytest
import torch

from engine_core.execution.sampler import sample_step
from engine_core.scheduling.step_plan import PenaltySpec, SampleSpec, StepPlan
from kernels import apply_penalties, sample_tokens

VOCAB = 40


def reference(row: torch.Tensor, output: list[int], spec: PenaltySpec) -> torch.Tensor:
    """One row, one vocab entry at a time, straight from SGLang's penalizers: repetition
    (x<0: x*r, else x/r) for tokens in the output, then x -= f * count, x -= p if present,
    then -inf for banned ids."""
    out = row.clone()
    for tok in range(row.numel()):
        count = output.count(tok)
        x = out[tok]
        if count > 0:
            x = x * spec.repetition if x < 0 else x / spec.repetition
            x = x - spec.frequency * count
            x = x - spec.presence
        if tok in spec.banned_ids:
            x = torch.tensor(-math.inf)
        out[tok] = x
    return out


def spec_for(output: list[int], f: float, p: float, r: float, banned=()) -> PenaltySpec:
    ids = sorted(set(output))
    return PenaltySpec(f, p, r, ids, [output.count(t) for t in ids], sorted(banned))


CASES = [
    # (output tokens, frequency, presence, repetition, banned)
    ([3, 3, 3, 7, 11, 3], 0.5, 0.0, 1.0, ()),
    ([3, 7, 7, 1], 0.0, 1.5, 1.0, ()),
    ([0, 5, 5, 9, 39], 0.0, 0.0, 1.8, ()),
    ([2, 4, 4, 8, 16, 32], 0.7, -0.4, 0.6, ()),
    ([1, 2, 1, 2], -2.0, 2.0, 2.0, (0, 39)),
    ([], 0.0, 0.0, 1.0, (5, 6)),  # min_new_tokens only
]


def _kernel_inputs(specs: list[PenaltySpec], vocab: int = VOCAB):
    counts = torch.zeros(len(specs), vocab)
    banned = torch.zeros(len(specs), vocab, dtype=torch.bool)
    for i, s in enumerate(specs):
        for tok, n in zip(s.token_ids, s.counts):
            counts[i, tok] = n
        banned[i, s.banned_ids] = True
    cols = [torch.tensor([getattr(s, k) for s in specs]) for k in ("frequency", "presence")]
    return counts, cols[0], cols[1], torch.tensor([s.repetition for s in specs]), banned


@pytest.mark.parametrize("case", CASES, ids=[str(c[1:4]) for c in CASES])
def test_kernel_matches_reference(case):
    output, f, p, r, banned = case
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(len(output))) * 3
    spec = spec_for(output, f, p, r, banned)
    got = apply_penalties(logits, *_kernel_inputs([spec]))[0]
    want = reference(logits[0], output, spec)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    if output and (f, p, r) != (0.0, 0.0, 1.0):
        assert not torch.equal(got, logits[0])  # the penalty did something


def test_kernel_is_batch_invariant_and_neutral_rows_unchanged():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(len(CASES) + 1, VOCAB, generator=gen) * 2
    specs = [spec_for(c[0], *c[1:4], c[4]) for c in CASES] + [PenaltySpec()]
    full = apply_penalties(logits, *_kernel_inputs(specs))
    for i in range(len(specs)):
        alone = apply_penalties(logits[i : i + 1], *_kernel_inputs(specs[i : i + 1]))
        assert torch.equal(alone[0], full[i])
    assert torch.equal(full[-1], logits[-1])  # neutral: bitwise untouched


def _plan(specs: list[SampleSpec]) -> StepPlan:
    n = len(specs)
    return StepPlan(
        logit_rows=list(range(n)),
        target_ids=[-1] * n,
        logprob_temps=[1.0 if s.temperature == 0 else s.temperature for s in specs],
        top_logprobs=[3] * n,
        token_ids=[None] * n,
        samples=specs,
        want_logprobs=True,
    )


def test_sampler_samples_and_scores_the_penalized_logits():
    """Sampler == reference penalties applied to the same logits, then the unchanged sampling
    kernel; logprobs (and top logprobs) are log_softmax(penalized / T), as in SGLang."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(len(CASES), VOCAB, generator=gen) * 2
    samples, refs = [], []
    for i, (output, f, p, r, banned) in enumerate(CASES):
        temp = 0.0 if i % 2 else 0.8
        pen = spec_for(output, f, p, r, banned)
        samples.append(SampleSpec(i, temp, -1, 1.0, 0.0, 1000 + i, 50 + i, pen))
        refs.append(reference(logits[i], output, pen))
    ref = torch.stack(refs)
    result = sample_step(logits, _plan(samples))
    temps = torch.tensor([s.temperature for s in samples])
    want_tokens = sample_tokens(
        ref,
        temps,
        torch.full((len(CASES),), -1),
        torch.ones(len(CASES)),
        torch.zeros(len(CASES)),
        torch.tensor([s.seed for s in samples]),
        torch.tensor([s.position for s in samples]),
    ).tolist()
    assert result.tokens == want_tokens
    lp_temps = torch.tensor([1.0 if t == 0 else t for t in temps.tolist()])
    want_lp = torch.log_softmax(ref / lp_temps[:, None], -1)
    for i, tok in enumerate(result.tokens):
        assert tok not in CASES[i][4]  # a banned id is never drawn
        assert abs(result.logprobs[i] - want_lp[i, tok].item()) < 1e-5
        top = [t for _, t in result.top_logprobs[i]]
        assert top == want_lp[i].topk(3).indices.tolist()
    unpenalized = sample_step(
        logits, _plan([SampleSpec(i, *s_args(s)) for i, s in enumerate(samples)])
    )
    assert unpenalized.tokens != result.tokens  # the penalties changed what was sampled


def s_args(s: SampleSpec) -> tuple:
    return (s.temperature, s.top_k, s.top_p, s.min_p, s.seed, s.position)


def test_sampler_rows_are_batch_invariant_and_ignore_ids_past_the_vocabulary():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, VOCAB, generator=gen)
    specs = [
        SampleSpec(0, 1.0, -1, 1.0, 0.0, 5, 9, spec_for([1, 1, 2], 1.0, 0.5, 1.5, (3, VOCAB + 7))),
        SampleSpec(1, 0.0, -1, 1.0, 0.0, 6, 9, None),
        SampleSpec(2, 0.7, 5, 0.9, 0.0, 7, 9, spec_for([4, 4], -1.0, 0.0, 0.5)),
        SampleSpec(3, 1.0, -1, 1.0, 0.0, 8, 9, PenaltySpec(banned_ids=[VOCAB + 1])),
    ]
    full = sample_step(logits, _plan(specs))
    for i, spec in enumerate(specs):
        alone = sample_step(logits[i : i + 1], _plan([SampleSpec(0, *s_args(spec), spec.penalty)]))
        assert alone.tokens == [full.tokens[i]]
        assert alone.logprobs == [full.logprobs[i]]  # bitwise: floats compared with ==
        assert alone.top_logprobs == [full.top_logprobs[i]]
    plain = sample_step(logits[1:2], _plan([SampleSpec(0, *s_args(specs[1]))]))
    assert plain.logprobs == [full.logprobs[1]]
