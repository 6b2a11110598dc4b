"""The fixed-order all-reduce: bitwise identical across repeats and across ranks."""

from __future__ import annotations

import multiprocessing as mp

import torch

from weight_sync.group import free_port

WORLD = 3
REPEATS = 20


def _worker(rank: int, port: int, queue) -> None:
    from engine_core.parallel import TPContext
    from weight_sync.group import create_group

    torch.set_num_threads(1)
    group = create_group("127.0.0.1", port, rank, WORLD, "test-ar", timeout_s=60)
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        # values of very different magnitudes make the sum order-sensitive
        x = torch.randn(4099, generator=gen) * torch.logspace(-6, 6, 4099)
        tp = TPContext(rank, WORLD, group.process_group, ordered_all_reduce=True)
        results = [tp.all_reduce(x.clone()) for _ in range(REPEATS)]
        # numpy pickles by value; torch tensors would be shared by fd, which dies with us
        queue.put((rank, x.numpy(), torch.stack(results).numpy()))
    finally:
        group.destroy()


def test_ordered_all_reduce_is_bitwise_stable_and_rank_ordered():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = {
        rank: (torch.from_numpy(x), torch.from_numpy(res))
        for rank, x, res in (queue.get(timeout=120) for _ in procs)
    }
    for p in procs:
        p.join(timeout=30)
    inputs = [got[r][0] for r in range(WORLD)]
    expected = (inputs[0] + inputs[1]) + inputs[2]  # rank order 0, 1, 2
    for rank in range(WORLD):
        results = got[rank][1]
        for repeat in range(REPEATS):
            assert torch.equal(results[repeat], expected), (rank, repeat)
    # a different order really gives different bits here, so the test can fail
    assert not torch.equal((inputs[2] + inputs[1]) + inputs[0], expected)
