"""Pure-Python bookkeeping: page pool and scheduler, driven without a model."""

from __future__ import annotations

import pytest

from engine_core.requests.request import Request, Status
from engine_core.requests.sampling_params import SamplingParams
from engine_core.scheduling.page_pool import PagePool, pages_needed
from engine_core.scheduling.scheduler import Scheduler


def make_req(i: int, prompt_len: int, max_new: int = 8) -> Request:
    return Request(
        rid=f"r{i}",
        prompt_ids=list(range(prompt_len)),
        params=SamplingParams(),
        seed=i,
        arrival=i,
        max_new_tokens=max_new,
    )


def run_step(sched: Scheduler, token: int = 7) -> list:
    """Pretend the model ran: mark chunks computed, append a token to sampling ones."""
    chunks = sched.schedule()
    for c in chunks:
        c.req.num_computed += c.length
        if c.samples:
            c.req.output_ids.append(token)
            if len(c.req.output_ids) >= c.req.max_new_tokens:
                sched.finish(c.req)
    return chunks


def test_pool_allocate_release_refcounts():
    pool = PagePool(4, 16)
    a = pool.allocate(3)
    assert pool.num_free == 1 and len(set(a)) == 3
    pool.share(a[:1])
    pool.release(a)
    assert pool.num_free == 3 and pool.ref_count(a[0]) == 1
    pool.release(a[:1])
    assert pool.num_free == 4
    pool.check_integrity()
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate(5)
    with pytest.raises(AssertionError, match="double free"):
        pool.release([a[1]])


def test_pages_needed():
    assert [pages_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_token_budget_chunks_long_prompt_and_mixes_decode():
    sched = Scheduler(PagePool(64, 4), max_running=8, max_batched_tokens=10)
    short, long = make_req(0, 3), make_req(1, 25)
    sched.add(short)
    sched.add(long)
    first = run_step(sched)
    assert [(c.req.rid, c.length) for c in first] == [("r0", 3), ("r1", 7)]
    second = run_step(sched)
    # the decode of r0 and the next prefill chunk of r1 share one step, within budget
    assert [(c.req.rid, c.length) for c in second] == [("r0", 1), ("r1", 9)]
    assert sum(c.length for c in second) <= 10


def test_retracts_newest_and_keeps_generated_tokens():
    sched = Scheduler(PagePool(6, 4), max_running=8, max_batched_tokens=64)
    reqs = [make_req(i, 7, max_new=12) for i in range(3)]
    for r in reqs:
        sched.add(r)
    finished_order = []
    for _ in range(200):
        if not sched.has_work():
            break
        run_step(sched)
        sched.pool.check_integrity()
        for r in reqs:
            if r.status is Status.FINISHED and r.rid not in finished_order:
                finished_order.append(r.rid)
    assert sched.stats.num_retractions > 0
    assert sorted(finished_order) == ["r0", "r1", "r2"]
    assert all(len(r.output_ids) == 12 for r in reqs)  # nothing lost or duplicated
    assert sched.pool.num_free == 6


def test_max_running_cap():
    sched = Scheduler(PagePool(64, 4), max_running=2, max_batched_tokens=100)
    for i in range(4):
        sched.add(make_req(i, 3))
    chunks = sched.schedule()
    assert len(chunks) == 2 and len(sched.running) == 2 and len(sched.waiting) == 2
