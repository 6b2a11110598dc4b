"""SGLang's sampling keys through the engine: penalties and min_new_tokens against HF
transformers on the same weights plus a plain-torch penalty reference; stop_regex,
no_stop_trim, spaces_between_special_tokens, custom_params with SGLang's meaning."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import load_hf

from engine_core import Engine, InvalidRequestError
from engine_core.requests.outputs import OutputBuilder
from engine_core.requests.request import Request
from engine_core.requests.sampling_params import SamplingParams

PROMPT = [5, 17, 29, 41]
NEW = 16
GREEDY = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}


def penalize(row: torch.Tensor, output: list[int], f=0.0, p=0.0, r=1.0, banned=()):
    """Plain-torch reference of SGLang's penalizers on one row (output tokens only)."""
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=row.numel())
    present = counts > 0
    row = torch.where(present, torch.where(row < 0, row * r, row / r), row)
    row = row - f * counts.float() - p * present.float()
    row[list(banned)] = float("-inf")
    return row


def reference_greedy(hf, prompt, n, banned=(), min_new=0, stops=(), **pen):
    """HF logits, reference penalties (``banned`` ids at -inf while fewer than ``min_new``
    tokens exist), argmax; ends after a token in ``stops``."""
    ids, out, lps = list(prompt), [], []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
        row = penalize(logits, out, banned=banned if len(out) < min_new else (), **pen)
        tok = int(row.argmax())
        lps.append(row.log_softmax(-1)[tok].item())
        out.append(tok)
        ids.append(tok)
        if tok in stops:
            break
    return out, lps


@pytest.fixture(scope="module")
def path(model_dir):
    return model_dir("llama")


@pytest.fixture(scope="module")
def hf(path):
    return load_hf(path)


@pytest.fixture(scope="module")
def engine(path):
    with Engine(path, device="cpu") as eng:
        yield eng


PENALTIES = [
    {"presence_penalty": 2.0},
    {"repetition_penalty": 2.0},
    {"repetition_penalty": 0.5},
    {"frequency_penalty": 1.0, "presence_penalty": 0.5, "repetition_penalty": 1.3},
    {"frequency_penalty": -2.0},
]
_REF_KEYS = {"frequency_penalty": "f", "presence_penalty": "p", "repetition_penalty": "r"}


@pytest.mark.parametrize("pen", PENALTIES, ids=[str(p) for p in PENALTIES])
def test_penalized_greedy_matches_reference(engine, hf, pen):
    out = engine.generate(
        input_ids=PROMPT, sampling_params=dict(GREEDY, **pen), return_logprob=True
    )
    ref_ids, ref_lps = reference_greedy(
        hf, PROMPT, NEW, **{_REF_KEYS[k]: v for k, v in pen.items()}
    )
    assert out["output_ids"] == ref_ids
    got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    assert max(abs(a - b) for a, b in zip(got, ref_lps)) < 1e-4  # penalized logprobs


def test_strong_penalty_stops_repeats(engine, hf):
    plain = engine.generate(input_ids=PROMPT, sampling_params=GREEDY)["output_ids"]
    assert len(set(plain)) < len(plain)  # the tiny model loops without a penalty
    for pen in ({"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        ids = engine.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, **pen))["output_ids"]
        assert len(set(ids)) == len(ids) and ids != plain
    looped = engine.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, frequency_penalty=-2))
    assert len(set(looped["output_ids"])) == 1  # a negative penalty rewards repeats


def test_penalties_reach_the_sampling_rank_with_tp(path, hf, engine):
    # rank 0 samples in its own process: the penalty state travels in the step plan
    params = dict(GREEDY, repetition_penalty=1.5, presence_penalty=1.0, min_new_tokens=4)
    with Engine(path, device="cpu", tp_size=2) as eng:
        out = eng.generate(input_ids=PROMPT, sampling_params=params, return_logprob=True)
    eos = engine.model_config.eos_token_ids
    ref_ids, ref_lps = reference_greedy(hf, PROMPT, NEW, eos, 4, r=1.5, p=1.0)
    assert out["output_ids"] == ref_ids
    got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    assert max(abs(a - b) for a, b in zip(got, ref_lps)) < 1e-4


