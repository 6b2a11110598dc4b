"""The driver side of cache-aware routing over fake engines (``fake_engines.FakeEngine``: a toy
prefix cache publishing real cache events): the EngineTable + GroupRunner the RolloutDriver
builds, with the cache_aware policy against round_robin on a shared-prefix workload whose
prefixes do not fit one engine; events drained once per batch; text tokenized like the engine;
sessions; a dead engine's entries dropped."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine_core.errors import InvalidRequestError
from engine_core.requests.generate_request import GenerateRequest
from engine_core.scheduling.cache_events import block_hashes
from rollout.engine_table import EngineTable
from rollout.group_runner import GroupRunner
from rollout.policies import make_policy
from rollout.routing.config import RouterConfig
from rollout.routing.prompt_tokens import PromptTokens
from tests.rollout.fake_engines import FakeEngine, FakeTokenizer, char_tokens

PAGE = 16
SYSTEMS = [[1000 + 37 * k + i for i in range(256)] for k in range(8)]  # 16 pages each


def runner(engines, policy: str, **router) -> GroupRunner:
    config = RouterConfig(**{"refresh_interval_s": 0.0, **router})
    table = EngineTable(engines, make_policy(policy, config), "v0", restart_timeout_s=1)
    return GroupRunner(table, PromptTokens("<fake>", loader=lambda path: FakeTokenizer()))


def interleaved(questions: int, seed: int = 0) -> list[list[int]]:
    """8 system prompts x ``questions`` questions, arriving interleaved in a seeded random
    order (a strict k = i % 8 cycle would let round robin split them perfectly by accident)."""
    prompts = [SYSTEMS[k] + [7, q, k, 9] for q in range(questions) for k in range(8)]
    random.Random(seed).shuffle(prompts)
    return prompts


def hit_rate(outputs: list[dict]) -> float:
    cached = sum(o["meta_info"]["cached_tokens"] for o in outputs)
    return cached / sum(o["meta_info"]["prompt_tokens"] for o in outputs)


async def rollout(run: GroupRunner, prompts, **kwargs) -> list[dict]:
    request = GenerateRequest(input_ids=prompts, sampling_params={"max_new_tokens": 4}, **kwargs)
    return await run.generate(request)


def workload(policy: str, engines: int) -> tuple[float, list[dict]]:
    # Each engine holds 4 of the 8 system prompts (16 pages each): round robin sends every
    # prompt to every engine and thrashes its LRU; cache-aware splits them 4/4.
    fakes = [FakeEngine(PAGE, capacity_pages=4 * 16 + 4) for _ in range(engines)]
    run = runner(fakes, policy)

    async def two_batches():
        first = await rollout(run, interleaved(8))
        second = await rollout(run, interleaved(8))
        return first + second

    outputs = asyncio.run(two_batches())
    return hit_rate(outputs), outputs


def test_cache_aware_beats_round_robin_on_shared_prefixes():
    rr, _ = workload("round_robin", 2)
    ca, outputs = workload("cache_aware", 2)
    assert ca >= 1.8 * rr and ca > 0.8, (ca, rr)  # the 2-engine target
    # Every system prompt lived on one engine, and the prompts were split 4 / 4.
    homes = {}
    for prompt, out in zip(interleaved(8) * 2, outputs):
        homes.setdefault(prompt[258], set()).add(out["meta_info"]["engine_index"])
    assert all(len(h) == 1 for h in homes.values()), homes
    assert sorted(next(iter(h)) for h in homes.values()) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_events_are_drained_once_per_batch_not_per_decision():
    fakes = [FakeEngine(PAGE), FakeEngine(PAGE)]
    run = runner(fakes, "cache_aware")
    policy = run._engines.policy

    async def go():
        await rollout(run, interleaved(4))  # 32 decisions
        assert [f.drains for f in fakes] == [1, 1]
        assert len(policy.index.confirmed(0)) == 0  # nothing confirmed before the first batch
        await rollout(run, interleaved(1))
        assert [f.drains for f in fakes] == [2, 2]

    asyncio.run(go())
    assert policy.page_size == PAGE
    # After the second drain the index holds exactly what each engine cached.
    for e, fake in enumerate(fakes):
        assert policy.index.confirmed(e) == frozenset(fake._pages)
    assert policy.stats()["decisions"] == {"miss": 8, "hit": 32}


def test_refresh_interval_limits_drains():
    fakes = [FakeEngine(PAGE)]
    run = runner(fakes, "cache_aware", refresh_interval_s=3600.0)

    async def go():
        for _ in range(3):
            await rollout(run, interleaved(1))

    asyncio.run(go())
    assert fakes[0].drains == 1


def test_text_prompts_are_tokenized_like_the_engine():
    fakes = [FakeEngine(PAGE), FakeEngine(PAGE)]
    run = runner(fakes, "cache_aware")
    systems = [f"system prompt number {k}: " + "be helpful and precise. " * 12 for k in range(4)]
    prompts = [s + f"question {q}?" for q in range(4) for s in systems]

    async def go():
        request = GenerateRequest(prompt=prompts, sampling_params={"max_new_tokens": 2})
        await run.generate(request)
        return await run.generate(request)

    outputs = asyncio.run(go())
    assert hit_rate(outputs) > 0.9
    homes = {}
    for i, out in enumerate(outputs):
        homes.setdefault(i % 4, set()).add(out["meta_info"]["engine_index"])
    assert all(len(h) == 1 for h in homes.values()), homes
    # Routed by the driver's own token ids: hits from the first batch on (provisional), and
    # the pages it expected are the pages the engines reported (same tokenizer call).
    assert run._engines.policy.stats()["decisions"] == {"miss": 4, "hit": 28}
    expected = {h for p in prompts for h in block_hashes(char_tokens(p), PAGE)}
    assert set().union(*(f._pages for f in fakes)) == expected


def test_sessions_through_the_runner():
    fakes = [FakeEngine(PAGE), FakeEngine(PAGE)]
    run = runner(fakes, "cache_aware")
    convs = [[500 + 11 * c + i for i in range(40)] for c in range(4)]

    async def go():
        homes = {}
        for turn in range(4):
            prompts = [convs[c] + [3] * (8 * turn) for c in range(4)]
            outs = await rollout(run, prompts, session_id=[f"conv{c}" for c in range(4)])
            for c, out in enumerate(outs):
                homes.setdefault(c, set()).add(out["meta_info"]["engine_index"])
        return homes

    homes = asyncio.run(go())
    assert all(len(h) == 1 for h in homes.values()), homes
    assert run._engines.policy.stats()["decisions"]["session"] == 12
    with pytest.raises(InvalidRequestError, match=r"session_id\[1\]"):
        asyncio.run(rollout(run, [[1] * 4, [2] * 4], session_id=["a", 3]))


def test_caller_rids_name_the_engine_requests_and_route_sticky():
    """A caller's rid (SGLang's ``_t<turn>`` suffix per turn) is the engine's request id and
    its stripped key routes every turn of a conversation to one engine."""
    fakes = [FakeEngine(PAGE), FakeEngine(PAGE)]
    run = runner(fakes, "cache_aware")
    convs = [[700 + 13 * c + i for i in range(40)] for c in range(4)]

    async def go():
        homes = {}
        for turn in range(3):
            prompts = [convs[c] + [5] * (8 * turn) for c in range(4)]
            rids = [f"conv{c}_t{turn}" for c in range(4)]
            outs = await rollout(run, prompts, rid=rids)
            assert [o["meta_info"]["id"] for o in outs] == rids
            for c, out in enumerate(outs):
                homes.setdefault(c, set()).add(out["meta_info"]["engine_index"])
        n2 = await run.generate(
            GenerateRequest(input_ids=[1, 2, 3], sampling_params={"n": 2}, rid="pair")
        )
        assert [o["meta_info"]["id"] for o in n2] == ["pair-0", "pair-1"]
        return homes

    homes = asyncio.run(go())
    assert all(len(h) == 1 for h in homes.values()), homes
    assert run._engines.policy.stats()["decisions"]["session"] == 8
    assert not run._caller_rids._inflight  # released once the rollouts ended


@pytest.mark.parametrize(
    "rid, match",
    [
        ("same", "unique within the request"),
        (["a", 3], r"rid\[1\]=3"),
        (["a", None], "one rid per prompt"),
        (["a", ""], r"rid\[1\]=''"),
    ],
)
def test_bad_caller_rids_name_the_rid(rid, match):
    run = runner([FakeEngine(PAGE)], "round_robin")
    with pytest.raises(InvalidRequestError, match=match):
        asyncio.run(rollout(run, [[1] * 4, [2] * 4], rid=rid))


def test_a_caller_rid_in_flight_is_refused_until_it_ends():
    run = runner([FakeEngine(PAGE)], "round_robin")
    items = GenerateRequest(input_ids=[1, 2], rid="busy").items()
    with run._caller_rids.claimed(items):
        with pytest.raises(InvalidRequestError, match="duplicates a request in flight"):
            asyncio.run(rollout(run, [1, 2], rid="busy"))
    out = asyncio.run(rollout(run, [1, 2], rid="busy"))
    assert out["meta_info"]["id"] == "busy"


def test_dead_engine_on_drain_loses_its_entries():
    fakes = [FakeEngine(PAGE), FakeEngine(PAGE)]
    run = runner(fakes, "cache_aware")
    policy = run._engines.policy

    async def go():
        await rollout(run, interleaved(2))
        await rollout(run, interleaved(1))  # drained: engine 1's pages confirmed
        assert policy.index.confirmed(1)
        fakes[1].dead = True
        run._engines.policy.feed._last = -float("inf")
        await run._engines.refresh_routing()

    asyncio.run(go())
    assert policy.index.confirmed(1) == frozenset() and policy.index.provisional(1) == frozenset()
    assert policy.index.confirmed(0) == frozenset(fakes[0]._pages)


def test_engine_without_drain_rpc_is_routed_by_load(caplog):
    fake = FakeEngine(PAGE)
    fake.drain_cache_events = None  # an engine that predates the prefix cache

    class NoDrain:
        def remote(self):
            async def fail():
                raise AttributeError("'Engine' object has no attribute 'drain_cache_events'")

            return fail()

    fake.drain_cache_events = NoDrain()
    run = runner([fake, FakeEngine(PAGE)], "cache_aware")
    outputs = asyncio.run(rollout(run, interleaved(2)))
    assert len(outputs) == 16
    assert "drain_cache_events failed" in caplog.text


def test_concurrent_refreshes_share_one_drain_and_a_hung_engine_keeps_its_entries():
    fakes = [FakeEngine(PAGE), FakeEngine(PAGE)]
    run = runner(fakes, "cache_aware", drain_timeout_s=0.2)
    table, policy = run._engines, run._engines.policy

    async def go():
        await rollout(run, interleaved(1))
        policy.feed._last = -float("inf")
        await asyncio.gather(table.refresh_routing(), table.refresh_routing())
        assert [f.drains for f in fakes] == [2, 2]  # one drain for both callers
        before = policy.index.confirmed(1)
        assert before

        class Hung:
            def remote(self):
                return asyncio.sleep(3600)

        fakes[1].drain_cache_events = Hung()
        policy.feed._last = -float("inf")
        await table.refresh_routing()  # returns after the timeout
        assert policy.index.confirmed(1) == before

    asyncio.run(go())
