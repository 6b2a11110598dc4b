"""CacheAwarePolicy's decision rule with fake event streams: longest match wins, imbalance
falls back to least load (both thresholds), the cache threshold, sessions stay put while
balanced, a batch's groups of one prefix route together, dead engines' entries dropped."""

from __future__ import annotations

import pytest

from engine_core.scheduling.cache_events import ROOT_HASH, BlocksStored, block_hashes
from rollout.policies import EngineLoad, GroupInfo, make_policy
from rollout.routing.cache_aware import CacheAwarePolicy
from rollout.routing.config import RouterConfig
from rollout.routing.sessions import SessionTable, session_key

PAGE = 4


def policy(**overrides) -> CacheAwarePolicy:
    p = CacheAwarePolicy(RouterConfig(**overrides))
    p.page_size = PAGE
    return p


def group(ids: list[int], session: str | None = None, index: int = 0) -> GroupInfo:
    return GroupInfo(index, None, tuple(ids), 1, len(ids) + 8, session)


def loads(*tokens: int) -> list[EngineLoad]:
    return [EngineLoad(i, t, 0) for i, t in enumerate(tokens)]


def cache(p: CacheAwarePolicy, engine: int, ids: list[int]) -> None:
    p.index.apply(engine, [BlocksStored(tuple(block_hashes(ids, PAGE)), ROOT_HASH)])


SYSTEM = list(range(100, 132))  # 8 pages


def test_registered_and_configured_through_make_policy():
    p = make_policy("cache_aware", RouterConfig(balance_abs_threshold=5))
    assert isinstance(p, CacheAwarePolicy) and p.config.balance_abs_threshold == 5
    assert p.needs_token_ids


def test_longest_match_wins_over_load():
    p = policy()
    cache(p, 0, SYSTEM[:8])  # 2 pages
    cache(p, 1, SYSTEM)  # 8 pages
    cache(p, 2, SYSTEM[:16])
    pick = p.choose(group(SYSTEM + [1, 2, 3]), loads(0, 500, 0))
    assert pick == 1 and p.decisions["hit"] == 1


def test_equal_matches_go_to_the_less_loaded_holder():
    p = policy()
    for e in (0, 1):
        cache(p, e, SYSTEM)
    assert p.choose(group(SYSTEM + [5]), loads(0, 300, 200)) == 0
    assert p.choose(group(SYSTEM + [6]), loads(900, 300, 0)) == 1  # 2 holds nothing


@pytest.mark.parametrize(
    "load, expect",
    [
        ((1000, 0), 1),  # abs 1000 > 64 and 1000 > 1.5 * 0: imbalanced -> least load
        ((2000, 1500), 0),  # abs 500 > 64 but 2000 < 1.5 * 1500: balanced -> cache hit
        ((60, 0), 0),  # rel holds but abs 60 <= 64: balanced -> cache hit
    ],
)
def test_imbalance_needs_both_thresholds(load, expect):
    p = policy(balance_abs_threshold=64, balance_rel_threshold=1.5)
    cache(p, 0, SYSTEM)
    assert p.choose(group(SYSTEM + [9]), loads(*load)) == expect
    rule = "imbalanced" if expect == 1 else "hit"
    assert p.decisions[rule] == 1


def test_short_shared_preamble_is_below_the_cache_threshold():
    p = policy(cache_threshold=0.3)
    preamble = SYSTEM[:4]  # one page shared by every prompt
    cache(p, 0, preamble + [7] * 28)
    other = preamble + [8] * 28  # 1 of 8 pages cached on engine 0: 12.5% < 30%
    assert p.choose(group(other), loads(10, 0)) == 1
    assert p.decisions["miss"] == 1
    p2 = policy(cache_threshold=0.1)
    cache(p2, 0, preamble + [7] * 28)
    assert p2.choose(group(other), loads(10, 0)) == 0


