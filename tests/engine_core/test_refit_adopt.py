"""Adopting commits: a complete update received into a staging buffer becomes the parameters'
storage (no copy), parameters never keep an earlier buffer pinned, and partial updates copy."""

from __future__ import annotations

import pytest
import torch
from refit_workers import GROUP, SenderProcess, Step, tensors_for
from torch import nn

from engine_core import Engine
from engine_core.weights.adopt import Part, commit_adopting
from weight_sync import free_port
from weight_sync.checksum import checksums_of


class Toy(nn.Module):
    """``fused`` is filled from three parts (like q/k/v); ``plain`` from one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = nn.Parameter(torch.zeros(6, 4), requires_grad=False)
        self.plain = nn.Parameter(torch.zeros(5), requires_grad=False)


PLAIN = 64  # plain's offset in a source buffer: 256 bytes in, aligned like a fresh tensor
SIZE = PLAIN + 5


def aligned(start: float, numel: int = SIZE) -> torch.Tensor:
    """``arange`` values in a buffer whose first element is 256-byte aligned."""
    raw = torch.empty(numel + 64)
    skip = (-raw.data_ptr() % 256) // 4
    out = raw[skip : skip + numel]
    out.copy_(torch.arange(start, start + numel))
    return out


def parts_from(toy: Toy, flat: torch.Tensor, order: tuple[int, int, int]) -> list[Part]:
    """Sources laid out in ``flat``: the three fused parts back to back in ``order`` from 0,
    then ``plain`` at ``PLAIN``."""
    pieces = {i: flat[8 * k : 8 * k + 8].view(2, 4) for k, i in enumerate(order)}
    parts = [Part(toy.fused, toy.fused[2 * i : 2 * i + 2], pieces[i]) for i in range(3)]
    return parts + [Part(toy.plain, toy.plain, flat[PLAIN:SIZE])]


def inside(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    start = buffer.data_ptr()
    return start <= t.data_ptr() < start + buffer.numel() * buffer.element_size()


def test_complete_update_is_adopted_without_copy():
    toy = Toy()
    flat = aligned(0)
    assert commit_adopting(parts_from(toy, flat, (0, 1, 2)), list(toy.parameters())) == 2
    assert inside(toy.fused, flat) and inside(toy.plain, flat)
    assert torch.equal(toy.fused.flatten(), flat[:24]) and torch.equal(toy.plain, flat[PLAIN:])
    flat.add_(1)  # the buffer *is* the storage now
    assert toy.plain[0].item() == PLAIN + 1


def test_misaligned_sources_are_copied():
    """A view off a 256-byte boundary would send kernels down another path (other bits)."""
    toy = Toy()
    flat = aligned(0, SIZE + 1)[1:]
    assert commit_adopting(parts_from(toy, flat, (0, 1, 2)), list(toy.parameters())) == 0
    assert not inside(toy.fused, flat) and torch.equal(toy.fused.flatten(), flat[:24])


def test_parts_out_of_order_are_copied_into_own_storage():
    toy = Toy()
    first = aligned(0)
    commit_adopting(parts_from(toy, first, (0, 1, 2)), list(toy.parameters()))
    second = aligned(100)
    # k before q: the fused weight cannot be a view, and the rest (5 of 29 elements) is not
    # worth pinning a buffer for: everything is copied, into storage that leaves ``first``.
    assert commit_adopting(parts_from(toy, second, (1, 0, 2)), list(toy.parameters())) == 0
    for param in toy.parameters():
        assert not inside(param, first) and not inside(param, second)
    expected = torch.cat([second[8:16], second[0:8], second[16:24]]).view(6, 4)
    assert torch.equal(toy.fused, expected) and torch.equal(toy.plain, second[PLAIN:])


def test_mostly_adoptable_update_adopts_and_copies_the_rest():
    toy = Toy()
    first = aligned(0)
    commit_adopting(parts_from(toy, first, (0, 1, 2)), list(toy.parameters()))
    second = aligned(100)
    parts = parts_from(toy, second, (0, 1, 2))[:3]
    strided = second[24:34:2]  # not contiguous: must be copied
    parts.append(Part(toy.plain, toy.plain, strided))
    assert commit_adopting(parts, list(toy.parameters())) == 1
    assert inside(toy.fused, second) and not inside(toy.plain, first)
    assert not inside(toy.plain, second) and torch.equal(toy.plain, strided)


def test_partial_update_copies_in_place():
    toy = Toy()
    ptr = toy.plain.data_ptr()
    flat = aligned(0)
    parts = [p for p in parts_from(toy, flat, (0, 1, 2)) if p.param is toy.plain]
    assert commit_adopting(parts, list(toy.parameters())) == 0
    assert toy.plain.data_ptr() == ptr and torch.equal(toy.plain, flat[PLAIN:])


def run(engine: Engine) -> list:
    # Drop the prefix cache: in default mode a cache hit changes the last bits of logprobs
    # (another batch computed the shared KV); these tests compare weights through outputs.
    engine.flush_cache()
    greedy = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    outs = engine.generate(input_ids=[[1, 2, 3], [7, 6, 5, 4]], sampling_params=greedy)
    return [o["output_ids"] for o in outs]


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])  # q/k/v biases; tied embeddings
def test_engine_adopts_received_buffers_and_alternates(model_dir, tmp_path, kind):
    paths = [model_dir(kind), model_dir(kind, seed=1)]
    expected = []
    for path in paths:
        with Engine(path, device="cpu") as fresh:
            expected.append(run(fresh))
    steps = [Step(paths[1], "a"), Step(paths[0], "b"), Step(paths[1], "c")]
    port = free_port()
    sender = SenderProcess(tmp_path, port, 2, steps)
    try:
        with Engine(paths[0], device="cpu") as engine:
            runner = engine.runner
            engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP)
            arena = runner.refit.members[GROUP].arena
            seen = []
            for k, step in enumerate(steps):
                engine.update_weights_from_distributed(sender.plan(k), group_name=GROUP)
                assert run(engine) == expected[1 if k != 1 else 0]
                buffers = [ptr for ptr, _ in arena.buffers()]
                assert len(buffers) == 2  # the spare exists from the first refit on
                # Every parameter lives in the buffer just received (adopted, not copied)...
                storages = runner.weight_storages()
                assert len(storages & set(buffers)) == 1
                seen.append((storages & set(buffers)).pop())
                assert engine.get_weights_checksum() == checksums_of(tensors_for(step))
            assert seen[0] != seen[1] and seen[2] == seen[0]  # ...and the two alternate

            # A partial tensor refit copies into the adopted storage in place.
            named = tensors_for(Step(paths[0], "x"))
            name = "model.layers.0.mlp.down_proj.weight"
            engine.update_weights_from_tensor({name: named[name]}, weight_version="partial")
            assert runner.weight_storages() & set(buffers) == {seen[2]}
            assert engine.get_weights_checksum([name]) == checksums_of({name: named[name]})

            # Releasing the weights frees the arena too (sleep gives all of it back).
            freed = engine.release_memory_occupation(["weights"])
            assert arena.nbytes == 0, freed
    finally:
        result = sender.close()
    assert result["ok"], result


def test_staging_can_be_released_after_every_refit(model_dir, tmp_path):
    paths = [model_dir("llama"), model_dir("llama", seed=1)]
    with Engine(paths[1], device="cpu") as fresh:
        expected = run(fresh)
    port = free_port()
    sender = SenderProcess(tmp_path, port, 2, [Step(paths[1], "a"), Step(paths[1], "b")])
    try:
        with Engine(paths[0], device="cpu", keep_refit_staging=False) as engine:
            engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP)
            arena = engine.runner.refit.members[GROUP].arena
            for k in range(2):
                engine.update_weights_from_distributed(sender.plan(k), group_name=GROUP)
                assert arena.buffers() == [] and run(engine) == expected
    finally:
        result = sender.close()
    assert result["ok"], result


def test_odd_shapes_stay_bitwise_equal_to_a_fresh_engine(model_dir, tmp_path):
    """Tensors of odd byte sizes (an 18-element k bias) in the stream: adopted weights must
    still be aligned like fresh ones (MKL's batch-1 GEMV gives other bits for a weight 4 or 8
    bytes off a 16-byte boundary)."""
    odd = dict(hidden_size=36, num_attention_heads=2, num_key_value_heads=1, intermediate_size=50)
    old, new = model_dir("qwen2", **odd), model_dir("qwen2", seed=1, **odd)
    greedy = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}

    def run_one(engine: Engine) -> list:
        out = engine.generate(input_ids=[5, 9, 2], sampling_params=greedy, return_logprob=True)
        return [out["output_ids"], out["meta_info"]["output_token_logprobs"]]

    with Engine(new, device="cpu") as fresh:
        expected = run_one(fresh)
    port = free_port()
    sender = SenderProcess(tmp_path, port, 2, [Step(new, "a"), Step(new, "b")])
    try:
        with Engine(old, device="cpu") as engine:
            engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP)
            for k in range(2):
                engine.update_weights_from_distributed(sender.plan(k), group_name=GROUP)
                assert run_one(engine) == expected
            storages = engine.runner.weight_storages()
            arena = engine.runner.refit.members[GROUP].arena
            assert storages & {ptr for ptr, _ in arena.buffers()}  # adopted, not copied
    finally:
        result = sender.close()
    assert result["ok"], result