def test_prompt_tokens_are_not_penalized(engine):
    # SGLang's penalizers count output tokens only: a prompt made of the token greedy decoding
    # picks first still lets that token be picked first.
    first = engine.generate(input_ids=PROMPT, sampling_params=GREEDY)["output_ids"][0]
    prompt = PROMPT + [first] * 3
    plain = engine.generate(input_ids=prompt, sampling_params=dict(GREEDY, max_new_tokens=1))
    pen = engine.generate(
        input_ids=prompt, sampling_params=dict(GREEDY, max_new_tokens=1, presence_penalty=2.0)
    )
    assert pen["output_ids"] == plain["output_ids"]


@pytest.fixture(scope="module")
def eos_setup(model_dir, engine):
    """A model whose EOS is the 4th token greedy decoding produces (same weights)."""
    plain = engine.generate(input_ids=PROMPT, sampling_params=GREEDY)["output_ids"]
    eos = plain[3]
    return model_dir("llama", eos_token_id=eos), eos, plain


def test_min_new_tokens_suppresses_eos_until_reached(eos_setup, hf):
    path, eos, plain = eos_setup
    with Engine(path, device="cpu") as eng:
        params = dict(GREEDY, ignore_eos=False)
        early = eng.generate(input_ids=PROMPT, sampling_params=params)["output_ids"]
        late = eng.generate(input_ids=PROMPT, sampling_params=dict(params, min_new_tokens=8))
        # SGLang bans EOS during min_new_tokens whether or not ignore_eos is set
        ignored = eng.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, min_new_tokens=8))
    assert early == plain[: plain.index(eos) + 1]
    ids = late["output_ids"]
    assert eos not in ids[:8] and len(ids) >= 8
    assert ids == reference_greedy(hf, PROMPT, NEW, (eos,), 8, stops=(eos,))[0]
    assert ignored["output_ids"] == reference_greedy(hf, PROMPT, NEW, (eos,), 8)[0]
    assert ignored["output_ids"] != plain and eos not in ignored["output_ids"][:8]


def test_min_new_tokens_suppresses_stop_token_ids(engine, hf):
    plain = engine.generate(input_ids=PROMPT, sampling_params=GREEDY)["output_ids"]
    stop = plain[1]
    params = dict(GREEDY, stop_token_ids=[stop], min_new_tokens=5)
    out = engine.generate(input_ids=PROMPT, sampling_params=params)["output_ids"]
    banned = (stop, *engine.model_config.eos_token_ids)
    assert stop not in out[:5]
    assert out == reference_greedy(hf, PROMPT, NEW, banned, 5, stops=(stop,))[0]


def test_min_new_tokens_works_without_tokenizer(path):
    with Engine(path, device="cpu", skip_tokenizer_init=True) as eng:
        out = eng.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, min_new_tokens=3))
        assert len(out["output_ids"]) == NEW
        for key, value in (("stop_regex", "a"), ("stop", "a")):
            with pytest.raises(InvalidRequestError, match=f"sampling_params.{key}"):
                eng.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, **{key: value}))


# ------------------------------------------------------------------- text-side keys


@pytest.fixture(scope="module")
def plain(engine):
    return engine.generate(input_ids=PROMPT, sampling_params=GREEDY)


def _first_len_containing(engine, ids: list[int], needle: str) -> int:
    return next(k for k in range(1, len(ids) + 1) if needle in engine.tokenizer.decode(ids[:k]))


def test_stop_regex_stops_and_keeps_the_text(engine, plain):
    text = plain["text"]
    sub = text[3:6]
    pattern = "(?:" + re.escape(sub) + ")"  # never occurs literally: SGLang leaves the text
    out = engine.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, stop_regex=[pattern]))
    k = _first_len_containing(engine, plain["output_ids"], sub)
    assert out["output_ids"] == plain["output_ids"][:k]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    assert out["text"] == engine.tokenizer.decode(out["output_ids"])
    never = engine.generate(
        input_ids=PROMPT, sampling_params=dict(GREEDY, stop_regex=["\u2603+", pattern])
    )
    assert never["meta_info"]["finish_reason"]["matched"] == pattern


