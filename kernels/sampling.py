"""Seeded, batch-invariant token sampling.

Randomness is counter based: the uniform for (request seed, position, vocab index) is a pure
integer hash of those three numbers, never drawn from a shared generator, so a request's sample
depends only on its own logits, sampling parameters, seed and position.

Hash (identical in torch and Triton; all values are int64 holding 32-bit words, every product is
``< 2**59`` so nothing overflows)::

    H(x)  = x ^= x >> 16; x = (x * 0x45D9F3B) & M; x ^= x >> 16; x = (x * 0x45D9F3B) & M;
            x ^= x >> 16                                   (M = 0xFFFFFFFF)
    k1    = H(H(H(H(seed_lo ^ 0x9E3779B9) ^ seed_hi) ^ pos_lo) ^ pos_hi)
    k2    = H(k1 ^ 0x85EBCA6B)
    bits  = H(H((vocab_idx + k1) & M) ^ k2)
    u     = (bits >> 9) * 2**-23 + 2**-24                  in (0, 1), exact in fp32

``sample_tokens`` semantics per row: temperature ``<= 0`` is greedy (argmax of the raw logits,
ties to the lowest id).  Otherwise ``logp = log_softmax(logits / T)`` and, in this order:
top-k keeps the ``k`` most probable tokens (ties broken towards lower ids; ``k <= 0`` or
``k >= V`` is off); top-p keeps the smallest prefix of the sorted, top-k-renormalised
distribution whose mass reaches ``p`` (always at least one token; ``p >= 1`` is off); min-p keeps
tokens with ``prob >= min_p * max_prob`` (``min_p <= 0`` is off).  The token is
``argmax over kept tokens of logp - log(-log(u))`` (Gumbel-max; ties to the lowest id).
"""

from __future__ import annotations

import torch

from . import cpu_sampling
from ._triton import HAS_TRITON, cdiv, tl, triton, use_triton

__all__ = [
    "seeded_uniform",
    "seeded_uniform_ref",
    "seeded_uniform_triton",
    "sample_tokens",
    "greedy_tokens",
]

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B
_C0 = 0x9E3779B9
_C1 = 0x85EBCA6B


