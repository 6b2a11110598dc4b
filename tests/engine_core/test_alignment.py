"""Zero-KL training-serving alignment: the engine's rollout logprobs (deterministic mode) equal
the trainer's ``PolicyModel.token_logprobs`` bit for bit, for every architecture, at several
batch sizes and packings on both sides, and again after an optimizer step and a refit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCH_CONFIGS

from engine_core import Engine, PolicyModel, logprob_diff

PROMPTS = [[1 + i, 5 + i % 7, 7, 9 + i][: 2 + i % 3] for i in range(16)]
N = 4  # 16 prompts x 4 samples = 64 sequences


def _sample(engine: Engine, prompts, seed: int, batch: int) -> list[tuple[list[int], int, list]]:
    """(sequence, prompt length, engine logprobs) of every sample, ``batch`` prompts a call."""
    params = {"temperature": 1.0, "max_new_tokens": 10, "n": N, "sampling_seed": seed}
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        outs = engine.generate(input_ids=chunk, sampling_params=params, return_logprob=True)
        for i, o in enumerate(outs):
            prompt = chunk[i // N]
            lps = [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]
            out.append((prompt + o["output_ids"], len(prompt), lps))
    return out


def _trainer_logprobs(policy: PolicyModel, samples, pack: int) -> list[torch.Tensor]:
    got = []
    for start in range(0, len(samples), pack):
        chunk = samples[start : start + pack]
        got += policy.token_logprobs([s for s, _, _ in chunk], [p for _, p, _ in chunk], 1.0)
    return got


def _assert_bitwise(samples, trainer: list[torch.Tensor]) -> None:
    assert logprob_diff([lp for _, _, lp in samples], trainer) == 0.0
    for (_, _, lps), ours in zip(samples, trainer):
        assert torch.equal(torch.tensor(lps, dtype=torch.float32), ours.detach())


@pytest.mark.parametrize("kind", sorted(ARCH_CONFIGS))
def test_engine_logprobs_equal_trainer_logprobs_bitwise(model_dir, kind):
    path = model_dir(kind)
    policy = PolicyModel.from_pretrained(path)
    with Engine(path, device="cpu", deterministic=True, max_num_batched_tokens=64) as engine:
        samples = _sample(engine, PROMPTS, seed=7, batch=16)
        assert len(samples) == 64 and sum(len(lp) for _, _, lp in samples) > 64 * 5
        assert _sample(engine, PROMPTS, seed=7, batch=3) == samples  # engine batch sizes
        for pack in (64, 1, 7):  # trainer batch sizes / packings
            _assert_bitwise(samples, _trainer_logprobs(policy, samples, pack))


@pytest.mark.parametrize("kind", ["llama", "llama3"])  # untied / tied embeddings
def test_alignment_holds_after_an_optimizer_step_and_a_refit(model_dir, kind):
    path = model_dir(kind)
    policy = PolicyModel.from_pretrained(path)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    with Engine(path, device="cpu", deterministic=True) as engine:
        for step in range(2):
            samples = _sample(engine, PROMPTS[:8], seed=step, batch=8)
            logprobs = _trainer_logprobs(policy, samples, 32)
            _assert_bitwise(samples, logprobs)
            loss = -torch.stack([lp.sum() for lp in logprobs]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            named = [(n, p.detach()) for n, p in policy.named_parameters()]
            engine.update_weights_from_tensor(named, weight_version=f"step-{step + 1}")
        samples = _sample(engine, PROMPTS[:8], seed=9, batch=8)
        assert engine.weight_version == "step-2"
        _assert_bitwise(samples, _trainer_logprobs(policy, samples, 5))


def test_alignment_holds_on_the_fixed_tile_matmul(model_dir, monkeypatch):
    """Without the C kernel and where the BLAS proof fails, engine and trainer both take the
    fixed 16-row tiles."""
    from kernels import cpu_linear, invariant_linear

    monkeypatch.setattr(cpu_linear, "available", lambda: False)
    monkeypatch.setattr(invariant_linear, "rows_invariant", lambda *args: False)
    path = model_dir("qwen3")
    policy = PolicyModel.from_pretrained(path)
    assert policy.matmul == "fixed 16-row tiles"
    with Engine(path, device="cpu", deterministic=True) as engine:
        assert engine.get_server_info()["deterministic_matmul"] == "fixed 16-row tiles"
        samples = _sample(engine, PROMPTS[:6], seed=3, batch=6)
    for pack in (24, 5):
        _assert_bitwise(samples, _trainer_logprobs(policy, samples, pack))
    policy.token_logprobs([samples[0][0]], [samples[0][1]])[0].sum().backward()
    assert all(p.grad is not None for p in policy.parameters())


def test_gradients_match_a_plain_torch_model(model_dir):
    """The kernels' backward is the gradient of the same function: the deterministic model's
    grads agree with the plain-torch (non-deterministic) model's to float tolerance."""
    path = model_dir("qwen2")
    seqs, plens = [[1, 2, 3, 4, 5, 6], [7, 8, 9]], [2, 1]
    grads = []
    for deterministic in (True, False):
        policy = PolicyModel.from_pretrained(path, deterministic=deterministic)
        loss = -sum(lp.sum() for lp in policy.token_logprobs(seqs, plens, 0.7))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-4, rtol=1e-3, msg=name)


def test_bad_arguments_are_named(model_dir):
    policy = PolicyModel.from_pretrained(model_dir("llama"))
    with pytest.raises(ValueError, match="one prompt length per sequence"):
        policy.token_logprobs([[1, 2]], [1, 1])
    with pytest.raises(ValueError, match="prompt length 0"):
        policy.token_logprobs([[1, 2]], [0])
    with pytest.raises(ValueError, match="non-empty"):
        policy.token_logprobs([[]], [1])
    with pytest.raises(ValueError, match="token counts differ"):
        logprob_diff([[0.0]], [torch.zeros(2)])
