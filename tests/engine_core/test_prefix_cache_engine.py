"""The prefix cache inside a real engine (tiny random model): hits equal misses, refits and KV
releases invalidate it, flush drops it, the switch turns it off, n samples prefill once."""

from __future__ import annotations

import pytest

from engine_core import Engine
from engine_core.scheduling.cache_events import AllBlocksCleared, BlocksStored, block_hashes

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
SYSTEM = [(7 * i + 3) % 250 + 3 for i in range(40)]  # a 40-token "system prompt"
QUESTIONS = [SYSTEM + [60 + q, 61 + q, 62 + q] for q in range(4)]
KW = {"device": "cpu", "page_size": 8}


def outputs(engine: Engine, prompts, params=GREEDY) -> list[dict]:
    return engine.generate(input_ids=prompts, sampling_params=params)


@pytest.fixture(scope="module")
def uncached_tokens(tiny_model):
    with Engine(tiny_model, enable_prefix_cache=False, **KW) as engine:
        return [o["output_ids"] for o in outputs(engine, QUESTIONS)]


def test_hits_equal_misses_in_default_mode(tiny_model, uncached_tokens):
    with Engine(tiny_model, **KW) as engine:
        first = outputs(engine, QUESTIONS[:1])
        rest = outputs(engine, QUESTIONS[1:])
        info = engine.get_server_info()
    assert first[0]["meta_info"]["cached_tokens"] == 0
    assert [o["meta_info"]["cached_tokens"] for o in rest] == [40, 40, 40]
    assert [o["output_ids"] for o in first + rest] == uncached_tokens
    assert info["cache_hit_rate"] == pytest.approx(120 / (4 * 43))


def test_switch_turns_the_cache_off(tiny_model, uncached_tokens):
    for kwargs in ({"enable_prefix_cache": False}, {"disable_radix_cache": True}):
        with Engine(tiny_model, **KW, **kwargs) as engine:
            outs = outputs(engine, QUESTIONS) + outputs(engine, QUESTIONS)
            assert engine.drain_cache_events() == []
            info = engine.get_server_info()
            assert info["prefix_cache"] == {"enabled": False}
            assert info["disable_radix_cache"] is True  # SGLang's flat key says so too
        assert all(o["meta_info"]["cached_tokens"] == 0 for o in outs)
        assert [o["output_ids"] for o in outs[:4]] == uncached_tokens


def test_samples_of_one_prompt_prefill_it_once(tiny_model):
    params = dict(GREEDY, n=8, temperature=1.0, sampling_seed=3)
    with Engine(tiny_model, **KW) as engine:
        outs = outputs(engine, QUESTIONS[:2], params)
        computed = engine.get_server_info()["prefill_tokens"]
    hits = [o["meta_info"]["cached_tokens"] for o in outs]
    # The two questions share the system prompt: it is computed once for all 16 samples,
    # then each computes its 3 uncached tokens (88 tokens instead of 16 x 43 = 688).
    assert sorted(hits) == [0] + [40] * 15
    assert computed == 43 + 15 * 3


def test_refit_invalidates_the_cache(tiny_model, tiny_model_v2):
    with Engine(tiny_model_v2, **KW) as fresh:
        expected = [o["output_ids"] for o in outputs(fresh, QUESTIONS[:2])]
    with Engine(tiny_model, **KW) as engine:
        outputs(engine, QUESTIONS[:2])
        engine.drain_cache_events()
        engine.update_weights_from_disk(tiny_model_v2)
        after = outputs(engine, QUESTIONS[:2])
        events = engine.drain_cache_events()
    # Old-weights KV is never reused: the first request after the refit misses.
    assert after[0]["meta_info"]["cached_tokens"] == 0
    assert isinstance(events[0], AllBlocksCleared)
    assert [o["output_ids"] for o in after] == expected


def test_kv_release_and_flush_drop_the_cache(tiny_model):
    with Engine(tiny_model, **KW) as engine:
        outputs(engine, QUESTIONS[:1])
        engine.release_memory_occupation(tags=["kv_cache"])
        engine.resume_memory_occupation(tags=["kv_cache"])
        assert outputs(engine, QUESTIONS[1:2])[0]["meta_info"]["cached_tokens"] == 0
        assert engine.flush_cache().success
        assert engine.get_server_info()["prefix_cache"]["cached_pages"] == 0
        assert outputs(engine, QUESTIONS[2:3])[0]["meta_info"]["cached_tokens"] == 0
        engine.scheduler.check_integrity()
        assert engine.flush_cache().success
        assert engine.pool.num_free == engine.pool.num_pages


def test_page_events_name_the_prompt_pages(tiny_model):
    with Engine(tiny_model, **KW) as engine:
        engine.generate(input_ids=QUESTIONS[0], sampling_params=dict(GREEDY, max_new_tokens=1))
        events = engine.drain_cache_events()
        assert engine.drain_cache_events() == []
    # 43 prompt tokens, the first 42 computed: 5 full pages of 8.
    assert events == [BlocksStored(tuple(block_hashes(QUESTIONS[0][:40], 8)), 0)]


def test_eviction_makes_room_instead_of_retracting(tiny_model, uncached_tokens):
    # 96 tokens of KV: one 43 + 8 token request at a time; cached prefixes must be evicted.
    with Engine(tiny_model, max_total_tokens=96, **KW) as engine:
        outs = [outputs(engine, [q])[0] for q in QUESTIONS]
        info = engine.get_server_info()
        distinct = [[200 + i] * 60 for i in range(2)]  # push the system prompt out
        outputs(engine, distinct)
        engine.scheduler.check_integrity()
        evicted = engine.get_server_info()["prefix_cache"]["evicted_pages"]
    assert [o["output_ids"] for o in outs] == uncached_tokens
    assert info["num_retractions"] == 0 and evicted > 0


@pytest.mark.slow  # two TP engines (rank processes)
def test_tp2_hits_equal_misses_bitwise(tiny_model):
    """Bookkeeping lives on rank 0; every rank reads the shared pages from the plan."""
    kw = dict(KW, tp_size=2, deterministic=True)
    params = dict(GREEDY, n=3, temperature=1.0, sampling_seed=5)
    runs = []
    for enabled in (False, True):
        with Engine(tiny_model, enable_prefix_cache=enabled, **kw) as engine:
            runs.append(
                engine.generate(
                    input_ids=QUESTIONS[:2], sampling_params=params, return_logprob=True
                )
            )
    off, on = runs
    assert [o["output_ids"] for o in on] == [o["output_ids"] for o in off]
    logprobs = [[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in on]
    assert logprobs == [[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in off]
    assert sum(o["meta_info"]["cached_tokens"] for o in on) == 5 * 40


def test_cache_salt_isolates_prefixes(tiny_model):
    from engine_core.errors import InvalidRequestError

    with Engine(tiny_model, **KW) as engine:

        def hit(salt) -> int:
            out = engine.generate(input_ids=QUESTIONS[0], sampling_params=GREEDY, cache_salt=salt)
            return out["meta_info"]["cached_tokens"]

        assert [hit("a"), hit("a"), hit("b"), hit(None), hit(None)] == [0, 42, 0, 0, 42]
        batch = engine.generate(
            input_ids=QUESTIONS[:2], sampling_params=GREEDY, cache_salt=["b", "c"]
        )
        assert [o["meta_info"]["cached_tokens"] for o in batch] == [42, 0]
        with pytest.raises(InvalidRequestError, match="cache_salt"):
            engine.generate(input_ids=QUESTIONS[0], sampling_params=GREEDY, cache_salt=5)
        assert hit("a") == 42  # the engine keeps serving