def _h32(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer finaliser on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    return x ^ (x >> 16)


def _row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = seeds.to(torch.int64)
    p = positions.to(torch.int64)
    k1 = _h32((s & _M32) ^ _C0)
    k1 = _h32(k1 ^ ((s >> 32) & _M32))
    k1 = _h32(k1 ^ (p & _M32))
    k1 = _h32(k1 ^ ((p >> 32) & _M32))
    return k1, _h32(k1 ^ _C1)


def seeded_uniform_ref(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Torch counter-based uniforms: float32 ``[B, vocab]`` in (0, 1)."""
    k1, k2 = _row_keys(seeds, positions)
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _h32(_h32((idx[None, :] + k1[:, None]) & _M32) ^ k2[:, None])
    return (bits >> 9).to(torch.float32) * 2.0**-23 + 2.0**-24


if HAS_TRITON:

    @triton.jit
    def _h32_tl(x):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & 0xFFFFFFFF
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def _seeded_uniform_kernel(seed_ptr, pos_ptr, out_ptr, vocab, stride_out, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.program_id(1)
        m32 = 0xFFFFFFFF
        s = tl.load(seed_ptr + row).to(tl.int64)
        p = tl.load(pos_ptr + row).to(tl.int64)
        k1 = _h32_tl((s & m32) ^ 0x9E3779B9)
        k1 = _h32_tl(k1 ^ ((s >> 32) & m32))
        k1 = _h32_tl(k1 ^ (p & m32))
        k1 = _h32_tl(k1 ^ ((p >> 32) & m32))
        k2 = _h32_tl(k1 ^ 0x85EBCA6B)
        idx = col * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        bits = _h32_tl(_h32_tl((idx + k1) & m32) ^ k2)
        u = (bits >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.960464477539063e-08
        tl.store(out_ptr + row.to(tl.int64) * stride_out + idx, u, mask=idx < vocab)


def seeded_uniform_triton(
    seeds: torch.Tensor, positions: torch.Tensor, vocab: int, block: int = 1024
) -> torch.Tensor:
    """Triton version of :func:`seeded_uniform_ref` (bitwise identical)."""
    b = seeds.shape[0]
    out = torch.empty((b, vocab), dtype=torch.float32, device=seeds.device)
    if b and vocab:
        _seeded_uniform_kernel[(b, cdiv(vocab, block))](
            seeds.to(torch.int64), positions.to(torch.int64), out, vocab, out.stride(0), BLOCK=block
        )
    return out


def seeded_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1) for every (request, vocab index): float32 ``[B, vocab]``."""
    if use_triton(seeds):
        return seeded_uniform_triton(seeds, positions, vocab)
    if seeds.device.type == "cpu" and cpu_sampling.available():
        return cpu_sampling.seeded_uniform(seeds, positions, vocab)  # the same bits, in C
    return seeded_uniform_ref(seeds, positions, vocab)


def _keep_mask(
    logp: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, min_ps: torch.Tensor
) -> torch.Tensor:
    """Boolean ``[B, V]`` of tokens surviving top-k, top-p and min-p (vocab order)."""
    bsz, vocab = logp.shape
    probs = logp.exp()
    k = top_ks.to(torch.int64)
    k_on = (k > 0) & (k < vocab)
    p_on = top_ps < 1.0
    keep = torch.ones_like(logp, dtype=torch.bool)
    if bool((k_on | p_on).any()):
        # stable descending sort: equal probabilities keep their vocab order (lower id first)
        sp, sidx = torch.sort(probs, dim=-1, descending=True, stable=True)
        rank = torch.arange(vocab, device=logp.device)[None, :]
        keep_s = torch.where(k_on[:, None], rank < k[:, None], True)
        sp = sp.masked_fill(~keep_s, 0.0)
        sp = sp / sp.sum(-1, keepdim=True)  # renormalise after top-k
        mass_before = sp.cumsum(-1) - sp  # exclusive prefix mass
        keep_s &= torch.where(p_on[:, None], (mass_before < top_ps[:, None]) | (rank == 0), True)
        keep = torch.zeros_like(keep).scatter_(1, sidx, keep_s)
    mp = min_ps.to(probs.dtype)
    keep &= torch.where(mp[:, None] > 0, probs >= mp[:, None] * probs.amax(-1, keepdim=True), True)
    return keep


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` (first maximum; a NaN wins), in C for fp32 CPU rows."""
    if cpu_sampling.takes(logits):
        return cpu_sampling.argmax_rows(logits)
    return logits.argmax(-1)


def sample_tokens(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Sample one token per row of fp32 ``logits [B, V]``; returns int64 ``[B]``.

    Batch invariant: each row's token depends only on its own logits, parameters, seed and
    position. On CPU (fp32, C kernel built) every row is chosen by ``cpu_sampling.sample_rows``
    (the same uniforms and formulas; its exp/log and double top-p sums can break a
    float-rounding tie the other way); elsewhere by the torch formulation below, whose
    uniforms come from :func:`seeded_uniform` (Triton on CUDA).
    """
    logits = logits.float()
    if cpu_sampling.takes(logits):
        return cpu_sampling.sample_rows(
            logits, temperatures, top_ks, top_ps, min_ps, seeds, positions
        )
    return _sample_torch(logits, temperatures, top_ks, top_ps, min_ps, seeds, positions)


def _sample_torch(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """The torch formulation on every device, vectorised over the batch (no per-row loop)."""
    bsz, vocab = logits.shape
    greedy_tok = logits.argmax(-1)
    samp = (temperatures > 0).nonzero().squeeze(1)
    if samp.numel() == 0:
        return greedy_tok
    lg = logits[samp]
    temp = temperatures[samp].to(torch.float32)
    logp = torch.log_softmax(lg / temp[:, None], dim=-1)
    keep = _keep_mask(
        logp, top_ks[samp], top_ps[samp].to(torch.float32), min_ps[samp].to(torch.float32)
    )
    u = seeded_uniform(seeds[samp], positions[samp], vocab)
    score = (logp - torch.log(-torch.log(u))).masked_fill(~keep, float("-inf"))
    out = greedy_tok.clone()
    out[samp] = score.argmax(-1)
    return out