def test_stop_regex_found_literally_is_trimmed_like_a_stop_string(engine, plain):
    text = plain["text"]
    sub = next(text[i : i + 2] for i in range(len(text)) if text[i : i + 2].isalnum())
    out = engine.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, stop_regex=sub))
    assert out["text"] == text[: text.index(sub)]
    kept = engine.generate(
        input_ids=PROMPT, sampling_params=dict(GREEDY, stop_regex=sub, no_stop_trim=True)
    )
    assert kept["text"] == text[: text.index(sub) + len(sub)]


def test_no_stop_trim_keeps_the_stop_string_and_stop_token(engine, plain):
    text = plain["text"]
    stop = text[3:6]
    trimmed = engine.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, stop=stop))
    kept = engine.generate(
        input_ids=PROMPT, sampling_params=dict(GREEDY, stop=stop, no_stop_trim=True)
    )
    assert trimmed["text"] == text[: text.index(stop)]
    assert kept["text"] == text[: text.index(stop) + len(stop)]
    assert kept["output_ids"] == trimmed["output_ids"]
    target = plain["output_ids"][5]
    params = dict(GREEDY, stop_token_ids=[target])
    cut = engine.generate(input_ids=PROMPT, sampling_params=params)
    whole = engine.generate(input_ids=PROMPT, sampling_params=dict(params, no_stop_trim=True))
    ids = cut["output_ids"]
    assert ids[-1] == target and whole["output_ids"] == ids
    assert cut["text"] == engine.tokenizer.decode(ids[:-1])  # the stop token is trimmed
    assert whole["text"] == engine.tokenizer.decode(ids)


@pytest.mark.parametrize("key,no_trim", [("stop", False), ("stop", True), ("stop_regex", False)])
def test_stream_chunks_grow_to_the_trimmed_text(engine, plain, key, no_trim):
    """SGLang's cumulative chunks: each one a prefix of the final (trimmed) text, so a stop
    string that gets trimmed is never shown on the way."""
    text = plain["text"]
    sub = next(text[i : i + 2] for i in range(2, len(text)) if text[i : i + 2].isalnum())
    params = dict(GREEDY, **{key: sub}, no_stop_trim=no_trim)
    whole = engine.generate(input_ids=PROMPT, sampling_params=params)
    chunks = list(engine.generate(input_ids=PROMPT, sampling_params=params, stream=True))
    assert whole["meta_info"]["finish_reason"]["matched"] == sub
    assert chunks[-1]["text"] == whole["text"]
    assert chunks[-1]["output_ids"] == whole["output_ids"]
    assert all(whole["text"].startswith(c["text"]) for c in chunks)
    assert all(whole["output_ids"][: len(c["output_ids"])] == c["output_ids"] for c in chunks)


class RecordingTokenizer:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def decode(self, ids, **kwargs) -> str:
        self.calls.append(kwargs)
        return " ".join(map(str, ids))


@pytest.mark.parametrize("spaces", [True, False])
def test_spaces_between_special_tokens_reaches_the_detokenizer(spaces):
    tok = RecordingTokenizer()
    builder = OutputBuilder(tok, lambda rids: None, lambda: "v")
    sp = SamplingParams.from_dict({"spaces_between_special_tokens": spaces})
    req = Request("r", [1, 2], sp, seed=0, arrival=0, output_ids=[3, 4])
    assert builder.decode(req) == "3 4"
    assert tok.calls == [{"skip_special_tokens": True, "spaces_between_special_tokens": spaces}]


def test_custom_params_accepted_and_carried(engine, plain):
    custom = {"boost": 1.5, "tags": ["a", 2, None], "cfg": {"k": True}}
    params = dict(GREEDY, custom_params=custom, spaces_between_special_tokens=False)
    out = engine.generate(input_ids=PROMPT, sampling_params=params)
    assert out["output_ids"] == plain["output_ids"]  # no custom logit processor reads them
    assert SamplingParams.from_dict({"custom_params": custom}).custom_params == custom


@pytest.mark.parametrize("key", ["logit_bias", "json_schema", "not_a_key"])
def test_unknown_keys_still_rejected(engine, key):
    with pytest.raises(InvalidRequestError, match=f"sampling_params.{key}"):
        engine.generate(input_ids=PROMPT, sampling_params=dict(GREEDY, **{key: {}}))