def test_groups_of_one_batch_route_together_before_any_event():
    """Interleaved arrivals (8 prefixes x 4 questions) in one batch: the first group of each
    prefix spreads by load, the rest follow it through provisional entries."""
    p = policy()
    prefixes = [[1000 * k + i for i in range(32)] for k in range(8)]
    tokens = [0, 0]
    where: dict[int, set[int]] = {k: set() for k in range(8)}
    for q in range(4):
        for k, prefix in enumerate(prefixes):
            g = group(prefix + [q, q + 1], index=q * 8 + k)
            pick = p.choose(g, loads(*tokens))
            tokens[pick] += g.est_tokens
            where[k].add(pick)
    assert all(len(engines) == 1 for engines in where.values()), where
    assert sorted(e for (e,) in where.values()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert p.decisions == {"miss": 8, "hit": 24}


def test_sessions_stay_on_their_engine_while_balanced():
    p = policy(balance_abs_threshold=100)
    turn1 = [5] * 12
    assert p.choose(group(turn1, "session:conv"), loads(0, 0)) == 0
    cache(p, 1, turn1 + [6] * 20)  # engine 1 even caches a longer match
    turn2 = turn1 + [6] * 20 + [7] * 4
    assert p.choose(group(turn2, "session:conv"), loads(50, 0)) == 0
    assert p.decisions["session"] == 1
    # Imbalanced: the conversation moves to the least loaded engine and is pinned there.
    assert p.choose(group(turn2 + [8], "session:conv"), loads(500, 0)) == 1
    assert p.choose(group(turn2 + [9], "session:conv"), loads(0, 50)) == 1


def test_session_keys_follow_sglang():
    assert session_key("abc", "conv_t2") == "session:abc"  # explicit session_id wins
    assert session_key(None, "conv7_t2_r1") == session_key(None, "conv7_t3") == "rid:conv7"
    assert session_key(None, "conv7_r1") == "rid:conv7"
    assert session_key(None, "conv_tx") == "rid:conv_tx"  # not a turn suffix
    assert session_key(None, "_t1") == "rid:_t1"  # nothing left: the rid itself
    assert session_key(None, None) is None and session_key("", "") is None
    assert session_key("x" * 129, None) is None  # over SGLang's 128-byte cap


def test_session_table_is_bounded():
    table = SessionTable(max_sessions=2)
    for i, key in enumerate("abc"):
        table.pin(key, i)
    assert len(table) == 2 and table.get("a") is None and table.get("c") == 2
    table.forget_engine(2)
    assert table.get("c") is None and table.get("b") == 1


def test_dead_engine_entries_and_sessions_are_dropped():
    p = policy()
    cache(p, 0, SYSTEM)
    p.choose(group([9] * 8, "session:s"), loads(0, 10))
    p.engine_lost(0)
    assert p.index.confirmed(0) == frozenset() and len(p.sessions) == 0
    # Engine 0 came back empty: a hint-less decision by load.
    assert p.choose(group(SYSTEM + [1]), loads(10, 0)) == 1


def test_without_page_size_or_token_ids_it_routes_by_load_and_session():
    p = CacheAwarePolicy()  # no page size learned (engines without a prefix cache)
    text_only = GroupInfo(0, "hello", None, 1, 10, None)
    assert p.choose(text_only, loads(5, 0)) == 1
    assert p.choose(group(SYSTEM, "session:k"), loads(0, 5)) == 0
    assert p.choose(group(SYSTEM, "session:k"), loads(20, 0)) == 0
    assert len(p.index) == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("balance_abs_threshold", -1),
        ("balance_rel_threshold", 0.5),
        ("cache_threshold", 1.0),
        ("max_entries", 0),
        ("provisional_ttl_s", "soon"),
        ("max_sessions", True),
    ],
)
def test_bad_router_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"router\.{field}="):
        RouterConfig(**{field: value})
    with pytest.raises(ValueError, match=r"router\.nope="):
        RouterConfig.from_dict({"nope": 1})
