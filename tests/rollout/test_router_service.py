"""End to end: the cache_aware policy through the real service (2 tiny-model engines with the
radix prefix cache): a shared-prefix workload arriving interleaved keeps each prefix on one
engine, the driver's index equals what the engines report caching, repeat prompts hit the
cache, and a multi-turn session stays on its engine."""

from __future__ import annotations

import random

import pytest
import ray

from rollout import deploy

GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True, "n": 2}
RNG = random.Random(5)
SYSTEMS = [[RNG.randrange(3, 300) for _ in range(64)] for _ in range(4)]  # 4 pages each


def workload(seed: int) -> list[tuple[int, list[int]]]:
    """(system prompt, prompt) pairs: 4 system prompts x 6 questions of 8 tokens, shuffled."""
    rng = random.Random(seed)
    items = [(k, SYSTEMS[k] + [rng.randrange(3, 300) for _ in range(8)]) for k in range(4)]
    items = [(k, p[:64] + [(t + q) % 297 + 3 for t in p[64:]]) for q in range(6) for k, p in items]
    rng.shuffle(items)
    return items


@pytest.fixture(scope="module")
def service(ray_local, tiny_model):
    with deploy(
        {
            "model_path": tiny_model,
            "num_engines": 2,
            "engine": {"device": "cpu"},
            "cpus_per_rank": 0.5,
            "policy": "cache_aware",
            "router": {"refresh_interval_s": 0.0},
        }
    ) as svc:
        yield svc


def homes(items, outputs) -> dict[int, set[int]]:
    where: dict[int, set[int]] = {}
    for i, out in enumerate(outputs):
        where.setdefault(items[i // 2][0], set()).add(out["meta_info"]["engine_index"])
    return where


def test_shared_prefixes_stay_together_and_the_index_is_exact(service):
    first = workload(0)
    out1 = service.generate(input_ids=[p for _, p in first], sampling_params=GREEDY)
    where = homes(first, out1)
    assert all(len(h) == 1 for h in where.values()), where
    assert set().union(*where.values()) == {0, 1}  # new prefixes spread by load
    stats = service.routing_stats()
    assert stats["policy"] == "CacheAwarePolicy" and stats["page_size"] == 16
    assert stats["decisions"] == {"miss": 4, "hit": 20}
    # Idle engines: what they cache now is what the next drain must replay.
    cached = [info["prefix_cache"]["cached_pages"] for info in service.server_info()]
    assert min(cached) > 0

    second = workload(1)
    out2 = service.generate(input_ids=[p for _, p in second], sampling_params=GREEDY)
    stats = service.routing_stats()
    assert stats["event_drains"] >= 2
    assert stats["confirmed_pages"] == {0: cached[0], 1: cached[1]}  # exact, from events
    assert homes(second, out2) == where  # routed by the engines' reported caches
    assert stats["decisions"]["hit"] == 20 + 24
    # Every system prompt (4 full pages) was served from the cache the second time.
    assert all(o["meta_info"]["cached_tokens"] >= 64 for o in out2)


def test_session_stays_on_its_engine(service):
    conversation = [RNG.randrange(3, 300) for _ in range(20)]
    engines = set()
    for turn in range(4):
        out = service.generate(
            input_ids=conversation,
            sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
            session_id="conv-1",
        )
        engines.add(out["meta_info"]["engine_index"])
        conversation = conversation + out["output_ids"] + [RNG.randrange(3, 300) for _ in range(5)]
        if turn:
            assert out["meta_info"]["cached_tokens"] >= 16  # the earlier turns' pages
    assert len(engines) == 1
    assert service.routing_stats()["decisions"]["session"] >= 3


def test_engine_actor_drains_its_events(service):
    engine = service.engines[0]
    ray.get(engine.drain_cache_events.remote())  # whatever was left
    ray.get(engine.generate.remote(input_ids=[[5] * 40], sampling_params={"max_new_tokens": 1}))
    events = ray.get(engine.drain_cache_events.remote())
    assert events and all(type(e).__name__ == "BlocksStored" for e in events)
    assert ray.get(engine.drain_cache_events.remote()) == []
